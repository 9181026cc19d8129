"""The one adapter from the command line's DataConfig to the data readers' arguments.

`load_task_data` is the command line's one entry for data: the readers of `tlloop.data.readers`
(digits, folders of images or texts, TFRecords, TFDS, CSV tables) called with the config's
fields, then `tlloop.data.storage` (images in memory or streamed, texts in memory). Below this
module nothing reads a DataConfig, and errors name library arguments: the command line prints
them with their flags (`tlloop.cli.flags.flag_line`).
"""

from __future__ import annotations

from absl import logging

from tlloop.cli.config import DataConfig
from tlloop.cli.flags import flag_of
from tlloop.data.readers.digits import digits_source
from tlloop.data.readers.folders import folder_source, image_folder, text_folder
from tlloop.data.readers.records import records_source
from tlloop.data.readers.tables import csv_content, csv_source, read_tables
from tlloop.data.readers.tfds import tfds_source
from tlloop.data.splits import Source
from tlloop.data.storage import Data, memory_budget, store_images, store_texts
from tlloop.errors import ConfigError


def is_text(config: DataConfig) -> bool:
    """Whether the examples `config` names are texts (a text folder, or a CSV of texts)."""
    if config.dataset == "text_folder":
        return True
    return config.dataset == "csv" and csv_content(config.train_csv) == "text"


def load_task_data(config: DataConfig, *, evaluation_only: bool = False) -> Data:
    """The examples `config` names: texts (`load_text_data`) or images (`load_data`)."""
    if is_text(config):
        return load_text_data(config, evaluation_only=evaluation_only)
    return load_data(config, evaluation_only=evaluation_only)


def load_source(config: DataConfig) -> Source:
    """The labelled images of `config.dataset`: the selected classes kept, the few-shot limit
    applied (multi-hot rows and targets have no class to select or stratify by: the CSV and
    TFRecord readers apply what does apply)."""
    split = _split(config)
    if config.dataset == "digits":
        return digits_source(**split)
    if config.dataset == "tfrecord":
        return records_source(
            config.train_files,
            val_files=config.val_files,
            image_feature=config.image_feature,
            label_feature=config.label_feature,
            multilabel=config.task == "multilabel",
            **split,
        )
    if config.dataset == "csv":
        return csv_source(config.train_csv, **_tables(config))
    if config.dataset.startswith("tfds:"):
        return tfds_source(config.dataset[5:], tfds_dir=config.tfds_dir, **split)
    return folder_source(image_folder, config.data_dir, val_dir=config.val_dir, **split)


def load_data(config: DataConfig, *, evaluation_only: bool = False) -> Data:
    """The images `config` names (`load_source`), each split in memory or streamed as
    `--data_memory`, `--data_cache` and `--bad_images` say (`storage.store_images`), only the
    evaluation split with `evaluation_only`."""
    source = load_source(config)
    budget = memory_budget(config.data_memory)
    logging.info(
        "data memory budget: %.0f MiB (--data_memory=%s)", budget / 2**20, config.data_memory
    )
    return store_images(
        source,
        image_size=config.image_size,
        resize=config.resize,
        memory_budget=budget,
        data_cache=config.data_cache,
        bad_images=config.bad_images,
        image_feature=config.image_feature,
        batch_size=config.batch_size,
        eval_batch_size=config.eval_batch,
        seed=config.seed,
        evaluation_only=evaluation_only,
        name_of=_flag_name,
    )


def load_text_data(config: DataConfig, *, evaluation_only: bool = False) -> Data:
    """The texts of a text folder or a text CSV as in-memory string examples (the labels as
    `load_data` gives them); ConfigError naming the folder, file and line of a bad input."""
    for flag, value, default in (
        ("data_cache", config.data_cache, ""),
        ("data_memory", config.data_memory, "auto"),
    ):
        if value != default:  # texts are held in memory and tokenized inside the model
            raise ConfigError(
                flag,
                repr(value),
                "the examples are texts, always held in memory",
                f"{default or 'empty'} with texts",
            )
    if config.dataset == "csv":
        _, names, train, evaluation = read_tables(config.train_csv, **_tables(config))
        source = Source(names, train, evaluation)
    else:
        source = folder_source(
            text_folder, config.data_dir, val_dir=config.val_dir, **_split(config)
        )
    return store_texts(
        source,
        batch_size=config.batch_size,
        eval_batch_size=config.eval_batch,
        seed=config.seed,
        evaluation_only=evaluation_only,
    )


def _split(config: DataConfig) -> dict:
    """Every reader's split arguments: the held-out fraction, the classes, the few-shot limit."""
    return {
        "val_split": config.val_split,
        "classes": config.classes,
        "train_examples_per_class": config.train_examples_per_class,
    }


def _tables(config: DataConfig) -> dict:
    """`read_tables`' arguments from `config`, but the first CSV."""
    return {
        "val_csv": config.val_csv,
        "task": config.task,
        "label_delimiter": config.label_delimiter,
        **_split(config),
    }


def _flag_name(argument: str) -> str:
    """How the storage descriptions name an argument: as its flag."""
    return f"--{flag_of(argument) or argument}"
