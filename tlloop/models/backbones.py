"""Backbones: a keras.applications model by class name, a saved .keras model, or small_cnn.

Every backbone built here is a Keras model named "backbone" that takes raw RGB pixels in
[0, 255] (float32, shape (size, size, 3)) and returns a feature map or a feature vector: the
preprocessing a pretrained network expects is inside it, so nothing outside has to know it.
"""

from __future__ import annotations

import inspect
import os

import keras

from tlloop.config import ConfigError

SMALL_CNN = "small_cnn"
_WEIGHTS_ACCEPTED = "imagenet, none, or the path of a weights file"


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
    name: str, weights: str, image_size: int, *, safe_mode: bool = True
) -> keras.Model:
    """Builds the backbone `name` with `weights`; raises ConfigError naming the flag at fault."""
    if name.endswith(".keras"):
        return _from_file(name, weights, image_size, safe_mode)
    if name == SMALL_CNN:
        model = small_cnn(image_size)
        if weights == "imagenet":
            raise ConfigError(
                f"--weights=imagenet: {SMALL_CNN} has no ImageNet weights; accepted: none, or the "
                "path of a weights file saved from a small_cnn backbone"
            )
        if weights not in ("", "none"):
            _load_weights(model, weights)
        return model
    module = _application_module(name)
    if module is None:
        raise ConfigError(
            f"--backbone={name!r}: unknown backbone; accepted: {SMALL_CNN}, a path ending in "
            f".keras, or a keras.applications class name ({', '.join(application_names())})"
        )
    return _application(name, weights or "imagenet", image_size)


def _application(name: str, weights: str, image_size: int) -> keras.Model:
    if weights not in ("imagenet", "none") and not os.path.isfile(weights):
        raise ConfigError(f"--weights={weights!r}: no such file; accepted: {_WEIGHTS_ACCEPTED}")
    try:
        base = getattr(keras.applications, name)(
            include_top=False,
            weights="imagenet" if weights == "imagenet" else None,
            input_shape=(image_size, image_size, 3),
        )
    except ValueError as error:  # e.g. "Input size must be at least 32x32"
        raise ConfigError(
            f"--image_size={image_size}: {name} cannot take it: {_one_line(error)}"
        ) from None
    except Exception as error:  # the ImageNet download: no network, or a server error
        if weights != "imagenet":
            raise
        raise ConfigError(
            f"--weights=imagenet: could not fetch {name}'s ImageNet weights ({_one_line(error)}); "
            f"accepted: {_WEIGHTS_ACCEPTED} (download the file once where there is a network)"
        ) from None
    if weights not in ("imagenet", "none"):
        _load_weights(base, weights)
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = ApplicationPreprocess(name, name="preprocess")(inputs)
    return keras.Model(inputs, base(x), name="backbone")


def _from_file(path: str, weights: str, image_size: int, safe_mode: bool) -> keras.Model:
    if not os.path.isfile(path):
        raise ConfigError(f"--backbone={path!r}: no such file; accepted: a saved .keras model")
    if weights not in ("", "none"):
        raise ConfigError(
            f"--weights={weights!r}: a .keras backbone brings its own weights; accepted: '' (the "
            "file's weights) or none (random initialisation)"
        )
    try:
        loaded = keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
    except Exception as error:
        raise ConfigError(
            f"--backbone={path!r}: not a loadable Keras model ({_one_line(error)}); accepted: a "
            "file written by keras.Model.save (pass --unsafe_deserialization only for files you "
            "trust that need code)"
        ) from None
    shape = tuple(loaded.inputs[0].shape[1:]) if getattr(loaded, "inputs", None) else ()
    fits = len(shape) == 3 and shape[2] == 3 and all(d in (None, image_size) for d in shape[:2])
    if not fits:
        raise ConfigError(
            f"--image_size={image_size}: the backbone {path!r} takes inputs of shape {shape}; "
            "accepted: the size that file was built for (RGB, 3 channels)"
        )
    if weights == "none":
        loaded = _reinitialised(loaded, path)
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    return keras.Model(inputs, loaded(inputs), name="backbone")


def _reinitialised(model: keras.Model, path: str) -> keras.Model:
    """`model`'s architecture with fresh weights from its layers' initializers (BatchNorm moving
    statistics included), as --weights=none gives every other backbone."""

    def fresh(layer: keras.layers.Layer) -> keras.layers.Layer:
        # A layer without weights has nothing to re-initialise; reusing it also spares a
        # Lambda's code a second deserialisation (which safe mode would refuse).
        return layer.__class__.from_config(layer.get_config()) if layer.weights else layer

    try:
        return keras.models.clone_model(model, clone_function=fresh, recursive=True)
    except ValueError as error:  # a subclassed model: Keras clones only functional/sequential
        raise ConfigError(
            f"--weights=none: the .keras backbone {path!r} cannot be re-initialised "
            f"({_one_line(error)}); accepted: '' (the file's weights), or a functional or "
            "sequential model"
        ) from None


def _load_weights(model: keras.Model, path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"--weights={path!r}: no such file; accepted: {_WEIGHTS_ACCEPTED}")
    try:
        model.load_weights(path)
    except Exception as error:
        raise ConfigError(
            f"--weights={path!r}: does not fit the backbone ({_one_line(error)}); accepted: a "
            "weights file saved from the same backbone at the same --image_size"
        ) from None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:197] + "..."
