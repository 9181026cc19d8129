"""Export: the trained model as .keras files to reuse in Keras and a SavedModel to serve.

WORKDIR/export/ holds:
- `model.keras`: the whole TransferModel (augment, backbone, head); logits out.
- `backbone.keras`: raw pixels in, features out; `--backbone` for another run, which is how a
  backbone trained by tlloop is transferred.
- `saved_model/`: signatures for serving, inference mode baked in (augmentation off, BatchNorm
  on its moving statistics, Dropout off). For an image model `serving_default` takes float32
  pixels in [0, 255], `serving_uint8` uint8 pixels; both any batch size and any image size
  (resized to the model's size the way training resized them, --resize), and return the
  task's serving outputs: for classification `probabilities` (batch, classes), `class_id` and
  `class_name`; for multi-label `probabilities` (batch, labels), `predicted` (multi-hot, over
  the threshold) and `labels` (the names over it, joined by ";"); for regression
  `predictions` in the targets' units. `class_names` (no input) returns every class name in
  label order. A model of other inputs (raw strings for a text backbone, token ids) gets one
  `serving_default` over its backbone's inputs.
- `model_float32.tflite`, `model_dynamic.tflite`, `model_int8.tflite` and `labels.txt`, when
  TFLite formats are asked for (`tflite=`, `--export_tflite`): see `tlloop.tflite`; each file
  checked with the LiteRT interpreter before it is written.

Load the .keras files with `keras.saving.load_model` after `import tlloop` (which registers
tlloop's classes). The SavedModel of an image model needs only TensorFlow; that of a text
model holds its KerasHub tokenizer's ops, so loading it needs `import tensorflow_text` first
(the tensorflow-text package, which keras-hub installs).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf
from absl import logging

from tlloop.data.pipeline import resize_images
from tlloop.models import INFERENCE, TransferModel
from tlloop.tasks import Classification, Task
from tlloop.workdir import write_atomic

if TYPE_CHECKING:
    import numpy as np

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
) -> dict[str, Any]:
    """Writes `model.keras`, `backbone.keras` and `saved_model/` into `directory`; returns
    their paths (`saved_model` None when the backbone declares no inputs to serve). Each
    replaces its previous version in one step, never half-written.

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

    formats = tflite_lib._check_formats(tflite)
    if formats:
        tflite_lib.image_size(model)
        if verify_images is None:
            raise ValueError("verify_images: needed with tflite=; accepted: evaluation images")
        if "int8" in formats and representative is None:
            raise ValueError("representative: int8 needs calibration images (training images)")
    task = task or Classification(class_names=class_names)
    paths = {
        "model": os.path.join(directory, "model.keras"),
        "backbone": os.path.join(directory, "backbone.keras"),
        "saved_model": os.path.join(directory, "saved_model"),
    }
    write_atomic(paths["model"], model.save)
    write_atomic(paths["backbone"], model.backbone.save)
    specs = _input_specs(model.backbone)
    if specs is None:
        logging.warning("no SavedModel: the backbone declares no inputs (build it functional)")
        paths["saved_model"] = None
        return paths
    _replace_directory(
        paths["saved_model"], lambda path: write_saved_model(model, path, task, resize, specs)
    )
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
    specs = specs if specs is not None else _input_specs(model.backbone)
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


def _input_specs(backbone):
    """TensorSpecs of the backbone's inputs (any batch size), in their structure; None if the
    backbone declares none (a subclassed model or a layer)."""
    inputs = getattr(backbone, "inputs", None)
    if not inputs:
        return None
    structure = getattr(backbone, "_inputs_struct", None)
    structure = structure if structure is not None else inputs

    def spec(tensor):
        name = getattr(tensor, "name", None) or None
        return tf.TensorSpec((None, *tensor.shape[1:]), tensor.dtype, name=name)

    return tf.nest.map_structure(spec, structure)


def _takes_images(specs) -> bool:
    return (
        isinstance(specs, tf.TensorSpec)
        and specs.shape.rank == 4
        and specs.shape[-1] == 3
        and specs.shape[1] is not None
    )


def _replace_directory(path: str, writer) -> None:
    """Calls `writer(tmp)` for a new directory, then puts it at `path` in place of the old one.

    The old directory is moved aside before the new one is renamed in, and deleted after: a
    failure while writing leaves the old one as it was.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    old = None
    try:
        writer(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 directories; exports are for sharing
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=".old-")
            os.replace(path, os.path.join(old, "previous"))
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old:
            shutil.rmtree(old, ignore_errors=True)
