"""Input and output adapters stored inside a backbone, so its saved model needs no code.

`InputAdapter` turns tlloop's RGB pixels in [0, 255] into what a network was trained on (its
size, its channels, its range); `TokenPool` turns a transformer's token sequence into one
feature vector. Both are registered Keras layers: `import tlloop` is all a loader needs.
"""

from __future__ import annotations

import keras
from keras import ops

# ITU-R BT.601 luma, as tf.image.rgb_to_grayscale and PIL's "L" mode use.
LUMA = (0.2989, 0.5870, 0.1140)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_scale_offset() -> tuple[list[float], list[float]]:
    """Per-channel (scale, offset) for (x / 255 - mean) / std on pixels in [0, 255]."""
    scale = [1 / (255 * s) for s in IMAGENET_STD]
    offset = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    return scale, offset


@keras.saving.register_keras_serializable(package="tlloop")
class InputAdapter(keras.layers.Layer):
    """RGB pixels in [0, 255] -> `size` (if given) -> `channels` -> x * scale + offset.

    `scale` and `offset` are numbers or one per output channel; `interpolation` and
    `antialias` are those of `keras.ops.image.resize`. The resize comes first, as a KerasHub
    image converter does it. It has no `training` argument and calls no layer: a layer that
    calls a preprocessing layer (whose `training` defaults to True, as Keras' Resizing does)
    leaves training=True in Keras' call context for every layer after it in the same call,
    which runs a backbone's BatchNorm on batch statistics when the model is called with no
    `training` (measured with a KerasHub ImageConverter in front of a ResNet).
    """

    def __init__(
        self,
        channels: str = "rgb",
        scale: float | list[float] = 1.0,
        offset: float | list[float] = 0.0,
        size: tuple[int, int] | list[int] | None = None,
        interpolation: str = "bilinear",
        antialias: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if channels not in ("rgb", "grayscale"):
            raise ValueError(f"channels={channels!r}: accepted: rgb, grayscale")
        self.channels = channels
        self.scale = scale
        self.offset = offset
        self.size = tuple(size) if size else None
        self.interpolation = interpolation
        self.antialias = antialias

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.size is not None:
            x = ops.image.resize(
                x, self.size, interpolation=self.interpolation, antialias=self.antialias
            )
        if self.channels == "grayscale":
            x = ops.sum(x * ops.convert_to_tensor(LUMA, x.dtype), axis=-1, keepdims=True)
        scale = ops.convert_to_tensor(self.scale, x.dtype)
        offset = ops.convert_to_tensor(self.offset, x.dtype)
        return x * scale + offset

    def compute_output_shape(self, input_shape):
        height, width = self.size if self.size is not None else input_shape[1:3]
        return (input_shape[0], height, width, 1 if self.channels == "grayscale" else 3)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "channels": self.channels,
            "scale": self.scale,
            "offset": self.offset,
            "size": list(self.size) if self.size else None,
            "interpolation": self.interpolation,
            "antialias": self.antialias,
        }


@keras.saving.register_keras_serializable(package="tlloop")
class TokenPool(keras.layers.Layer):
    """(batch, tokens, dim) -> (batch, dim): the class token ("first") or the mean of all."""

    def __init__(self, mode: str = "first", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("first", "mean"):
            raise ValueError(f"mode={mode!r}: accepted: first, mean")
        self.mode = mode

    def call(self, inputs):
        return inputs[:, 0] if self.mode == "first" else ops.mean(inputs, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}
