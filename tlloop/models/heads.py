"""The classification head put on top of a backbone."""

from __future__ import annotations

import keras


def build_head(feature_shape: tuple[int, ...], num_classes: int, dropout: float) -> keras.Model:
    """A model named "head": global average pooling (for feature maps), Dropout, Dense logits.

    It outputs logits (no softmax): losses use `from_logits=True`, which is numerically safer.
    """
    inputs = keras.Input(feature_shape, name="features")
    x = inputs
    if len(feature_shape) == 3:
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    elif len(feature_shape) != 1:
        raise ValueError(f"backbone output must be a feature map or vector, got {feature_shape}")
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name="head")
