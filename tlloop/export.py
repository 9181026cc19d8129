"""Export: the trained model as .keras files to reuse in Keras and a SavedModel to serve.

WORKDIR/export/ holds:
- `model.keras`: the whole TransferModel (augment, backbone, head); logits out.
- `backbone.keras`: raw pixels in, features out; `--backbone` for another run, which is how a
  backbone trained by tlloop is transferred.
- `saved_model/`: signatures for serving, inference mode baked in (augmentation off, BatchNorm
  on its moving statistics, Dropout off). `serving_default` takes float32 pixels in [0, 255],
  `serving_uint8` uint8 pixels; both any batch size and any image size (resized to the
  model's size the way training resized them, --resize), and return `probabilities` (batch,
  classes), `class_id` and `class_name`. `class_names` (no input) returns every class name in
  label order.

Load the .keras files with `keras.saving.load_model` after `import tlloop` (which registers
tlloop's classes); the SavedModel needs only TensorFlow.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import keras
import tensorflow as tf

from tlloop.data.pipeline import resize_images
from tlloop.models import INFERENCE, TransferModel
from tlloop.workdir import write_atomic

SIGNATURES = ("serving_default", "serving_uint8", "class_names")


def export_model(
    model: TransferModel,
    directory: str,
    class_names: tuple[str, ...] | list[str],
    resize: str = "squash",
) -> dict[str, str]:
    """Writes `model.keras`, `backbone.keras` and `saved_model/` (resizing inputs as --resize
    did in training) into `directory`; returns their paths. Each replaces its previous version
    in one step, never half-written."""
    paths = {
        "model": os.path.join(directory, "model.keras"),
        "backbone": os.path.join(directory, "backbone.keras"),
        "saved_model": os.path.join(directory, "saved_model"),
    }
    write_atomic(paths["model"], model.save)
    write_atomic(paths["backbone"], model.backbone.save)
    _replace_directory(
        paths["saved_model"], lambda path: write_saved_model(model, path, class_names, resize)
    )
    return paths


def write_saved_model(
    model: TransferModel,
    path: str,
    class_names: tuple[str, ...] | list[str],
    resize: str = "squash",
) -> None:
    """Writes the SavedModel described in this module's docstring to `path`."""
    size = int(model.backbone.inputs[0].shape[1])
    names = tf.constant(list(class_names), tf.string)

    def serve(images):
        pixels = resize_images(images, size, resize)
        logits = model.forward(pixels, INFERENCE)
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
        class_id = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return {
            "probabilities": probabilities,
            "class_id": class_id,
            "class_name": tf.gather(names, class_id),
        }

    archive = keras.export.ExportArchive()
    archive.track(model)
    for name, dtype in (("serving_default", tf.float32), ("serving_uint8", tf.uint8)):
        spec = tf.TensorSpec((None, None, None, 3), dtype, name="images")
        archive.add_endpoint(name, serve, input_signature=[spec])
    archive.add_endpoint("class_names", lambda: {"class_names": names}, input_signature=[])
    archive.write_out(path, verbose=False)


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
