"""The heads put on top of a backbone: logits for (multi-label) classification, values in
the targets' units for regression."""

from __future__ import annotations

from typing import TYPE_CHECKING

import keras
import numpy as np

from tlloop.models import walk

if TYPE_CHECKING:
    from tlloop.tasks import Regression


def build_head(
    feature_shape: tuple[int, ...],
    num_classes: int,
    dropout: float,
    float32_output: bool = False,
    standardized: tuple[np.ndarray, np.ndarray] | None = None,
) -> keras.Model:
    """A model named "head": global average pooling (for feature maps), Dropout, Dense logits.

    It outputs logits (no softmax): losses use `from_logits=True`, which is numerically safer.
    With `float32_output` (mixed precision) a last float32 layer casts the logits, so the
    softmax and the loss never run in float16. With `standardized` (mean, std) of regression
    targets, a last `Destandardize` layer maps the Dense outputs to the targets' units.
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
    if standardized is not None:
        logits = Destandardize(*standardized, name="targets")(logits)
    return keras.Model(inputs, logits, name="head")


def classification_head(
    features: keras.layers.Layer | tuple[int, ...],
    num_classes: int,
    *,
    dropout: float = 0.2,
    input_shape=None,
) -> keras.Model:
    """The built-in head for `num_classes` classes on a backbone's features: `features` is the
    backbone, any Keras model or layer (its declared output shape is read; a subclassed one is
    called once, on `input_shape` if given, else on the inputs it was built for), or the shape
    of one example's features, (H, W, C) for a feature map (pooled first) or (C,) for a
    vector. `input_shape`: one example's input shape, e.g. (224, 224, 3), or a dict of them.
    One logit per class: also the head of a `MultiLabel` task (one logit per label)."""
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes}: accepted: >= 1")
    return build_head(_feature_shape(features, input_shape), num_classes, dropout)


def regression_head(
    features: keras.layers.Layer | tuple[int, ...],
    task: Regression,
    *,
    dropout: float = 0.0,
    input_shape=None,
) -> keras.Model:
    """The head of a `Regression` task: pooling, Dropout, Dense with one output per target,
    then the task's target mean and standard deviation (from its `targets`) applied, so the
    model (and its export) predicts in the targets' units. `features` and `input_shape` as
    for `classification_head`."""
    from tlloop.tasks import Regression

    if not isinstance(task, Regression):
        raise TypeError(f"task: {type(task).__name__} is not a tlloop.Regression")
    return build_head(
        _feature_shape(features, input_shape),
        task.outputs,
        dropout,
        standardized=(task.mean, task.std),
    )


def _feature_shape(features, input_shape) -> tuple[int, ...]:
    if isinstance(features, keras.layers.Layer):
        return walk.feature_shape(features, input_shape)
    return tuple(features)


@keras.saving.register_keras_serializable(package="tlloop")
class Destandardize(keras.layers.Layer):
    """x * std + mean per output: standardised regression values back in the targets' units.
    `mean` and `std` are stored in the config (no weights: nothing trains them)."""

    def __init__(self, mean, std, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mean = [float(v) for v in np.ravel(mean)]
        self.std = [float(v) for v in np.ravel(std)]

    def call(self, inputs):
        mean = keras.ops.convert_to_tensor(self.mean, inputs.dtype)
        std = keras.ops.convert_to_tensor(self.std, inputs.dtype)
        return inputs * std + mean

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "mean": self.mean, "std": self.std}
