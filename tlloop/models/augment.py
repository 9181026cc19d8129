"""The augmentation submodule, built from parsed `augment` operations (AugmentOp)."""

from __future__ import annotations

import keras
import tensorflow as tf

from tlloop.config import AugmentOp


@keras.saving.register_keras_serializable(package="tlloop")
class RandomResizedCrop(keras.layers.Layer):
    """In training, each image is cropped to a random square region of side (1 - factor)..1
    of the image, at a random place, and resized back; in inference, the identity.

    Keras 3 has no such layer (its RandomCrop changes the output size and returns its input
    unchanged in inference). The randomness is a Keras SeedGenerator, so checkpoints keep it.
    """

    def __init__(self, factor: float, seed: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.factor = factor
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training: bool = True):
        if not training:
            return images
        batch = tf.shape(images)[0]
        side = keras.random.uniform((batch, 1), 1.0 - self.factor, 1.0, seed=self.seed_generator)
        corner = keras.random.uniform((batch, 2), 0.0, 1.0, seed=self.seed_generator)
        corner *= 1.0 - side
        boxes = tf.concat([corner, corner + side], axis=-1)  # y1, x1, y2, x2 in [0, 1]
        size = tf.shape(images)[1:3]
        return tf.image.crop_and_resize(images, boxes, tf.range(batch), size)

    def get_config(self) -> dict:
        return {**super().get_config(), "factor": self.factor, "seed": self.seed}


def _layer(op: AugmentOp, seed: int, name: str) -> keras.layers.Layer:
    if op.name == "flip":
        return keras.layers.RandomFlip("horizontal", seed=seed, name=name)
    if op.name == "rotate":
        return keras.layers.RandomRotation(op.factor, seed=seed, name=name)
    if op.name == "zoom":
        return keras.layers.RandomZoom(op.factor, seed=seed, name=name)
    if op.name == "contrast":
        return keras.layers.RandomContrast(op.factor, seed=seed, name=name)
    if op.name == "crop":
        return RandomResizedCrop(op.factor, seed=seed, name=name)
    if op.name == "translate":
        return keras.layers.RandomTranslation(op.factor, op.factor, seed=seed, name=name)
    raise ValueError(f"unknown augmentation {op.name!r}")


def build_augment(ops: tuple[AugmentOp, ...], image_size: int, seed: int) -> keras.Model:
    """A model named "augment" applying `ops` in order; the identity when `ops` is empty.

    Random layers default to their training behaviour when called without `training`, so
    callers always pass it (the mode table decides).
    """
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = inputs
    for i, op in enumerate(ops):
        x = _layer(op, seed + i, f"{op.name}_{i}")(x)
    return keras.Model(inputs, x, name="augment")
