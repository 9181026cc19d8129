"""TFRecord files of tf.train.Example records: a `Split` of where each record lies (its
image read, like an image file, when the examples are) with its label; errors name the
argument at fault (`train_files`, `label_feature`, ...) and say what is accepted.
"""

from __future__ import annotations

import glob

import numpy as np
import tensorflow as tf

from tlloop.data.images import HEAD_BYTES
from tlloop.data.splits import (
    Source,
    Split,
    labelled_source,
    random_split,
    stratified_split,
)
from tlloop.data.streaming import RecordRefs
from tlloop.errors import NO_VALUE, ConfigError

AUTOTUNE = tf.data.AUTOTUNE

_RECORDS = "TFRecord files of tf.train.Example records"


def read_records(
    patterns: str, argument: str, image_key: str, label_key: str, *, multilabel: bool = False
) -> Split:
    """Every record of the files `patterns` (comma-separated globs) matches, in sorted file
    order: where each lies (`RecordRefs`: the image is read from there when the examples are),
    its label under `label_key`, and the first bytes of its image under `image_key` (errors
    name `argument`, which gave the `patterns`, and the keys as `image_feature` and
    `label_feature`). One pass
    over the files, in parallel; no image is kept or decoded.

    The label is an int64 class index; with `multilabel`, a list: of int64 label indices, or
    of floats (a multi-hot row). Multi-label labels come back as an object array of rows
    (index lists, or multi-hot rows as float32); `multi_hot` makes them one array."""
    files = sorted({f for p in patterns.split(",") if p.strip() for f in glob.glob(p.strip())})
    if not files:
        raise ConfigError(argument, repr(patterns), "matches no file", f"globs of {_RECORDS}")
    label_type = _list_type(files[0], label_key) if multilabel else tf.int64
    label_spec = (
        tf.io.VarLenFeature(label_type) if multilabel else tf.io.FixedLenFeature([], tf.int64)
    )
    spec = {image_key: tf.io.FixedLenFeature([], tf.string), label_key: label_spec}

    def scan(record):
        example = tf.io.parse_single_example(record, spec)
        head = tf.strings.substr(example[image_key], 0, HEAD_BYTES)
        label = example[label_key]
        if multilabel:  # a row of any length: ragged_batch batches the rows
            label = tf.sparse.to_dense(label)
        return tf.strings.length(record), label, head

    columns: list[list[np.ndarray]] = [[], [], [], [], []]
    heads: list[bytes] = []
    for number, path in enumerate(files):
        records = tf.data.TFRecordDataset(path)
        try:
            scanned = records.map(scan, num_parallel_calls=AUTOTUNE)
            batched = scanned.ragged_batch(4096) if multilabel else scanned.batch(4096)
            parts = list(batched.as_numpy_iterator())
        except tf.errors.DataLossError:
            raise ConfigError(
                argument,
                NO_VALUE,
                f"{path!r} is not a readable TFRecord file (corrupt or truncated)",
                _RECORDS,
            ) from None
        except tf.errors.InvalidArgumentError:
            raise ConfigError(_missing_keys(records, spec, path, image_key, label_key)) from None
        lengths = (
            np.concatenate([p[0] for p in parts]).astype(np.int64)
            if parts
            else np.zeros(0, np.int64)
        )
        # A record is its length (8 bytes), a checksum (4), its bytes, a checksum (4).
        starts = (
            np.concatenate([[0], np.cumsum(lengths + 16)[:-1]]) + 12 if len(lengths) else lengths
        )
        columns[0].append(np.full(len(lengths), number, np.int32))
        columns[1].append(np.arange(len(lengths), dtype=np.int64))
        columns[2].append(starts.astype(np.int64))
        columns[3].append(lengths)
        if multilabel:  # ragged rows, one per record
            rows = np.empty(sum(len(p[1]) for p in parts), dtype=object)  # not a 2-D array
            rows[:] = [np.asarray(row) for p in parts for row in p[1]]
            columns[4].append(rows)
        else:
            columns[4].append(
                np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
            )
        heads.extend(h for p in parts for h in p[2])
    file_index, numbers, offsets, lengths, labels = (np.concatenate(c) for c in columns)
    heads = np.asarray(heads, dtype=object)
    refs = RecordRefs(tuple(files), file_index, numbers, offsets, lengths, heads)
    if multilabel:
        return Split(refs, labels)
    if labels.size and labels.min() < 0:
        raise ConfigError(
            "label_feature",
            repr(label_key),
            f"negative class index {labels.min()} in ${argument}",
            "class indices 0, 1, 2, ...",
        )
    return Split(refs, labels.astype(np.int32))


def _list_type(path: str, label_key: str) -> tf.DType:
    """int64 (label indices) or float32 (a multi-hot row): the list `label_key` holds in the
    first record of `path` (int64 when it has none)."""
    for record in tf.data.TFRecordDataset(path).take(1):
        feature = tf.train.Example.FromString(record.numpy()).features.feature.get(label_key)
        if feature is not None and feature.WhichOneof("kind") == "float_list":
            return tf.float32
    return tf.int64


def multi_hot(splits: list[Split], argument: str, label_key: str) -> tuple[int, list[Split]]:
    """(the number of labels, `splits` with float32 multi-hot labels [N, labels]) from the
    label rows `read_records(multilabel=True)` gave: index lists or multi-hot rows (errors
    name the records as `argument`)."""
    rows = [row for split in splits for row in split.labels]
    if rows and all(row.dtype.kind == "f" for row in rows):
        widths = {len(row) for row in rows}
        if len(widths) != 1:
            raise ConfigError(
                "label_feature",
                repr(label_key),
                f"multi-hot rows of {sorted(widths)} values in ${argument}",
                "one value per label in every record",
            )
        count = widths.pop()
        return count, [
            Split(s.images, np.stack(list(s.labels)).astype(np.float32), s.origins) for s in splits
        ]
    found = [int(row.min()) for row in rows if len(row)]
    if found and min(found) < 0:
        raise ConfigError(
            "label_feature",
            repr(label_key),
            f"negative label index {min(found)} in ${argument}",
            "label indices 0, 1, 2, ...",
        )
    count = max((int(row.max()) for row in rows if len(row)), default=0) + 1

    def hot(split: Split) -> Split:
        labels = np.zeros((len(split), count), np.float32)
        for i, row in enumerate(split.labels):
            labels[i, row.astype(np.int64)] = 1.0
        return Split(split.images, labels, split.origins)

    return count, [hot(split) for split in splits]


def _missing_keys(records, spec, path: str, image_key: str, label_key: str) -> str:
    """The message (one finished line) for the first record of `path` that lacks a feature
    of `spec`."""
    for record in records:
        try:
            tf.io.parse_single_example(record, spec)
        except (tf.errors.InvalidArgumentError, ValueError):
            present = sorted(tf.train.Example.FromString(record.numpy()).features.feature)
            break
    else:
        present = []
    return (
        f"$image_feature={image_key!r} / $label_feature={label_key!r}: not both in the "
        f"records of {path!r} (they hold {present}); accepted: the feature names of the "
        "encoded image (bytes) and the class index (int64)"
    )


def records_source(
    train_files: str,
    *,
    val_files: str = "",
    image_feature: str,
    label_feature: str,
    multilabel: bool = False,
    val_split: float,
    classes: tuple[str, ...] = (),
    train_examples_per_class: int = 0,
) -> Source:
    """The records of `train_files` (and `val_files`, else `val_split` held out: stratified
    by class, or at random for `multilabel` rows, which have no one class), images under
    `image_feature`, labels under `label_feature`; class names "0", "1", ... With
    `multilabel`, float32 multi-hot labels and no class selection; else the `classes`
    selected and the few-shot limit applied (see `splits`)."""
    keys = (image_feature, label_feature)
    train = read_records(train_files, "train_files", *keys, multilabel=multilabel)
    if val_files:
        evaluation = read_records(val_files, "val_files", *keys, multilabel=multilabel)
    elif multilabel:  # no one class to stratify by
        train, evaluation = random_split(train, val_split)
    else:
        names = tuple(str(i) for i in range(int(train.labels.max(initial=0)) + 1))
        train, evaluation = stratified_split(
            train, val_split, names, "train_files", NO_VALUE, classes
        )
    if multilabel:
        count, (train, evaluation) = multi_hot([train, evaluation], "train_files", label_feature)
        return Source(tuple(str(i) for i in range(count)), train, evaluation)
    count = int(max(train.labels.max(initial=0), evaluation.labels.max(initial=0))) + 1
    return labelled_source(
        tuple(str(i) for i in range(count)),
        train,
        evaluation,
        classes=classes,
        train_examples_per_class=train_examples_per_class,
    )
