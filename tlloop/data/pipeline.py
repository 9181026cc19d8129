"""tf.data pipelines: decode, resize, cache, shuffle, batch.

Training batches always have the full static batch shape (the stream repeats before it is
batched, so no partial batch retraces the step). Evaluation pads its last batch to full size
with examples of weight 0, so every example counts exactly once and none twice.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from tlloop.config import DataConfig
from tlloop.data.sources import Split, load_source

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class Data:
    """Ready pipelines and their sizes.

    `train` yields (images float32 [B, S, S, 3] in [0, 255], labels int32 [B]) forever;
    `eval` yields (images, labels, weights float32 [B]) for `eval_steps` batches, and the
    weights sum to `eval_size`.
    """

    class_names: tuple[str, ...]
    train: tf.data.Dataset
    eval: tf.data.Dataset
    preview: tf.Tensor  # the first (up to) 16 training images, unshuffled
    train_size: int
    eval_size: int
    steps_per_epoch: int
    eval_steps: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_data(config: DataConfig) -> Data:
    """Loads the source `config` names and builds its train and eval pipelines."""
    source = load_source(config)
    examples = images_dataset(source.train, config.image_size).cache()
    preview = next(iter(examples.map(lambda image, label: image).batch(16)))
    train = (
        examples.shuffle(len(source.train), seed=config.seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(config.batch_size, drop_remainder=True)
        .prefetch(AUTOTUNE)
    )
    evaluation = padded_eval_dataset(source.eval, config.image_size, config.eval_batch)
    return Data(
        class_names=source.class_names,
        train=train,
        eval=evaluation,
        preview=preview,
        train_size=len(source.train),
        eval_size=len(source.eval),
        steps_per_epoch=math.ceil(len(source.train) / config.batch_size),
        eval_steps=math.ceil(len(source.eval) / config.eval_batch),
    )


def images_dataset(split: Split, image_size: int) -> tf.data.Dataset:
    """(image float32 [S, S, 3] in [0, 255], label int32) pairs, in the split's order."""
    if isinstance(split.images, np.ndarray):
        pixels = tf.data.Dataset.from_tensor_slices(split.images)
    else:
        pixels = tf.data.Dataset.from_tensor_slices(split.images).map(
            _decode_file, num_parallel_calls=AUTOTUNE
        )
    pixels = pixels.map(lambda image: _resize(image, image_size), num_parallel_calls=AUTOTUNE)
    labels = tf.data.Dataset.from_tensor_slices(split.labels)
    return tf.data.Dataset.zip(pixels, labels)


def padded_eval_dataset(split: Split, image_size: int, batch_size: int) -> tf.data.Dataset:
    """(images, labels, weights) full batches; padding examples have weight 0."""
    real = images_dataset(split, image_size).map(lambda x, y: (x, y, tf.constant(1.0)))
    padding = (-len(split)) % batch_size
    filler = tf.data.Dataset.from_tensors(
        (tf.zeros((image_size, image_size, 3)), tf.constant(0, tf.int32), tf.constant(0.0))
    ).repeat(padding)
    return (
        real.concatenate(filler).batch(batch_size, drop_remainder=True).cache().prefetch(AUTOTUNE)
    )


def _decode_file(path: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return tf.ensure_shape(image, (None, None, 3))


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    image = tf.image.resize(tf.cast(image, tf.float32), (image_size, image_size))
    return tf.ensure_shape(image, (image_size, image_size, 3))
