"""Backbones: a keras.applications model by class name, small_cnn, a saved full model (.keras,
or .h5/.hdf5 from Keras 2 or 3), or a KerasHub preset (`tlloop.models.hub`).

Every backbone built here is a Keras model named "backbone" that takes raw RGB pixels in
[0, 255] (float32, shape (size, size, 3)) and returns a feature map or a feature vector: the
preprocessing a pretrained network expects is inside it (an application's preprocess_input,
a preset's image converter, or an `InputAdapter` from `channels`/`value_range` and the
network's native size), so nothing outside has to know it, exports included.

Errors name the library's arguments (`source`, `layer`, `channels`, `value_range`, `weights`,
`image_size`); the command line prints them with its flags (`tlloop.cli.flags.flag_of`).
"""

from __future__ import annotations

import difflib
import inspect
import os

import keras
from absl import logging

from tlloop.config import parse_backbone_range
from tlloop.errors import ConfigError
from tlloop.models import hub
from tlloop.models.adapters import InputAdapter, TokenPool, imagenet_scale_offset

SMALL_CNN = "small_cnn"
_WEIGHTS_ACCEPTED = "imagenet, none, or the path of a weights file"
MODEL_FILES = (".keras", ".h5", ".hdf5")


@keras.saving.register_keras_serializable(package="tlloop")
class ApplicationPreprocess(keras.layers.Layer):
    """Applies the `preprocess_input` of a keras.applications family, looked up by class name.

    Stored by name, so a saved model holds no code and loads in Keras safe mode.
    """

    def __init__(self, application: str, **kwargs):
        super().__init__(**kwargs)
        self.application = application
        self._preprocess = _application_module(application).preprocess_input

    def call(self, inputs):
        return self._preprocess(inputs)

    def get_config(self) -> dict:
        return {**super().get_config(), "application": self.application}


def _application_module(name: str):
    """The public keras.applications submodule of class `name`, or None if there is none.

    Found through the module that defines the class, because some families (MobileNetV3)
    are exported only at the top of keras.applications, not from their submodule.
    """
    builder = getattr(keras.applications, name, None) if name[:1].isupper() else None
    if not callable(builder):
        return None
    module = getattr(keras.applications, builder.__module__.rsplit(".", 1)[-1], None)
    return module if inspect.ismodule(module) and hasattr(module, "preprocess_input") else None


def application_names() -> list[str]:
    """Class names of the keras.applications models this Keras has."""
    return sorted(n for n in dir(keras.applications) if n[:1].isupper() and _application_module(n))


def small_cnn(image_size: int) -> keras.Model:
    """The built-in demo CNN: three conv-BN-ReLU blocks, a feature map at 1/4 resolution."""
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 255, name="rescale")(inputs)
    for i, filters in enumerate((32, 64, 128), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        # Momentum 0.9, not Keras' 0.99: moving variances start at 1.0, far from the ~1e-3 of
        # these activations, and a small data set gives too few steps to forget that start.
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        if i < 3:
            x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    return keras.Model(inputs, x, name="backbone")


def build_backbone(
    name: str,
    weights: str,
    image_size: int,
    *,
    safe_mode: bool = True,
    layer: str = "",
    channels: str = "",
    value_range: str = "",
) -> keras.Model:
    """Builds the backbone `name` (`source` in errors) with `weights`, cut at `layer`, its
    input adapted by `channels` and `value_range` and resized to its native size; raises
    ConfigError naming the argument at fault."""
    if name.lower().endswith(MODEL_FILES):
        model = _cut(_load_file(name, weights, safe_mode), layer, name)
        return _wrap(model, image_size, name, channels, value_range)
    if os.path.isfile(os.path.join(name, "saved_model.pb")):
        raise ConfigError(
            "source",
            repr(name),
            "a TF SavedModel cannot be fine-tuned correctly: it holds traced functions, not "
            "layers, so it cannot be cut, unfrozen layer by layer, nor its BatchNorm layers "
            "kept in inference mode while training, and model.keras could only point at it",
            "the .keras or .h5 model it was exported from",
        )
    if hub.is_preset(name):
        if weights not in ("", "none"):
            raise ConfigError(
                "weights",
                repr(weights),
                "a KerasHub preset brings its own weights",
                "'' (the preset's) or none (random initialisation)",
            )
        model, preprocessing = hub.load_preset(name, load_weights=weights != "none")
        if preprocessing is not None and value_range:
            raise ConfigError(
                "value_range",
                repr(value_range),
                f"the preset {name!r} brings its own preprocessing (its image converter), "
                "applied once inside the backbone",
                "empty",
            )
        cut = _cut(model, layer, name)
        pool = None
        if not layer and len(cut.outputs[0].shape) == 3:  # a transformer's token sequence
            pool = TokenPool("first" if hub.has_class_token(model) else "mean", name="pool")
        return _wrap(cut, image_size, name, channels, value_range, preprocessing, pool)
    if name == SMALL_CNN:
        _no_adapters(name, layer, channels, value_range, cut=False)
        model = small_cnn(image_size)
        if weights == "imagenet":
            raise ConfigError(
                "weights",
                "imagenet",
                f"{SMALL_CNN} has no ImageNet weights",
                "none, or the path of a weights file saved from a small_cnn backbone",
            )
        if weights not in ("", "none"):
            _load_weights(model, weights)
        return model
    module = _application_module(name)
    if module is None:
        raise ConfigError(
            "source",
            repr(name),
            "unknown backbone",
            f"{SMALL_CNN}, a model file ({', '.join(MODEL_FILES)}), a KerasHub preset (hf://..., "
            "kaggle://..., a preset name or directory), or a keras.applications class name "
            f"({', '.join(application_names())})",
        )
    _no_adapters(name, layer, channels, value_range, cut=True)
    return _application(name, weights or "imagenet", image_size, layer)


def load_backbone(
    source: str,
    image_size: int,
    *,
    weights: str = "",
    layer: str = "",
    channels: str = "",
    value_range: str = "",
    safe_mode: bool = True,
) -> keras.Model:
    """A backbone for `TransferModel` from `source` (a keras.applications class name,
    small_cnn, a model file or a KerasHub preset): RGB pixels in [0, 255] of `image_size` in,
    features out, cut at `layer` (a layer name or -N from the end), its input adapted by
    `channels` (rgb, grayscale) and `value_range`. Raises ConfigError (a ValueError) naming
    the argument at fault."""
    return build_backbone(
        source,
        weights,
        image_size,
        safe_mode=safe_mode,
        layer=layer,
        channels=channels,
        value_range=value_range,
    )


def _no_adapters(name: str, layer: str, channels: str, value_range: str, cut: bool) -> None:
    """Refuses adapters on a backbone that already takes RGB pixels in [0, 255]."""
    for argument, value, ok in (
        ("layer", layer, cut or not layer),
        ("channels", channels, channels in ("", "rgb")),
        ("value_range", value_range, not value_range),
    ):
        if not ok:
            raise ConfigError(
                argument,
                repr(value),
                f"{name} builds its own input (RGB pixels in [0, 255], its preprocessing inside)",
                "empty (and $layer for a keras.applications model)",
            )


def load_source(name: str, *, safe_mode: bool = True) -> keras.Model:
    """The model `name` names as it is (no cut, no adapters): a model file, a KerasHub preset,
    or a keras.applications class (random weights, 224 px); for `inspect_backbone`."""
    if name.lower().endswith(MODEL_FILES):
        return _load_file(name, "", safe_mode)
    if hub.is_preset(name):
        return hub.load_preset(name)[0]
    if name == SMALL_CNN:
        return small_cnn(64)
    if _application_module(name) is None:
        build_backbone(name, "none", 224)  # raises the unknown-backbone error
    return getattr(keras.applications, name)(include_top=False, weights=None)


def _cut(model: keras.Model, layer: str, source: str) -> keras.Model:
    """`model` up to `layer`'s output (a layer name or -N from the end)."""
    if not layer:
        return model
    if not isinstance(model, keras.Model) or not getattr(model, "inputs", None):
        raise ConfigError(
            "layer",
            repr(layer),
            f"{source!r} is not a functional model, so it cannot be cut",
            "empty",
        )
    layers = model.layers
    if layer.lstrip("-").isdigit():
        index = int(layer)
        if not -len(layers) < index < 0:
            raise ConfigError(
                "layer",
                repr(layer),
                f"{source!r} has {len(layers)} layers",
                f"a layer name or -N with 1 <= N < {len(layers)} (-1: the last layer)",
            )
        chosen = layers[index]
    else:
        names = [each.name for each in layers]
        if layer not in names:
            nearest = difflib.get_close_matches(layer, names, n=5, cutoff=0.0)
            raise ConfigError(
                "layer",
                repr(layer),
                f"no such layer in {source!r}; nearest: {', '.join(nearest)} (python -m "
                f"tlloop.backbone {source} lists them all)",
            )
        chosen = layers[names.index(layer)]
    output = chosen.output
    if isinstance(output, (list, tuple, dict)) or len(output.shape) not in (2, 4):
        shape = getattr(output, "shape", type(output).__name__)
        raise ConfigError(
            "layer",
            repr(layer),
            f"its output {shape} is not a feature map (batch, H, W, C) or a vector (batch, C)",
            f"a layer with such an output (python -m tlloop.backbone {source} suggests cut points)",
        )
    return keras.Model(model.inputs, output, name=model.name)


def _wrap(
    model: keras.Model,
    image_size: int,
    source: str,
    channels: str,
    value_range: str,
    preprocessing: dict | None = None,
    pool: keras.layers.Layer | None = None,
) -> keras.Model:
    """The backbone: RGB pixels in [0, 255] at `image_size` -> [InputAdapter] -> `model` ->
    [`pool`]. The adapter does a preset's `preprocessing` (hub.load_preset: its resize
    included), else what `channels` and `value_range` ask, and resizes to a non-square native
    size; it is left out when it would change nothing. A square native size other than
    `image_size` is refused (`image_size` should be that size)."""
    shape = tuple(model.inputs[0].shape[1:]) if getattr(model, "inputs", None) else ()
    if len(model.inputs or ()) != 1 or len(shape) != 3 or shape[2] not in (1, 3):
        raise ConfigError(
            "source",
            repr(source),
            f"takes inputs of shape {shape}",
            "a model with one image input of 1 (grayscale) or 3 (RGB) channels",
        )
    native = "grayscale" if shape[2] == 1 else "rgb"
    if channels and channels != native:
        raise ConfigError(
            "channels",
            channels,
            f"{source!r} takes {shape[2]}-channel images {shape}",
            f"{native} or empty",
        )
    given = (image_size, image_size)
    adapter = dict(preprocessing or {"size": None, "scale": 1.0, "offset": 0.0})
    size = adapter.pop("size") or given
    size = tuple(s or t for s, t in zip(shape[:2], size, strict=True))  # native size wins
    if preprocessing is None and size != given and size[0] == size[1]:
        # A square network resized in the data pipeline sees what it was trained on; resizing
        # inside would only resample twice. Presets resize inside: their converter says so.
        raise ConfigError(
            "image_size",
            image_size,
            f"the backbone {source!r} takes inputs of shape {shape}",
            f"$image_size={size[0]} (images are resized to it as they load)",
        )
    parsed = parse_backbone_range(value_range)
    if parsed == "imagenet":
        if native != "rgb":
            raise ConfigError(
                "value_range",
                "imagenet",
                f"it normalises 3 RGB channels, and {source!r} takes grayscale",
                "0:255, 0:1, -1:1 or SCALE:OFFSET",
            )
        adapter["scale"], adapter["offset"] = imagenet_scale_offset()
    elif isinstance(parsed, tuple):
        adapter["scale"], adapter["offset"] = parsed
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = inputs
    identity = (adapter["scale"], adapter["offset"]) == (1.0, 0.0)
    if native != "rgb" or size != given or not identity:
        resize = size if size != given else None
        x = InputAdapter(native, **adapter, size=resize, name="input_adapter")(x)
    x = model(x)
    return keras.Model(inputs, pool(x) if pool is not None else x, name="backbone")


def _application(name: str, weights: str, image_size: int, layer: str = "") -> keras.Model:
    if weights not in ("imagenet", "none") and not os.path.isfile(weights):
        raise ConfigError("weights", repr(weights), "no such file", _WEIGHTS_ACCEPTED)
    try:
        base = getattr(keras.applications, name)(
            include_top=False,
            weights="imagenet" if weights == "imagenet" else None,
            input_shape=(image_size, image_size, 3),
        )
    except ValueError as error:  # e.g. "Input size must be at least 32x32"
        raise ConfigError(
            "image_size", image_size, f"{name} cannot take it: {_one_line(error)}"
        ) from None
    except Exception as error:  # the ImageNet download: no network, or a server error
        if weights != "imagenet":
            raise
        raise ConfigError(
            "weights",
            "imagenet",
            f"could not fetch {name}'s ImageNet weights ({_one_line(error)})",
            f"{_WEIGHTS_ACCEPTED} (download the file once where there is a network)",
        ) from None
    if weights not in ("imagenet", "none"):
        _load_weights(base, weights)
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = ApplicationPreprocess(name, name="preprocess")(inputs)
    return keras.Model(inputs, _cut(base, layer, name)(x), name="backbone")


def _load_file(path: str, weights: str, safe_mode: bool) -> keras.Model:
    """The full model saved in `path` (.keras; .h5/.hdf5 in the HDF5 layout of Keras 2 or 3)."""
    if not os.path.isfile(path):
        raise ConfigError(
            "source", repr(path), "no such file", f"a full model saved as {', '.join(MODEL_FILES)}"
        )
    if weights not in ("", "none"):
        raise ConfigError(
            "weights",
            repr(weights),
            "a model file brings its own weights",
            "'' (the file's weights) or none (random initialisation)",
        )
    try:
        loaded = keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
    except Exception as error:
        raise ConfigError(
            "source",
            repr(path),
            f"not a loadable Keras model ({_one_line(error)})",
            "a full model written by Model.save in Keras 2 or 3 (not weights only; pass "
            "$unsafe_deserialization only for files you trust that need code)",
        ) from None
    if not isinstance(loaded, keras.Model):
        raise ConfigError("source", repr(path), "holds no Keras model", "a full model")
    _warn_onednn(loaded, path)
    return _reinitialised(loaded, path) if weights == "none" else loaded


def _warn_onednn(model: keras.Model, path: str) -> None:
    """TF 2.21's oneDNN kernels kill the process (SIGSEGV, no Python exception) at the first
    gradient step of a Keras 2 HDF5 model with SeparableConv2D and BatchNormalization (see
    PITFALLS); the switch must be set before TensorFlow loads, so only a warning helps here."""
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0":
        return
    kinds = {type(layer).__name__ for layer in model._flatten_layers(include_self=False)}
    if {"SeparableConv2D", "BatchNormalization"} <= kinds:
        logging.warning(
            "%s has SeparableConv2D and BatchNormalization layers: if the process dies with "
            "SIGSEGV at the first training step (TensorFlow's oneDNN kernels), run it again "
            "with TF_ENABLE_ONEDNN_OPTS=0 in the environment",
            path,
        )


def _reinitialised(model: keras.Model, path: str) -> keras.Model:
    """`model`'s architecture with fresh weights from its layers' initializers (BatchNorm moving
    statistics included), as weights="none" gives every other backbone."""

    def fresh(layer: keras.layers.Layer) -> keras.layers.Layer:
        # A layer without weights has nothing to re-initialise; reusing it also spares a
        # Lambda's code a second deserialisation (which safe mode would refuse).
        return layer.__class__.from_config(layer.get_config()) if layer.weights else layer

    try:
        return keras.models.clone_model(model, clone_function=fresh, recursive=True)
    except ValueError as error:  # a subclassed model: Keras clones only functional/sequential
        raise ConfigError(
            "weights",
            "none",
            f"the .keras backbone {path!r} cannot be re-initialised ({_one_line(error)})",
            "'' (the file's weights), or a functional or sequential model",
        ) from None


def _load_weights(model: keras.Model, path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError("weights", repr(path), "no such file", _WEIGHTS_ACCEPTED)
    try:
        model.load_weights(path)
    except Exception as error:
        raise ConfigError(
            "weights",
            repr(path),
            f"does not fit the backbone ({_one_line(error)})",
            "a weights file saved from the same backbone at the same $image_size",
        ) from None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:197] + "..."
