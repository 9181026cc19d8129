"""The classification head put on top of a backbone."""

from __future__ import annotations

import keras


def build_head(
    feature_shape: tuple[int, ...], num_classes: int, dropout: float, float32_output: bool = False
) -> keras.Model:
    """A model named "head": global average pooling (for feature maps), Dropout, Dense logits.

    It outputs logits (no softmax): losses use `from_logits=True`, which is numerically safer.
    With `float32_output` (mixed precision) a last float32 layer casts the logits, so the
    softmax and the loss never run in float16.
    """
    inputs = keras.Input(feature_shape, name="features")
    x = inputs
    if len(feature_shape) == 3:
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    elif len(feature_shape) != 1:
        raise ValueError(f"backbone output must be a feature map or vector, got {feature_shape}")
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    if float32_output:
        logits = keras.layers.Activation("linear", dtype="float32", name="logits_float32")(logits)
    return keras.Model(inputs, logits, name="head")


def classification_head(
    features: keras.Model | tuple[int, ...], num_classes: int, *, dropout: float = 0.2
) -> keras.Model:
    """The built-in head for `num_classes` classes on a backbone's features: `features` is the
    backbone (a functional model: its output shape is read) or the shape of one example's
    features, (H, W, C) for a feature map (pooled first) or (C,) for a vector."""
    if isinstance(features, keras.Model):
        outputs = getattr(features, "outputs", None)
        if not outputs or len(outputs) != 1:
            raise ValueError(
                "features: the backbone declares no single output; accepted: a functional "
                "backbone, or the feature shape, e.g. (7, 7, 1280)"
            )
        features = tuple(outputs[0].shape[1:])
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes}: accepted: >= 1")
    return build_head(tuple(features), num_classes, dropout)
