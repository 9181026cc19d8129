"""Example sources beyond files on disk: TFRecord files of tf.train.Example records, and
TensorFlow Datasets (an optional dependency: `pip install -e ".[tfds]"`).

Both give a `Split` of encoded images (decoded, like image files, when the data loads) or of
arrays, with labels; errors name the flag and say what is accepted.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import tensorflow as tf

from tlloop.config import ConfigError
from tlloop.data.sources import Split

_RECORDS = "TFRecord files of tf.train.Example records"


def read_records(patterns: str, flag: str, image_key: str, label_key: str) -> Split:
    """Every record of the files `patterns` (comma-separated globs) matches, in sorted file
    order: the encoded image under `image_key`, the int64 label under `label_key`."""
    files = sorted({f for p in patterns.split(",") if p.strip() for f in glob.glob(p.strip())})
    if not files:
        raise ConfigError(f"--{flag}={patterns!r}: matches no file; accepted: globs of {_RECORDS}")
    spec = {
        image_key: tf.io.FixedLenFeature([], tf.string),
        label_key: tf.io.FixedLenFeature([], tf.int64),
    }
    images, labels, origins = [], [], []
    for path in files:
        try:
            for index, record in enumerate(tf.data.TFRecordDataset(path)):
                try:
                    example = tf.io.parse_single_example(record, spec)
                except (tf.errors.InvalidArgumentError, ValueError):
                    raise ConfigError(_missing_keys(record, path, image_key, label_key)) from None
                images.append(example[image_key].numpy())
                labels.append(int(example[label_key]))
                origins.append(f"record {index} of {path}")
        except tf.errors.DataLossError:
            raise ConfigError(
                f"--{flag}: {path!r} is not a readable TFRecord file (corrupt or truncated); "
                f"accepted: {_RECORDS}"
            ) from None
    labels = np.asarray(labels, np.int64)
    if labels.size and labels.min() < 0:
        raise ConfigError(
            f"--label_feature={label_key!r}: negative class index {labels.min()} in --{flag}; "
            "accepted: class indices 0, 1, 2, ..."
        )
    return Split(images, labels.astype(np.int32), origins)


def _missing_keys(record, path: str, image_key: str, label_key: str) -> str:
    example = tf.train.Example.FromString(record.numpy())
    present = sorted(example.features.feature)
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
