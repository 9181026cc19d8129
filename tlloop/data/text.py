"""Text examples: a folder of classes of .txt files (--dataset=text_folder, the layout of
`keras.utils.text_dataset_from_directory`) or a CSV with a text column (--dataset=csv), held
in memory as strings: a text backbone tokenizes them inside the model.

`load_task_data` is the command line's one entry for data: text goes here, images to
`tlloop.data.load_data`.
"""

from __future__ import annotations

import numpy as np

from tlloop.cli.config import DataConfig
from tlloop.config import ConfigError
from tlloop.data.examples import InMemoryExamples
from tlloop.data.pipeline import Data, load_data
from tlloop.data.sources import Split, _limit_per_class, _select, class_folders, folder_splits
from tlloop.data.tables import csv_content, load_tables, read_text_file

TEXT_EXTENSIONS = (".txt",)


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


def load_text_data(config: DataConfig, *, evaluation_only: bool = False) -> Data:
    """The texts of a text folder or a text CSV as in-memory string examples (the labels as
    `load_data` gives them); ConfigError naming the folder, file and line of a bad input."""
    for flag, value, default in (
        ("data_cache", config.data_cache, ""),
        ("data_memory", config.data_memory, "auto"),
    ):
        if value != default:  # texts are held in memory and tokenized inside the model
            raise ConfigError(
                f"--{flag}={value!r}: the examples are texts, always held in memory; "
                f"accepted: {default or 'empty'} with texts"
            )
    skipped: dict[str, str] = {}
    if config.dataset == "csv":
        _, names, train, evaluation = load_tables(config)
    else:
        names, train, evaluation, skipped = folder_splits(config, text_folder)
        names, train, evaluation = _select(names, train, evaluation, config.classes)
        train = _limit_per_class(train, config.train_examples_per_class, len(names))
    return Data(
        class_names=tuple(names),
        train_examples=None if evaluation_only else _examples(train),
        eval_examples=_examples(evaluation),
        batch_size=config.batch_size,
        eval_batch_size=config.eval_batch,
        seed=config.seed,
        skipped_files=skipped,
        storage={
            name: "memory (texts, tokenized inside the model)"
            for name in ("eval",) + ("train",) * (not evaluation_only)
        },
    )


def text_folder(path: str, flag: str) -> tuple[tuple[str, ...], Split, dict[str, str]]:
    """One sub-folder of .txt files per class, sorted by name, walked as image folders are
    (`class_folders`: nested folders read, hidden ones ignored, other files skipped with the
    reason); each file one example."""
    accepted = "a folder with one sub-folder of UTF-8 .txt files per class"
    names, files, labels, skipped = class_folders(
        path, flag, TEXT_EXTENSIONS, ".txt files", accepted
    )
    texts = [read_text_file(file, f"--{flag}: text file ") for file in files]
    return names, Split(texts, labels), skipped


def _examples(split: Split) -> InMemoryExamples:
    return InMemoryExamples(np.asarray(split.images, dtype=object), split.labels)
