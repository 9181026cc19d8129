"""Export: the trained model as .keras files to reuse in Keras and a SavedModel to serve.

WORKDIR/export/ holds:
- `model.keras`: the whole TransferModel (augment, backbone, head); logits out.
- `backbone.keras`: raw pixels in, features out; another run's backbone `source`, which is
  how a backbone trained by tlloop is transferred.
- `saved_model/`: signatures for serving, inference mode baked in (augmentation off, BatchNorm
  on its moving statistics, Dropout off). For an image model `serving_default` takes float32
  pixels in [0, 255], `serving_uint8` uint8 pixels; both any batch size and any image size
  (resized to the model's size the way training resized them, `resize`), and return the
  task's serving outputs: for classification `probabilities` (batch, classes), `class_id` and
  `class_name`; for multi-label `probabilities` (batch, labels), `predicted` (multi-hot, over
  the threshold) and `labels` (the names over it, joined by ";"); for regression
  `predictions` in the targets' units. `class_names` (no input) returns every class name in
  label order. A model of other inputs (raw strings for a text backbone, token ids) gets one
  `serving_default` over its backbone's inputs. A backbone that declares no inputs (a
  subclassed model) is served the `inputs` given (`Trainer.fit` gives its training inputs').
- `model_float32.tflite`, `model_dynamic.tflite`, `model_int8.tflite` and `labels.txt`, when
  TFLite formats are asked for (`tflite=`, `checkpoint.export_tflite`): see `tlloop.tflite`;
  each file checked with the LiteRT interpreter before it is written.

Load the .keras files with `keras.saving.load_model` after `import tlloop` (which registers
tlloop's classes) and the modules that register yours. The SavedModel of an image model needs
only TensorFlow; that of a text model holds its KerasHub tokenizer's ops, so loading it needs
`import tensorflow_text` first (the tensorflow-text package, which keras-hub installs).
`check_export` refuses, before anything is written, a model whose .keras files would not load.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlloop.data.images import resize_images
from tlloop.models import INFERENCE, TransferModel
from tlloop.models.walk import declared_input_spec
from tlloop.tasks import Classification, Task
from tlloop.workdir import replace_directory, write_atomic

SIGNATURES = ("serving_default", "serving_uint8", "class_names")  # of an image classifier


def export_model(
    model: TransferModel,
    directory: str,
    class_names: tuple[str, ...] | list[str] | None = None,
    resize: str = "squash",
    *,
    task: Task | None = None,
    tflite: Sequence[str] | str = (),
    verify_images: np.ndarray | None = None,
    representative: np.ndarray | None = None,
    min_agreement: Mapping[str, float] | None = None,
    inputs: Any = None,
) -> dict[str, Any]:
    """Writes `model.keras`, `backbone.keras` and `saved_model/` into `directory`; returns
    their paths. Each replaces its previous version in one step, never half-written.

    First `check_export` (nothing written when it refuses): the .keras files must load back
    with `keras.saving.load_model`, and the SavedModel serves the inputs the backbone declares,
    or `inputs` (TensorSpecs of one batch of inputs, e.g. `tf.TensorSpec((None, 224, 224, 3))`)
    for a backbone that declares none (a subclassed model). A write that fails raises
    `ExportError` naming what was not written.

    The SavedModel serves the `task`'s outputs (default: classification with `class_names`).
    A model of RGB images gets the image signatures (resizing inputs as `resize` did in
    training); any other model one `serving_default` signature over its backbone's inputs.

    `tflite`: TFLite formats (float32, dynamic, int8) to write as well, each checked on
    `verify_images` (evaluation images (N, S, S, 3), uint8 or float in [0, 255]; required with
    `tflite`) against `min_agreement` ({format: fraction}, defaults 0.99 and 0.97 for int8);
    int8 calibrates on `representative` (a few hundred training images). The result's
    "tflite" holds each file's path, size, latency and agreement. Raises
    `tlloop.tflite.TFLiteError` (one line) when a conversion fails or a file disagrees, after
    the other exports are written; ValueError naming the argument at fault.
    """
    from tlloop import tflite as tflite_lib  # TensorFlow Lite's converter loads only when used

    formats = tflite_lib.check_formats(tflite)
    if formats:
        tflite_lib.image_size(model)
        if verify_images is None:
            raise ValueError("verify_images: needed with tflite=; accepted: evaluation images")
        if "int8" in formats and representative is None:
            raise ValueError("representative: int8 needs calibration images (training images)")
    specs = check_export(model, inputs)
    task = task or Classification(class_names=class_names)
    paths = {
        "model": os.path.join(directory, "model.keras"),
        "backbone": os.path.join(directory, "backbone.keras"),
        "saved_model": os.path.join(directory, "saved_model"),
    }
    writers = {
        "model": lambda: write_atomic(paths["model"], model.save),
        "backbone": lambda: write_atomic(paths["backbone"], model.backbone.save),
        "saved_model": lambda: replace_directory(
            paths["saved_model"], lambda path: write_saved_model(model, path, task, resize, specs)
        ),
    }
    for done, write in enumerate(writers.values()):
        try:
            write()
        except Exception as error:  # any failure: say which files are missing, and why
            missing = [os.path.basename(paths[n]) for n in list(writers)[done:]]
            raise ExportError(missing, error) from error
    if formats:
        paths["tflite"] = tflite_lib.export_tflite(
            model,
            directory,
            formats,
            images=verify_images,
            representative=representative,
            task=task,
            resize=resize,
            min_agreement=min_agreement,
        )
    return paths


def write_saved_model(
    model: TransferModel, path: str, task: Task, resize: str = "squash", specs=None
) -> None:
    """Writes the SavedModel described in this module's docstring to `path`."""
    specs = specs if specs is not None else declared_input_spec(model.backbone)
    archive = keras.export.ExportArchive()
    archive.track(model)
    if _takes_images(specs):
        size = int(specs.shape[1])
        class_names = getattr(task, "class_names", None)
        names = tf.constant(list(class_names or ()), tf.string)

        def serve(images):
            pixels = resize_images(images, size, resize)
            return task.serving_outputs(model.forward(pixels, INFERENCE))

        for name, dtype in (("serving_default", tf.float32), ("serving_uint8", tf.uint8)):
            spec = tf.TensorSpec((None, None, None, 3), dtype, name="images")
            archive.add_endpoint(name, serve, input_signature=[spec])
        archive.add_endpoint("class_names", lambda: {"class_names": names}, input_signature=[])
    else:

        def serve_any(inputs):
            return task.serving_outputs(model.forward(inputs, INFERENCE))

        archive.add_endpoint("serving_default", serve_any, input_signature=[specs])
    archive.write_out(path, verbose=False)


class ExportError(RuntimeError):
    """An export file could not be written: `missing` names the files not written (this one
    and the ones after it), `reason` says why in one line."""

    def __init__(self, missing: list[str], error: Exception) -> None:
        self.missing = missing
        self.reason = _first_line(getattr(error, "strerror", None) or error)
        super().__init__(f"{', '.join(missing)} not written: {self.reason}")


def check_export(model: TransferModel, inputs: Any = None) -> Any:
    """Checks, before anything is written (and before training), that `export_model` can
    write every file for `model`; returns the input specs its SavedModel will serve.

    The .keras files: the model's config makes the Keras serialization round trip
    `keras.saving.load_model` makes (`serialize_keras_object`, then `deserialize_keras_object`
    with safe mode off, as a model with Lambda layers is loaded): every class of the
    model, at any depth, must be Keras' own or registered
    (`keras.saving.register_keras_serializable`), and give its `__init__` arguments in
    `get_config`. The round trip builds a copy of the model (the random state is put back
    after it). The SavedModel: the backbone's declared inputs, or `inputs` (the forward pass
    is traced on them once).

    Raises ValueError in one line naming the class at fault and the fix."""
    specs = declared_input_spec(model.backbone)
    if specs is None:
        if inputs is None:
            raise ValueError(
                "export: the backbone declares no inputs, so the SavedModel has no signature "
                "to serve; accepted: inputs=tf.TensorSpec((None, ...)) of one batch, a "
                "functional backbone, or export=False"
            )
        specs = inputs
        try:  # the serving function, traced as the SavedModel will trace it
            tf.function(lambda x: model.forward(x, INFERENCE)).get_concrete_function(specs)
        except Exception as error:
            raise ValueError(
                f"export: the model cannot serve a batch of any size of the inputs {specs} "
                f"({_first_line(error)}); accepted: a backbone that takes them, or "
                "export=False"
            ) from None
    problem = _serialization_problem(model)
    if problem:
        raise ValueError(f"export: {problem}, or export=False")
    return specs


_FIX_REGISTER = (
    "is not registered with Keras, so the exported .keras files would not load; accepted: "
    "decorate the class with @keras.saving.register_keras_serializable()"
)
_FIX_CONFIG = (
    "cannot be saved: its __init__ takes arguments Keras cannot serialize and its get_config "
    "does not give them; accepted: give it a get_config returning its __init__ arguments (and "
    "a from_config rebuilding them)"
)


def _serialization_problem(model: TransferModel) -> str | None:
    """Why `model`'s config does not survive a Keras serialization round trip (naming the
    class at fault first), or None when it does."""
    try:
        config = keras.saving.serialize_keras_object(model)
    except Exception as error:
        found = re.search(r"Object (\w+) was created by passing", str(error))
        name = found.group(1) if found else _failing_config(model)
        if name:
            return f"class {name} {_FIX_CONFIG}"
        return f"the model's config cannot be made ({_first_line(error)}); {_FIX_CONFIG}"
    unknown = _unregistered(config)
    if unknown:
        return f"class {unknown} {_FIX_REGISTER}"
    with _random_state_kept():
        try:
            keras.saving.deserialize_keras_object(config, safe_mode=False)
        except Exception as error:
            found = re.search(r"Could not locate (?:class|function) '([^']+)'", str(error))
            if found:
                return f"{found.group(1)} {_FIX_REGISTER}"
            return (
                f"the model's saved config does not load back ({_first_line(error)}); accepted: "
                "classes whose get_config gives their __init__ arguments and whose from_config "
                "rebuilds them"
            )
    return None


def _failing_config(model: keras.layers.Layer) -> str | None:
    """The class of the last layer of `model` (walked depth first, the model itself first)
    whose get_config raises: the deepest on its branch, when Keras' message names none."""
    failing = None
    for layer in model._flatten_layers(include_self=True, recursive=True):
        try:
            layer.get_config()
        except Exception:
            failing = type(layer).__qualname__
    return failing


_KERAS_PACKAGES = ("keras", "keras_hub", "keras_cv", "keras_nlp")


def _unregistered(config) -> str | None:
    """The first class named in a serialized `config` that deserialization cannot find: not
    from Keras' own packages and not registered. As `module.Class`."""
    if isinstance(config, dict):
        module, name = config.get("module"), config.get("class_name")
        if isinstance(module, str) and isinstance(name, str) and module != "builtins":
            registered = config.get("registered_name") or name
            own = module.split(".", 1)[0] in _KERAS_PACKAGES
            if not own and keras.saving.get_registered_object(registered) is None:
                return f"{module}.{name}"
        values = config.values()
    elif isinstance(config, (list, tuple)):
        values = config
    else:
        return None
    for value in values:
        found = _unregistered(value)
        if found:
            return found
    return None


@contextlib.contextmanager
def _random_state_kept():
    """Python's and numpy's global random state as they were: Keras seeds layers and
    initializers made without a seed from Python's `random`, and a check must not change what
    a seeded run draws afterwards."""
    python, numpy_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)


def _first_line(error) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = lines[0] if lines else type(error).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _takes_images(specs) -> bool:
    return (
        isinstance(specs, tf.TensorSpec)
        and specs.shape.rank == 4
        and specs.shape[-1] == 3
        and specs.shape[1] is not None
    )
