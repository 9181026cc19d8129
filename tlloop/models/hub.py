"""KerasHub presets as backbones: a handle (hf://, kaggle://, a preset name) or a local preset
directory (what `save_to_preset` writes). keras-hub is optional: `pip install -e ".[hub]"`.
A text preset (`text_backbone`) brings its tokenizer inside the backbone: raw strings in.

A preset's image converter (`image_converter.json`: resize, then x * scale + offset) is its
own preprocessing. It is read into an `InputAdapter` that `tlloop.models.backbones` puts inside
the backbone, before the network, once (see InputAdapter for why not the converter layer itself).
"""

from __future__ import annotations

import os
import re

import keras
import numpy as np

from tlloop.errors import ConfigError
from tlloop.models.adapters import TokenPool

HANDLES = ("hf://", "kaggle://", "modelscope://", "gs://")
EXTRA = 'pip install -e ".[hub]" (or pip install keras-hub)'
# Built-in preset names are lower-case words joined by "_" ("resnet_50_imagenet").
_PRESET_NAME = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9.]+)+")


def is_preset(source: str) -> bool:
    """Whether `source` names a KerasHub preset rather than a file or a class name."""
    if source.startswith(HANDLES):
        return True
    if os.path.isdir(source):
        return os.path.isfile(os.path.join(source, "config.json"))
    return bool(_PRESET_NAME.fullmatch(source)) and source != "small_cnn"


def import_hub(source: str):
    """keras_hub, or a ConfigError naming the extra that installs it."""
    try:
        import keras_hub
    except ImportError:
        raise ConfigError(
            "source",
            repr(source),
            "a KerasHub preset needs the keras-hub package, which is not installed",
            f"install the hub extra: {EXTRA}",
        ) from None
    return keras_hub


def load_preset(source: str, load_weights: bool = True):
    """(backbone, its image preprocessing as InputAdapter arguments or None) of the preset
    `source`; ConfigError when it cannot be loaded: no network for a handle, a directory that
    is not a preset, or a converter that does more than resize and rescale."""
    keras_hub = import_hub(source)
    local = os.path.isdir(source)
    try:
        backbone = keras_hub.models.Backbone.from_preset(source, load_weights=load_weights)
    except Exception as error:
        text = " ".join(str(error).split())[:200]
        if local:
            raise ConfigError(
                "source",
                repr(source),
                f"not a KerasHub preset directory with a backbone ({text})",
                "a directory written by Backbone.save_to_preset",
            ) from None
        raise ConfigError(
            "source",
            repr(source),
            f"could not fetch the KerasHub preset ({text})",
            "a handle reachable from here, or a local preset directory (where there is a "
            "network, load the preset once and save_to_preset it)",
        ) from None
    if not isinstance(backbone, keras.Model) or not getattr(backbone, "inputs", None):
        raise ConfigError("source", repr(source), "the preset's backbone declares no inputs")
    return backbone, _preprocessing(keras_hub, source, local)


def _preprocessing(keras_hub, source: str, local: bool) -> dict | None:
    if local and not os.path.isfile(os.path.join(source, "image_converter.json")):
        return None
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(source)
    except (FileNotFoundError, ValueError):  # a preset without an image converter
        return None
    if type(converter).call is not keras_hub.layers.ImageConverter.call:
        raise ConfigError(
            "source",
            repr(source),
            f"its image converter {type(converter).__name__} does more than resize and "
            "rescale, which tlloop cannot put inside the backbone",
            "an image backbone preset (ResNet, EfficientNet, MobileNet, ViT, DINOv2, ...)",
        )
    if converter.data_format != "channels_last":
        raise ConfigError("source", repr(source), "channels_first presets are not supported")
    scale = 1.0 if converter.scale is None else converter.scale
    offset = 0.0 if converter.offset is None else converter.offset
    return {
        "size": tuple(converter.image_size) if converter.image_size else None,
        "scale": list(np.ravel(scale).astype(float)) if np.ndim(scale) else float(scale),
        "offset": list(np.ravel(offset).astype(float)) if np.ndim(offset) else float(offset),
        "interpolation": converter.interpolation,
        "antialias": bool(converter.antialias),
    }


def has_class_token(backbone: keras.Model) -> bool:
    """Whether a transformer backbone's first output token is a class token (ViT, DINOv2)."""
    config = backbone.get_config()
    return bool(config.get("use_class_token", "dinov2" in type(backbone).__name__.lower()))


@keras.saving.register_keras_serializable(package="tlloop")
class TextPreprocess(keras.layers.Layer):
    """A KerasHub text preprocessor (tokenizer and packer) inside the backbone: raw strings
    (batch,) in, the encoder's inputs (a dict of (batch, sequence_length) tensors) out.

    KerasHub stores a tokenizer's vocabulary as an asset, loaded after the model's layers are
    rebuilt, so the preprocessor cannot run while a saved functional model is rebuilt; this
    layer states its output spec from its config (`outputs`: name -> dtype) instead, and only
    tokenizes when it is called on real strings. Preprocessing has no training behaviour."""

    def __init__(self, preprocessor, outputs: dict | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(preprocessor, dict):
            preprocessor = keras.saving.deserialize_keras_object(preprocessor)
        self.preprocessor = preprocessor
        if outputs is None:  # a fresh preprocessor has its vocabulary: ask it once
            import tensorflow as tf

            probe = preprocessor(tf.constant(["a"]))
            outputs = {name: probe[name].dtype.name for name in sorted(probe)}
        self.outputs_dtypes = dict(outputs)
        self.sequence_length = int(preprocessor.sequence_length)

    def build(self, input_shape) -> None:
        # Nothing to create: the preprocessor holds its vocabulary, not weights.
        self.built = True

    def call(self, inputs):
        packed = self.preprocessor(inputs)
        return {name: packed[name] for name in self.outputs_dtypes}

    def compute_output_spec(self, inputs):
        batch = inputs.shape[0]
        return {
            name: keras.KerasTensor((batch, self.sequence_length), dtype=dtype)
            for name, dtype in self.outputs_dtypes.items()
        }

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "preprocessor": keras.saving.serialize_keras_object(self.preprocessor),
            "outputs": self.outputs_dtypes,
        }


def text_backbone(source: str, *, load_weights: bool = True) -> keras.Model:
    """A text backbone named "backbone" from the KerasHub preset `source` (a directory written
    by `save_to_preset`, or a handle): raw strings (batch,) in, the preset's preprocessor
    (tokenizer and packer) then its encoder, one feature vector per text out: the pooled
    output where the encoder has one (BERT), else the first token's (DistilBERT, RoBERTa).
    ConfigError (a ValueError) naming `source` when it cannot be loaded or has no text
    preprocessor. Public as `tlloop.text_backbone`; the command line builds its own through it."""
    keras_hub = import_hub(source)
    encoder, _ = load_preset(source, load_weights=load_weights)
    try:
        preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(source)
    except Exception as error:
        text = " ".join(str(error).split())[:200]
        raise ConfigError(
            "source",
            repr(source),
            f"no text preprocessor in the preset ({text})",
            "a text preset (BERT, DistilBERT, RoBERTa, ...) saved with its preprocessor "
            "(preprocessor.save_to_preset(DIR) beside backbone.save_to_preset(DIR))",
        ) from None
    text = keras.Input((), dtype="string", name="text")
    features = encoder(TextPreprocess(preprocessor, name="preprocess")(text))
    if isinstance(features, dict):
        features = features.get("pooled_output", features.get("sequence_output"))
    if len(features.shape) == 3:
        features = TokenPool("first", name="pool")(features)
    return keras.Model(text, features, name="backbone")
