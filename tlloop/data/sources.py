"""Example sources: labelled images as in-memory arrays, split into train and evaluation.

A source returns uint8 RGB images of any size; the pipeline resizes them. Splits use a fixed
seed of their own, so the evaluation set is the same whatever `--seed` a run uses.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING

import numpy as np

from tlloop.config import ConfigError, DataConfig
from tlloop.data.images import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    from tlloop.data.streaming import RecordRefs

SPLIT_SEED = 20261123


@dataclasses.dataclass(frozen=True)
class Split:
    """Images: (N, H, W, 3) uint8, a list of file paths, a list of encoded images (bytes) or
    where TFRecord records lie (`RecordRefs`) (texts, for tlloop.data.text); labels: int32
    class indices (N,), or float32 multi-hot rows or regression targets (N, K); and for
    encoded images, where each came from (for error messages)."""

    images: np.ndarray | list[str] | list[bytes] | RecordRefs
    labels: np.ndarray
    origins: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> Split:
        if not isinstance(self.images, list):
            return Split(self.images[index], self.labels[index])
        origins = None if self.origins is None else [self.origins[i] for i in index]
        return Split([self.images[i] for i in index], self.labels[index], origins)


@dataclasses.dataclass(frozen=True)
class Source:
    """Class names in label order and the two splits."""

    class_names: tuple[str, ...]
    train: Split
    eval: Split


def load_source(config: DataConfig) -> Source:
    """Loads `config.dataset`, keeps the selected classes and applies the few-shot limit."""
    if config.dataset == "digits":
        names, everything = _digits()
        train, evaluation = _split(everything, config.val_split)
    elif config.dataset == "tfrecord":
        from tlloop.data.records import multi_hot, read_records

        keys = (config.image_feature, config.label_feature)
        multilabel = config.task == "multilabel"
        train = read_records(config.train_files, "train_files", *keys, multilabel=multilabel)
        if config.val_files:
            evaluation = read_records(config.val_files, "val_files", *keys, multilabel=multilabel)
        elif multilabel:  # no one class to stratify by
            train, evaluation = random_split(train, config.val_split)
        else:
            train, evaluation = _split(train, config.val_split)
        if multilabel:
            count, (train, evaluation) = multi_hot(
                [train, evaluation], "train_files", config.label_feature
            )
            return Source(tuple(str(i) for i in range(count)), train, evaluation)
        count = int(max(train.labels.max(initial=0), evaluation.labels.max(initial=0))) + 1
        names = tuple(str(i) for i in range(count))
    elif config.dataset == "csv":
        from tlloop.data.tables import csv_source

        # Multi-hot rows and targets have no class to select or stratify by: the CSV reader
        # applies what does apply itself.
        return csv_source(config)
    elif config.dataset.startswith("tfds:"):
        from tlloop.data.records import read_tfds

        names, train, evaluation = read_tfds(config.dataset[5:], config.tfds_dir)
        if evaluation is None:
            train, evaluation = _split(train, config.val_split)
    else:
        names, train, evaluation = folder_splits(config, _folder)
    names, train, evaluation = _select(names, train, evaluation, config.classes)
    train = _limit_per_class(train, config.train_examples_per_class, len(names))
    return Source(names, train, evaluation)


def _digits() -> tuple[tuple[str, ...], Split]:
    """The UCI optical digits (8x8, 16 grey levels) as RGB uint8 in [0, 255]."""
    with resources.files("tlloop.data").joinpath("digits.npz").open("rb") as file:
        arrays = np.load(file)
        grey = arrays["images"].astype(np.float32) * (255.0 / 16.0)
        labels = arrays["labels"].astype(np.int32)
    images = np.repeat(np.round(grey).astype(np.uint8)[..., None], 3, axis=-1)
    return tuple(str(i) for i in range(10)), Split(images, labels)


def folder_splits(
    config: DataConfig, read: Callable[[str, str], tuple[tuple[str, ...], Split]]
) -> tuple[tuple[str, ...], Split, Split]:
    """(class names, training split, evaluation split) of --data_dir's class folders, each
    read by `read(path, flag)`: the evaluation split is --val_dir's (same class folders, else
    ConfigError) or --val_split of --data_dir's."""
    names, train = read(config.data_dir, "data_dir")
    if not config.val_dir:
        return (names, *_split(train, config.val_split))
    val_names, evaluation = read(config.val_dir, "val_dir")
    if val_names != names:
        raise ConfigError(
            f"--val_dir={config.val_dir!r}: its class folders {list(val_names)} differ "
            f"from --data_dir's {list(names)}; accepted: the same class folders"
        )
    return names, train, evaluation


def _folder(path: str, flag: str) -> tuple[tuple[str, ...], Split]:
    """One sub-folder per class, sorted by name; image files found by extension."""
    accepted = "a folder with one sub-folder of images (JPEG, PNG, BMP, GIF) per class"
    names, files, labels = class_folders(path, flag, IMAGE_EXTENSIONS, "images", accepted)
    return names, Split(files, labels)


def class_folders(
    path: str, flag: str, extensions: tuple[str, ...], what: str, accepted: str
) -> tuple[tuple[str, ...], list[str], np.ndarray]:
    """(class names, files, int32 labels) of a folder with one sub-folder per class, sorted by
    name, its files found by `extensions`; ConfigError naming `--flag` (`what` the files are)
    for a missing folder, no class folder, or an empty one."""
    if not os.path.isdir(path):
        raise ConfigError(f"--{flag}={path!r}: not a folder; accepted: {accepted}")
    names = tuple(sorted(e.name for e in os.scandir(path) if e.is_dir()))
    if not names:
        raise ConfigError(f"--{flag}={path!r}: has no class sub-folders; accepted: {accepted}")
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        found = sorted(
            entry.path
            for entry in os.scandir(os.path.join(path, name))
            if entry.is_file() and entry.name.lower().endswith(extensions)
        )
        if not found:
            raise ConfigError(
                f"--{flag}={path!r}: class folder {name!r} holds no {what}; accepted: {accepted}"
            )
        files += found
        labels += [label] * len(found)
    return names, files, np.asarray(labels, np.int32)


def _split(split: Split, val_fraction: float) -> tuple[Split, Split]:
    """A stratified split: `val_fraction` of each class (at least one) goes to evaluation."""
    rng = np.random.default_rng(SPLIT_SEED)
    train_index, eval_index = [], []
    for label in np.unique(split.labels):
        index = rng.permutation(np.flatnonzero(split.labels == label))
        count = max(1, round(len(index) * val_fraction))
        eval_index.append(index[:count])
        train_index.append(index[count:])
    return split.take(np.sort(np.concatenate(train_index))), split.take(
        np.sort(np.concatenate(eval_index))
    )


def random_split(split: Split, fraction: float) -> tuple[Split, Split]:
    """`fraction` of the examples (at least one) to evaluation, with the splits' fixed seed:
    multi-hot rows and targets have no class to stratify by."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(split))
    count = max(1, round(len(split) * fraction))
    return split.take(np.sort(order[count:])), split.take(np.sort(order[:count]))


def _select(
    names: tuple[str, ...], train: Split, evaluation: Split, wanted: tuple[str, ...]
) -> tuple[tuple[str, ...], Split, Split]:
    if not wanted:
        return names, train, evaluation
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise ConfigError(
            f"--classes: unknown classes {unknown}; accepted: names from {', '.join(names)}"
        )
    old_to_new = np.full(len(names), -1, np.int32)
    for new, name in enumerate(wanted):
        old_to_new[names.index(name)] = new

    def relabel(split: Split) -> Split:
        kept = split.take(np.flatnonzero(old_to_new[split.labels] >= 0))
        return Split(kept.images, old_to_new[kept.labels])

    return wanted, relabel(train), relabel(evaluation)


def _limit_per_class(split: Split, per_class: int, num_classes: int) -> Split:
    if per_class == 0:
        return split
    rng = np.random.default_rng(SPLIT_SEED + 1)
    index = [
        rng.permutation(np.flatnonzero(split.labels == label))[:per_class]
        for label in range(num_classes)
    ]
    return split.take(np.sort(np.concatenate(index)))
