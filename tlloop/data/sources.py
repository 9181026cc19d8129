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

from tlloop.cli.config import DataConfig
from tlloop.config import ConfigError
from tlloop.data.images import IMAGE_EXTENSIONS, UNDECODED_KINDS, shown

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
    """Class names in label order, the two splits, and the files found but not used, each
    with the reason (printable path: reason)."""

    class_names: tuple[str, ...]
    train: Split
    eval: Split
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


def load_source(config: DataConfig) -> Source:
    """Loads `config.dataset`, keeps the selected classes and applies the few-shot limit."""
    skipped: dict[str, str] = {}
    if config.dataset == "digits":
        names, everything = _digits()
        train, evaluation = _split(
            everything, config.val_split, names, "--dataset=digits", config.classes
        )
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
            names = tuple(str(i) for i in range(int(train.labels.max(initial=0)) + 1))
            where = "--train_files"
            train, evaluation = _split(train, config.val_split, names, where, config.classes)
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
            where = f"--dataset={config.dataset}"
            train, evaluation = _split(train, config.val_split, names, where, config.classes)
    else:
        names, train, evaluation, skipped = folder_splits(config, _folder)
    names, train, evaluation = _select(names, train, evaluation, config.classes)
    train = _limit_per_class(train, config.train_examples_per_class, len(names))
    return Source(names, train, evaluation, skipped)


def _digits() -> tuple[tuple[str, ...], Split]:
    """The UCI optical digits (8x8, 16 grey levels) as RGB uint8 in [0, 255]."""
    with resources.files("tlloop.data").joinpath("digits.npz").open("rb") as file:
        arrays = np.load(file)
        grey = arrays["images"].astype(np.float32) * (255.0 / 16.0)
        labels = arrays["labels"].astype(np.int32)
    images = np.repeat(np.round(grey).astype(np.uint8)[..., None], 3, axis=-1)
    return tuple(str(i) for i in range(10)), Split(images, labels)


def folder_splits(
    config: DataConfig, read: Callable[[str, str], tuple[tuple[str, ...], Split, dict[str, str]]]
) -> tuple[tuple[str, ...], Split, Split, dict[str, str]]:
    """(class names, training split, evaluation split, files skipped with their reasons) of
    --data_dir's class folders, each read by `read(path, flag)`: the evaluation split is
    --val_dir's (same class folders, else ConfigError) or --val_split of --data_dir's (every
    class keeping an example in each split, else ConfigError naming it)."""
    names, train, skipped = read(config.data_dir, "data_dir")
    if not config.val_dir:
        where = f"--data_dir={config.data_dir!r}"
        return (names, *_split(train, config.val_split, names, where, config.classes), skipped)
    val_names, evaluation, val_skipped = read(config.val_dir, "val_dir")
    if val_names != names:
        raise ConfigError(
            f"--val_dir={config.val_dir!r}: its class folders {list(val_names)} differ "
            f"from --data_dir's {list(names)}; accepted: the same class folders"
        )
    return names, train, evaluation, {**skipped, **val_skipped}


def _folder(path: str, flag: str) -> tuple[tuple[str, ...], Split, dict[str, str]]:
    """One sub-folder per class, sorted by name (`class_folders`); image files found by
    extension (the format by content, when read), other files skipped with the reason."""
    accepted = f"a folder with one sub-folder of images ({', '.join(IMAGE_EXTENSIONS)}) per class"
    names, files, labels, skipped = class_folders(
        path, flag, IMAGE_EXTENSIONS, "images", accepted, UNDECODED_KINDS
    )
    return names, Split(files, labels), skipped


def class_folders(
    path: str,
    flag: str,
    extensions: tuple[str, ...],
    what: str,
    accepted: str,
    undecoded: dict[str, str] | None = None,
) -> tuple[tuple[str, ...], list[str], np.ndarray, dict[str, str]]:
    """(class names, files, int32 labels, files skipped) of a folder with one sub-folder per
    class, as Keras' `image_dataset_from_directory` reads it: class folders sorted by name,
    the files of each (in its nested folders too, in sorted path order) found by
    `extensions`; hidden files and folders (names starting with '.') ignored.

    Every other file is skipped and returned with the reason (printable path: reason): a
    kind `undecoded` names (extension: kind, e.g. TIFF), another extension, a link to nothing
    or to a folder (not followed), files beside the class folders. ConfigError naming
    `--flag` (`what` the files are) for a missing folder, no class folder, or a class with
    none of its files."""
    if not os.path.isdir(path):
        raise ConfigError(f"--{flag}={path!r}: not a folder; accepted: {accepted}")
    skipped: dict[str, str] = {}
    entries = sorted(
        (e for e in os.scandir(path) if not e.name.startswith(".")), key=lambda e: e.name
    )
    names = tuple(e.name for e in entries if e.is_dir())
    for entry in entries:
        if not entry.is_dir():
            skipped[shown(entry.path)] = "beside the class folders, not in one"
    if not names:
        raise ConfigError(f"--{flag}={path!r}: has no class sub-folders; accepted: {accepted}")
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        found = _files(os.path.join(path, name), extensions, what, undecoded or {}, skipped)
        if not found:
            raise ConfigError(
                f"--{flag}={path!r}: class folder {shown(name)!r} holds no {what}; "
                f"accepted: {accepted}"
            )
        files += found
        labels += [label] * len(found)
    # Class names travel into the export as text: a folder name that is not UTF-8, escaped.
    return tuple(shown(n) for n in names), files, np.asarray(labels, np.int32), skipped


def _files(
    folder: str,
    extensions: tuple[str, ...],
    what: str,
    undecoded: dict[str, str],
    skipped: dict[str, str],
) -> list[str]:
    """The files of `folder` and its nested folders with one of `extensions`, in sorted path
    order, hidden ones left out; the others into `skipped` with their reasons."""
    found: list[str] = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue  # hidden: .DS_Store, .ipynb_checkpoints/, .thumbnails/ (as Keras)
        extension = os.path.splitext(entry.name)[1].lower()
        if entry.is_symlink() and not os.path.exists(entry.path):
            skipped[shown(entry.path)] = "a link to nothing (the file it names does not exist)"
        elif entry.is_dir(follow_symlinks=False):
            found += _files(entry.path, extensions, what, undecoded, skipped)
        elif entry.is_dir():
            skipped[shown(entry.path)] = "a link to a folder (not followed, as Keras)"
        elif not entry.is_file():
            skipped[shown(entry.path)] = "not a regular file"
        elif entry.name.lower().endswith(extensions):
            found.append(entry.path)
        elif extension in undecoded:
            skipped[shown(entry.path)] = f"{undecoded[extension]}: TensorFlow does not decode it"
        else:
            skipped[shown(entry.path)] = (
                f"not read: extension {extension or '(none)'} (read: {', '.join(extensions)})"
            )
    return found


def _split(
    split: Split,
    val_fraction: float,
    names: tuple[str, ...] = (),
    where: str = "the examples",
    selected: tuple[str, ...] = (),
) -> tuple[Split, Split]:
    """A stratified split: `val_fraction` of each class (at least one) goes to evaluation.
    ConfigError naming the class of `names` and `where` it comes from if one would keep no
    training example (a class of one example), unless `selected` (--classes) leaves it out."""
    rng = np.random.default_rng(SPLIT_SEED)
    train_index, eval_index = [], []
    for label in np.unique(split.labels):
        index = rng.permutation(np.flatnonzero(split.labels == label))
        count = max(1, round(len(index) * val_fraction))
        name = names[label] if label < len(names) else str(label)
        if count >= len(index) and (not selected or name in selected):
            raise ConfigError(
                f"{where}: class {shown(name)!r} has {len(index)} example(s), too few to "
                f"keep one for training and split one off for evaluation (--val_split="
                f"{val_fraction:g}); accepted: at least 2 per class, or --val_dir"
            )
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
