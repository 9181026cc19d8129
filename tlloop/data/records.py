"""Example sources beyond files on disk: TFRecord files of tf.train.Example records, and
TensorFlow Datasets (an optional dependency: `pip install -e ".[tfds]"`).

Both give a `Split` with labels: of where records lie (TFRecord: read, like image files, when
the examples are) or of encoded images in memory (TFDS); errors name the flag and say what is
accepted.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import tensorflow as tf

from tlloop.config import ConfigError
from tlloop.data.images import HEAD_BYTES
from tlloop.data.sources import Split
from tlloop.data.streaming import RecordRefs

AUTOTUNE = tf.data.AUTOTUNE

_RECORDS = "TFRecord files of tf.train.Example records"


def read_records(
    patterns: str, flag: str, image_key: str, label_key: str, *, multilabel: bool = False
) -> Split:
    """Every record of the files `patterns` (comma-separated globs) matches, in sorted file
    order: where each lies (`RecordRefs`: the image is read from there when the examples are),
    its label under `label_key`, and the first bytes of its image under `image_key`. One pass
    over the files, in parallel; no image is kept or decoded.

    The label is an int64 class index; with `multilabel`, a list: of int64 label indices, or
    of floats (a multi-hot row). Multi-label labels come back as an object array of rows
    (index lists, or multi-hot rows as float32); `multi_hot` makes them one array."""
    files = sorted({f for p in patterns.split(",") if p.strip() for f in glob.glob(p.strip())})
    if not files:
        raise ConfigError(f"--{flag}={patterns!r}: matches no file; accepted: globs of {_RECORDS}")
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
                f"--{flag}: {path!r} is not a readable TFRecord file (corrupt or truncated); "
                f"accepted: {_RECORDS}"
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
            f"--label_feature={label_key!r}: negative class index {labels.min()} in --{flag}; "
            "accepted: class indices 0, 1, 2, ..."
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


def multi_hot(splits: list[Split], flag: str, label_key: str) -> tuple[int, list[Split]]:
    """(the number of labels, `splits` with float32 multi-hot labels [N, labels]) from the
    label rows `read_records(multilabel=True)` gave: index lists or multi-hot rows."""
    rows = [row for split in splits for row in split.labels]
    if rows and all(row.dtype.kind == "f" for row in rows):
        widths = {len(row) for row in rows}
        if len(widths) != 1:
            raise ConfigError(
                f"--label_feature={label_key!r}: multi-hot rows of {sorted(widths)} values in "
                f"--{flag}; accepted: one value per label in every record"
            )
        count = widths.pop()
        return count, [
            Split(s.images, np.stack(list(s.labels)).astype(np.float32), s.origins) for s in splits
        ]
    found = [int(row.min()) for row in rows if len(row)]
    if found and min(found) < 0:
        raise ConfigError(
            f"--label_feature={label_key!r}: negative label index {min(found)} in --{flag}; "
            "accepted: label indices 0, 1, 2, ..."
        )
    count = max((int(row.max()) for row in rows if len(row)), default=0) + 1

    def hot(split: Split) -> Split:
        labels = np.zeros((len(split), count), np.float32)
        for i, row in enumerate(split.labels):
            labels[i, row.astype(np.int64)] = 1.0
        return Split(split.images, labels, split.origins)

    return count, [hot(split) for split in splits]


def _missing_keys(records, spec, path: str, image_key: str, label_key: str) -> str:
    """The message for the first record of `path` that lacks a feature of `spec`."""
    for record in records:
        try:
            tf.io.parse_single_example(record, spec)
        except (tf.errors.InvalidArgumentError, ValueError):
            present = sorted(tf.train.Example.FromString(record.numpy()).features.feature)
            break
    else:
        present = []
    return (
        f"--image_feature={image_key!r} / --label_feature={label_key!r}: not both in the "
        f"records of {path!r} (they hold {present}); accepted: the feature names of the "
        "encoded image (bytes) and the class index (int64)"
    )


def read_tfds(name: str, data_dir: str) -> tuple[tuple[str, ...], Split, Split | None]:
    """The TFDS dataset `name` from `data_dir` (never downloaded): class names, the train split
    and the validation (or test) split if it has one."""
    flag = f"--dataset=tfds:{name}"
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ConfigError(
            f"{flag}: tensorflow-datasets is not installed; accepted: "
            'pip install -e ".[tfds]", with the data prepared in --tfds_dir'
        ) from None
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
        splits = builder.info.splits
        info_names = builder.info.features[
            (builder.info.supervised_keys or ("image", "label"))[1]
        ].names
    except Exception as error:  # TFDS raises its own kinds: unknown name, missing data
        raise ConfigError(
            f"{flag}: not available ({type(error).__name__}: {str(error).splitlines()[0][:160]})"
            f"; accepted: a TFDS dataset prepared in --tfds_dir={data_dir or '(default)'}"
        ) from None
    if not tf.io.gfile.exists(os.path.join(str(builder.data_dir), "dataset_info.json")):
        raise ConfigError(
            f"{flag}: no prepared data in --tfds_dir={data_dir or '(default)'}; accepted: a "
            "dataset prepared there beforehand (tlloop never downloads)"
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
