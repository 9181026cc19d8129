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


def read_records(patterns: str, flag: str, image_key: str, label_key: str) -> Split:
    """Every record of the files `patterns` (comma-separated globs) matches, in sorted file
    order: where each lies (`RecordRefs`: the image is read from there when the examples are),
    its int64 label under `label_key`, and the first bytes of its image under `image_key`.
    One pass over the files, in parallel; no image is kept or decoded."""
    files = sorted({f for p in patterns.split(",") if p.strip() for f in glob.glob(p.strip())})
    if not files:
        raise ConfigError(f"--{flag}={patterns!r}: matches no file; accepted: globs of {_RECORDS}")
    spec = {
        image_key: tf.io.FixedLenFeature([], tf.string),
        label_key: tf.io.FixedLenFeature([], tf.int64),
    }

    def scan(record):
        example = tf.io.parse_single_example(record, spec)
        head = tf.strings.substr(example[image_key], 0, HEAD_BYTES)
        return tf.strings.length(record), example[label_key], head

    columns: list[list[np.ndarray]] = [[], [], [], [], []]
    heads: list[bytes] = []
    for number, path in enumerate(files):
        records = tf.data.TFRecordDataset(path)
        try:
            parts = list(
                records.map(scan, num_parallel_calls=AUTOTUNE).batch(4096).as_numpy_iterator()
            )
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
        columns[4].append(np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64))
        heads.extend(h for p in parts for h in p[2])
    file_index, numbers, offsets, lengths, labels = (np.concatenate(c) for c in columns)
    if labels.size and labels.min() < 0:
        raise ConfigError(
            f"--label_feature={label_key!r}: negative class index {labels.min()} in --{flag}; "
            "accepted: class indices 0, 1, 2, ..."
        )
    heads = np.asarray(heads, dtype=object)
    refs = RecordRefs(tuple(files), file_index, numbers, offsets, lengths, heads)
    return Split(refs, labels.astype(np.int32))


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
