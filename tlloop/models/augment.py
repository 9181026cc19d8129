"""The augmentation submodule, built from parsed `--augment` operations."""

from __future__ import annotations

import keras

from tlloop.config import AugmentOp


def _layer(op: AugmentOp, seed: int, name: str) -> keras.layers.Layer:
    if op.name == "flip":
        return keras.layers.RandomFlip("horizontal", seed=seed, name=name)
    if op.name == "rotate":
        return keras.layers.RandomRotation(op.factor, seed=seed, name=name)
    if op.name == "zoom":
        return keras.layers.RandomZoom(op.factor, seed=seed, name=name)
    if op.name == "contrast":
        return keras.layers.RandomContrast(op.factor, seed=seed, name=name)
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
