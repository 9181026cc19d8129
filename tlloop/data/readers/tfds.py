"""TensorFlow Datasets (an optional dependency: `pip install -e ".[tfds]"`), read from a
local data directory, never downloaded: encoded images in memory with their labels."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from tlloop.data.splits import Source, Split, labelled_source, stratified_split
from tlloop.errors import ConfigError


def read_tfds(name: str, tfds_dir: str) -> tuple[tuple[str, ...], Split, Split | None]:
    """The TFDS dataset `name` from `tfds_dir` (empty: TFDS' default; never downloaded): class
    names, the train split and the validation (or test) split if it has one. Errors name the
    dataset as `dataset=tfds:NAME`."""
    dataset = f"tfds:{name}"
    where = f"$tfds_dir={tfds_dir or '(default)'}"
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ConfigError(
            "dataset",
            dataset,
            "tensorflow-datasets is not installed",
            'pip install -e ".[tfds]", with the data prepared in $tfds_dir',
        ) from None
    try:
        builder = tfds.builder(name, data_dir=tfds_dir or None)
        splits = builder.info.splits
        info_names = builder.info.features[
            (builder.info.supervised_keys or ("image", "label"))[1]
        ].names
    except Exception as error:  # TFDS raises its own kinds: unknown name, missing data
        raise ConfigError(
            "dataset",
            dataset,
            f"not available ({type(error).__name__}: {str(error).splitlines()[0][:160]})",
            f"a TFDS dataset prepared in {where}",
        ) from None
    if not tf.io.gfile.exists(os.path.join(str(builder.data_dir), "dataset_info.json")):
        raise ConfigError(
            "dataset",
            dataset,
            f"no prepared data in {where}",
            "a dataset prepared there beforehand (tlloop never downloads)",
        )

    image_key, label_key = builder.info.supervised_keys or ("image", "label")

    def split(which: str) -> Split:
        images, labels = [], []
        for example in tfds.as_numpy(builder.as_dataset(split=which)):
            images.append(tf.io.encode_png(example[image_key]).numpy())
            labels.append(int(example[label_key]))
        return Split(
            images, np.asarray(labels, np.int32), [f"{which}[{i}]" for i in range(len(labels))]
        )

    held_out = next((s for s in ("validation", "test") if s in splits), None)
    return tuple(info_names), split("train"), split(held_out) if held_out else None


def tfds_source(
    name: str,
    *,
    tfds_dir: str = "",
    val_split: float,
    classes: tuple[str, ...] = (),
    train_examples_per_class: int = 0,
) -> Source:
    """The TFDS dataset `name` (`read_tfds`): its validation (or test) split, else `val_split`
    of its train split held out; the `classes` selected and the few-shot limit applied."""
    names, train, evaluation = read_tfds(name, tfds_dir)
    if evaluation is None:
        train, evaluation = stratified_split(
            train, val_split, names, "dataset", f"tfds:{name}", classes
        )
    return labelled_source(
        names,
        train,
        evaluation,
        classes=classes,
        train_examples_per_class=train_examples_per_class,
    )
