"""Folders of examples, one sub-folder per class (the layout of Keras'
`image_dataset_from_directory` and `text_dataset_from_directory`): images or .txt files.

Image files are listed, not read (their format is found from their first bytes when they
load, see `storage`); text files are read whole. Errors name the argument that gave the
folder (`data_dir`, `val_dir`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from tlloop.data.images import IMAGE_EXTENSIONS, UNDECODED_KINDS, shown
from tlloop.data.readers.texts import TEXT_EXTENSIONS, read_text_file
from tlloop.data.splits import Source, Split, labelled_source, stratified_split
from tlloop.errors import ConfigError

# (class names, split, files skipped with their reasons) of one folder, given by an argument.
FolderReader = Callable[[str, str], tuple[tuple[str, ...], Split, dict[str, str]]]


def image_folder(path: str, argument: str) -> tuple[tuple[str, ...], Split, dict[str, str]]:
    """One sub-folder per class, sorted by name (`class_folders`); image files found by
    extension (the format by content, when read), other files skipped with the reason."""
    accepted = f"a folder with one sub-folder of images ({', '.join(IMAGE_EXTENSIONS)}) per class"
    names, files, labels, skipped = class_folders(
        path, argument, IMAGE_EXTENSIONS, "images", accepted, UNDECODED_KINDS
    )
    return names, Split(files, labels), skipped


def text_folder(path: str, argument: str) -> tuple[tuple[str, ...], Split, dict[str, str]]:
    """One sub-folder of .txt files per class, sorted by name, walked as image folders are
    (`class_folders`: nested folders read, hidden ones ignored, other files skipped with the
    reason); each file one example, its text."""
    accepted = "a folder with one sub-folder of UTF-8 .txt files per class"
    names, files, labels, skipped = class_folders(
        path, argument, TEXT_EXTENSIONS, ".txt files", accepted
    )
    texts = [read_text_file(file, f"${argument}: text file ") for file in files]
    return names, Split(texts, labels), skipped


def folder_source(
    read: FolderReader,
    data_dir: str,
    *,
    val_dir: str = "",
    val_split: float,
    classes: tuple[str, ...] = (),
    train_examples_per_class: int = 0,
) -> Source:
    """The class folders of `data_dir`, each read by `read(path, argument)` (`image_folder`,
    `text_folder`): the evaluation split is `val_dir`'s (the same class folders, else
    ConfigError) or `val_split` of `data_dir`'s (every class keeping an example in each
    split, else ConfigError naming it); then the `classes` selected and the few-shot limit
    applied (see `splits`)."""
    names, train, skipped = read(data_dir, "data_dir")
    if val_dir:
        val_names, evaluation, val_skipped = read(val_dir, "val_dir")
        if val_names != names:
            raise ConfigError(
                "val_dir",
                repr(val_dir),
                f"its class folders {list(val_names)} differ from $data_dir's {list(names)}",
                "the same class folders",
            )
        skipped = {**skipped, **val_skipped}
    else:
        train, evaluation = stratified_split(
            train, val_split, names, "data_dir", repr(data_dir), classes
        )
    return labelled_source(
        names,
        train,
        evaluation,
        classes=classes,
        train_examples_per_class=train_examples_per_class,
        skipped=skipped,
    )


def class_folders(
    path: str,
    argument: str,
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
    `argument` (`what` the files are) for a missing folder, no class folder, or a class with
    none of its files."""
    if not os.path.isdir(path):
        raise ConfigError(argument, repr(path), "not a folder", accepted)
    skipped: dict[str, str] = {}
    entries = sorted(
        (e for e in os.scandir(path) if not e.name.startswith(".")), key=lambda e: e.name
    )
    names = tuple(e.name for e in entries if e.is_dir())
    for entry in entries:
        if not entry.is_dir():
            skipped[shown(entry.path)] = "beside the class folders, not in one"
    if not names:
        raise ConfigError(argument, repr(path), "has no class sub-folders", accepted)
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        found = _files(os.path.join(path, name), extensions, what, undecoded or {}, skipped)
        if not found:
            raise ConfigError(
                argument, repr(path), f"class folder {shown(name)!r} holds no {what}", accepted
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
