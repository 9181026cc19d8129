"""TFLite export for devices: conversion, and a check of every file with the LiteRT interpreter.

A converted file holds the inference-mode model (augmentation gone, BatchNorm on its moving
statistics, Dropout off) with the served preprocessing inside, and the SavedModel's two image
signatures at the model's image size S (the batch size, 1 in the file, may be resized):
`serving_uint8` takes `images` uint8 (1, S, S, 3), the usual device input, and
`serving_default` takes `images` float32 (1, S, S, 3) in [0, 255]; both return
`probabilities` (batch, classes). The weights are stored once. Formats:

- `float32`: float weights and computation.
- `dynamic`: dynamic-range quantization (int8 weights, float activations), about 4x smaller.
- `int8`: full integer (int8 weights and activations, calibrated on representative images):
  `serving_uint8` is integer in and out, uint8 images in, uint8 probabilities out (real
  value = scale x (q - zero_point), from the output's quantization parameters);
  `serving_default` quantizes its float input inside.

Each file is checked on evaluation images against the Keras model given the same pixels,
through both signatures: top-1 agreement and the largest difference of any probability (the
worse of the two signatures), the file's size and the interpreter's mean latency per image
through `serving_uint8` (batch 1, one thread) on this machine. The interpreter is
the optional `ai-edge-litert` package (`pip install "tlloop[tflite]"`).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tlloop.config import TFLITE_FORMATS
from tlloop.data.images import resize_images
from tlloop.models import INFERENCE
from tlloop.tasks import Classification, Task
from tlloop.workdir import write_atomic, write_text

FORMATS = TFLITE_FORMATS
SIGNATURE = "serving_uint8"  # the device input: what `run` and the latency use
SIGNATURES = {"serving_uint8": tf.uint8, "serving_default": tf.float32}
DEFAULT_MIN_AGREEMENT = {"float32": 0.99, "dynamic": 0.99, "int8": 0.97}


class TFLiteError(RuntimeError):
    """A conversion failed (`converted` False) or a converted file disagrees with the Keras
    model; one line. `reports`: the files that passed and were written (as `export_tflite`
    returns them)."""

    def __init__(
        self, message: str, reports: Mapping[str, dict] | None = None, *, converted: bool = True
    ) -> None:
        super().__init__(message)
        self.reports = dict(reports or {})
        self.converted = converted


def file_name(fmt: str) -> str:
    """The file a format is written to in the export directory."""
    return f"model_{fmt}.tflite"


def image_size(model) -> int:
    """The square image size S the model's backbone takes (images (B, S, S, 3)).

    Raises ValueError when the backbone declares no such input (TFLite files are made for
    image classifiers only)."""
    inputs = getattr(model.backbone, "inputs", None) or []
    shape = tuple(inputs[0].shape) if len(inputs) == 1 else ()
    if len(shape) != 4 or shape[-1] != 3 or shape[1] is None or shape[1] != shape[2]:
        raise ValueError(
            f"model: the backbone takes {shape or 'no declared input'}; accepted for TFLite: "
            "one input of square RGB images (batch, S, S, 3), as a functional backbone declares"
        )
    return int(shape[1])


def check_model(model, task: Task | None = None) -> int:
    """The image size S of `model` if it and `task` (default: Classification) can be exported
    to TFLite: a Classification task, a backbone of one input of square RGB images. Raises
    ValueError naming the argument otherwise (a Trainer checks this before training)."""
    if not isinstance(task or Classification(), Classification):
        raise ValueError(
            f"task: TFLite export serves a Classification task's probabilities, not a "
            f"{type(task).__name__}'s; accepted: tlloop.Classification, or no TFLite export"
        )
    return image_size(model)


def convert(
    model,
    formats: Sequence[str],
    *,
    task: Task | None = None,
    resize: str = "squash",
    representative: np.ndarray | None = None,
) -> dict[str, bytes]:
    """The TFLite flatbuffer of `model` in each of `formats` (see the module docstring).

    `representative`: images (N, S, S, 3), uint8 or float in [0, 255], for int8's calibration
    (a few hundred of the training images). Raises ValueError naming the argument at fault, and
    TFLiteError (one line, naming the format) when the converter fails.
    """
    formats = check_formats(formats)
    task = task or Classification()
    size = check_model(model, task)
    if "int8" in formats:
        if representative is None or len(representative) == 0:
            raise ValueError(
                "representative: int8 needs calibration images; accepted: (N, S, S, 3)"
            )
        representative = as_uint8(representative)
        if representative.shape[1:] != (size, size, 3):
            raise ValueError(
                f"representative: images of shape {representative.shape[1:]}; accepted: "
                f"({size}, {size}, 3), the model's image size"
            )

    def serve(images):
        # The served preprocessing (a no-op resize at this size, kept so the file computes
        # what the SavedModel does), the model in inference mode, probabilities out.
        # The shape "crop" and "pad" compute is only known when they run: a reshape states
        # it, so the converter sees fixed-size convolutions (TFLite refuses MobileNetV2's
        # first Conv2D on an unknown spatial shape, and has no EnsureShape op).
        pixels = tf.reshape(resize_images(images, size, resize), (-1, size, size, 3))
        outputs = model.forward(pixels, INFERENCE)
        return {"probabilities": task.serving_outputs(outputs)["probabilities"]}

    converted = {}
    with tempfile.TemporaryDirectory(prefix="tlloop-tflite-") as saved:
        # A SavedModel signature (rather than a bare concrete function) gives the file a
        # named signature; ExportArchive also tracks the augmentation layers' RNG state that
        # the traced function captures, which tf.saved_model.save refuses.
        archive = keras.export.ExportArchive()
        archive.track(model)
        for name, dtype in SIGNATURES.items():
            spec = tf.TensorSpec((None, size, size, 3), dtype, name="images")
            archive.add_endpoint(name, serve, input_signature=[spec])
        archive.write_out(saved, verbose=False)
        for fmt in formats:
            converter = tf.lite.TFLiteConverter.from_saved_model(
                saved, signature_keys=list(SIGNATURES)
            )
            if fmt != "float32":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            if fmt == "int8":
                converter.representative_dataset = _calibration(representative)
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                # Integer output; serving_uint8's input already is integer, and
                # inference_input_type would apply to serving_default's float input only.
                converter.inference_output_type = tf.uint8
            try:
                with warnings.catch_warnings():
                    # int8 calibration runs TF's own deprecated tf.lite.Interpreter inside
                    # the converter: nothing a user can act on.
                    warnings.filterwarnings("ignore", "(?s).*tf.lite.Interpreter is deprecated")
                    converted[fmt] = converter.convert()
            except Exception as error:  # the converter raises many types, all mean "failed"
                raise TFLiteError(
                    f"TFLite {fmt}: conversion failed ({_first_line(error)})", converted=False
                ) from None
    return converted


def as_uint8(images) -> np.ndarray:
    """`images` (float in [0, 255] or uint8) as uint8, rounded and clipped."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def run(
    tflite_model: bytes | str, images: np.ndarray, signature: str = SIGNATURE
) -> tuple[np.ndarray, float]:
    """Runs a tlloop TFLite file (bytes or a path) on `images` (N, S, S, 3) in [0, 255], one
    image per call as on a device, through `signature` (serving_uint8 or serving_default,
    which get the images as uint8 or float32); returns the probabilities (N, classes) as
    float32 (dequantized for int8) and the mean seconds per image (one thread, after one
    warm-up call)."""
    interpreter = _interpreter(tflite_model)
    runner = interpreter.get_signature_runner(signature)
    scale, zero_point = runner.get_output_details()["probabilities"]["quantization"]
    images = as_uint8(images)
    if SIGNATURES[signature] != tf.uint8:
        images = images.astype(np.float32)
    runner(images=images[:1])  # the first call allocates and plans
    outputs = []
    start = time.perf_counter()
    for i in range(len(images)):
        outputs.append(runner(images=images[i : i + 1])["probabilities"])
    seconds = (time.perf_counter() - start) / max(len(images), 1)
    probabilities = np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)
    if scale:  # integer output
        probabilities = scale * (probabilities.astype(np.float32) - zero_point)
    return probabilities.astype(np.float32), seconds


def input_shape(tflite_model: bytes | str) -> tuple[int, ...]:
    """The image shape (1, S, S, 3) a tlloop TFLite file's signatures take; ValueError if the
    file has no `serving_uint8` signature taking `images`."""
    interpreter = _interpreter(tflite_model)
    try:
        details = interpreter.get_signature_runner(SIGNATURE).get_input_details()["images"]
    except (ValueError, KeyError):
        raise ValueError(
            f"no {SIGNATURE!r} signature taking 'images'; accepted: a file tlloop exported"
        ) from None
    return tuple(int(d) for d in details["shape"])


def keras_probabilities(
    model, images: np.ndarray, *, task: Task | None = None, resize: str = "squash"
) -> np.ndarray:
    """The Keras model's probabilities for uint8 `images`, as the TFLite files compute them."""
    task = task or Classification()
    size = image_size(model)

    @tf.function
    def serve(batch):
        outputs = model.forward(resize_images(batch, size, resize), INFERENCE)
        return task.serving_outputs(outputs)["probabilities"]

    parts = [serve(tf.constant(as_uint8(images[i : i + 256]))) for i in range(0, len(images), 256)]
    return np.concatenate([p.numpy() for p in parts]).astype(np.float32)


def verify(tflite_model: bytes | str, images: np.ndarray, expected: np.ndarray) -> dict:
    """How a TFLite file compares with the Keras model's `expected` probabilities on
    `images` (N >= 1, uint8 or float in [0, 255]), through each signature: `agreement` (the
    fraction of images with the same top-1 class) and `max_probability_difference`, each the
    worse of the two signatures, and per signature under `signatures`; `bytes`; `latency_ms`
    (mean per image, serving_uint8); `examples`."""
    size = len(tflite_model) if isinstance(tflite_model, bytes) else os.path.getsize(tflite_model)
    report: dict[str, Any] = {"bytes": int(size), "examples": len(images), "signatures": {}}
    for signature in SIGNATURES:
        probabilities, seconds = run(tflite_model, images, signature)
        report["signatures"][signature] = {
            "agreement": float(np.mean(probabilities.argmax(-1) == expected.argmax(-1))),
            "max_probability_difference": float(np.abs(probabilities - expected).max()),
        }
        if signature == SIGNATURE:
            report["latency_ms"] = round(seconds * 1e3, 4)
    checks = report["signatures"].values()
    report["agreement"] = min(c["agreement"] for c in checks)
    report["max_probability_difference"] = max(c["max_probability_difference"] for c in checks)
    return report


def export_tflite(
    model,
    directory: str,
    formats: Sequence[str],
    *,
    images: np.ndarray,
    representative: np.ndarray | None = None,
    task: Task | None = None,
    resize: str = "squash",
    min_agreement: Mapping[str, float] | None = None,
) -> dict[str, dict]:
    """Converts `model` to each of `formats`, checks each file on the evaluation `images`
    (uint8 or float in [0, 255], (N, S, S, 3), N >= 1) and writes the files that pass to
    `directory/model_FORMAT.tflite` (with `labels.txt`, one class name a line, when the task
    names its classes). Returns {format: verify's report + "path"}.

    `min_agreement`: {format: fraction} (defaults: DEFAULT_MIN_AGREEMENT). Raises TFLiteError
    (one line) when a conversion fails or a file agrees less than its threshold, after
    writing the files that passed; nothing else in `directory` is touched.
    """
    formats = check_formats(formats)
    task = task or Classification()
    thresholds = {**DEFAULT_MIN_AGREEMENT, **(min_agreement or {})}
    images = as_uint8(images)
    if len(images) == 0:
        raise ValueError("images: empty; accepted: evaluation images (N, S, S, 3) to check with")
    expected = keras_probabilities(model, images, task=task, resize=resize)
    converted = convert(model, formats, task=task, resize=resize, representative=representative)
    reports, failures = {}, []
    for fmt, content in converted.items():
        report = verify(content, images, expected)
        logging.info("TFLite %s: %s", fmt, describe(fmt, report))
        if not report["agreement"] >= thresholds[fmt]:
            failures.append(
                f"TFLite {fmt}: top-1 agreement with the Keras model {report['agreement']:.4f} "
                f"< {thresholds[fmt]} on {report['examples']} evaluation images (max "
                f"probability difference {report['max_probability_difference']:.4f}); not written"
            )
            continue
        path = os.path.join(directory, file_name(fmt))
        write_atomic(path, lambda tmp, content=content: _write_bytes(tmp, content))
        reports[fmt] = {"path": path, **report}
    if reports and task.class_names:
        write_text(
            os.path.join(directory, "labels.txt"), "".join(f"{n}\n" for n in task.class_names)
        )
    if failures:
        raise TFLiteError("; ".join(failures), reports)
    return reports


def describe(fmt: str, report: Mapping[str, Any]) -> str:
    """One line: a file's size, latency and agreement."""
    return (
        f"{fmt:8s} {report['bytes'] / 1024:9.1f} KiB  {report['latency_ms']:8.3f} ms/image  "
        f"top-1 agreement {report['agreement']:.4f} on {report['examples']} images  "
        f"max |dp| {report['max_probability_difference']:.2e}"
    )


def images_of(examples, limit: int | None = None) -> np.ndarray:
    """The first `limit` (default: all) input images of tlloop Examples as uint8 (N, S, S, 3)."""
    dataset = examples.ordered().map(lambda x, y: x)
    if limit is not None:
        dataset = dataset.take(limit)
    parts = [as_uint8(batch) for batch in dataset.batch(256).as_numpy_iterator()]
    return np.concatenate(parts) if parts else np.zeros((0, 0, 0, 3), np.uint8)


def interpreter_available() -> bool:
    """Whether the LiteRT interpreter (ai-edge-litert) can be imported."""
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreter(tflite_model: bytes | str):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise TFLiteError(
            'the LiteRT interpreter is not installed; accepted: pip install "tlloop[tflite]"'
        ) from None
    if isinstance(tflite_model, bytes):
        return Interpreter(model_content=tflite_model, num_threads=1)
    return Interpreter(model_path=tflite_model, num_threads=1)


def _calibration(images: np.ndarray):
    """Calibration samples for every signature: (signature, inputs) pairs, as the converter
    takes them for a file with several signatures."""

    def generate() -> Iterable[tuple[str, dict[str, np.ndarray]]]:
        for i in range(len(images)):
            image = images[i : i + 1]
            yield "serving_uint8", {"images": image}
            yield "serving_default", {"images": image.astype(np.float32)}

    return generate


def check_formats(formats: Sequence[str] | str) -> tuple[str, ...]:
    """The TFLite `formats` (a comma list or a sequence), each known and given once; raises
    ValueError naming `formats` otherwise."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    formats = tuple(filter(None, (str(item).strip() for item in items)))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or len(set(formats)) != len(formats):
        raise ValueError(
            f"formats: {list(formats)}; accepted: any of {', '.join(FORMATS)}, each once"
        )
    return formats


def _write_bytes(path: str, content: bytes) -> None:
    with open(path, "wb") as file:
        file.write(content)


def _first_line(error: Exception) -> str:
    """The converter's reason in one short line: its first "'tf.Op' op ..." if it names one
    (the MLIR location before it is hundreds of characters of call sites)."""
    text = str(error)
    match = re.search(r"('[\w.]+' op [^\n]*)", text)
    if match:
        return match.group(1).strip()[:200]
    lines = text.strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:200]
