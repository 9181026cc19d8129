"""Evaluation and prediction of a model over whole datasets, in training and after it."""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

from tlloop.checkpoints import load_trained_model
from tlloop.config import ConfigError, RunConfig
from tlloop.data.examples import as_examples
from tlloop.data.text import is_text, load_task_data
from tlloop.distribute import distribute_batches
from tlloop.models import INFERENCE, ModeTable, TransferModel
from tlloop.models.walk import declared_input_spec
from tlloop.steps import CompiledSteps, Metrics, compile_eval
from tlloop.tasks import Classification, MultiLabel, Regression, Task


def evaluate(eval_step: CompiledSteps, metrics: Metrics, batches, steps: int) -> dict:
    """Loss, the task's metrics and the example count (and the confusion matrix, if `metrics`
    keeps it) over the `steps` batches of `batches`, every submodule in inference mode."""
    metrics.reset()
    eval_step(iter(batches), steps)
    return metrics.result()


def evaluate_model(
    model: TransferModel,
    data,
    *,
    task: Task | None = None,
    batch_size: int = 32,
    strategy: tf.distribute.Strategy | None = None,
) -> dict:
    """The `task`'s loss and metrics (default: classification) of `model` over every example of
    `data` exactly once (arrays, a finite tf.data.Dataset or Examples; the last batch padded
    and masked), every submodule in inference mode, under `strategy` (default: the current)."""
    strategy = strategy or tf.distribute.get_strategy()
    task = task or Classification()
    examples = as_examples(data, argument="data", inputs=declared_input_spec(model.backbone))
    with strategy.scope():
        metrics = Metrics(task=task, evaluation=True)
        step = compile_eval(model, ModeTable(), metrics, task=task)
    batches = distribute_batches(
        strategy,
        lambda part: examples.eval_batches(batch_size, part),
        positionable=examples.positionable,
        batch_size=batch_size,
    )
    return evaluate(step, metrics, batches, examples.eval_steps(batch_size))


def predict(model: TransferModel, inputs, *, batch_size: int = 32):
    """The model's outputs for `inputs` (an array or a structure of arrays, or a finite
    tf.data.Dataset of inputs), every submodule in inference mode, in batches of
    `batch_size`; returns numpy arrays in the structure of the outputs."""
    dataset = (
        inputs
        if isinstance(inputs, tf.data.Dataset)
        else tf.data.Dataset.from_tensor_slices(inputs)
    )
    forward = tf.function(lambda x: model.forward(x, INFERENCE))
    parts = [
        tf.nest.map_structure(np.asarray, forward(batch)) for batch in dataset.batch(batch_size)
    ]
    return tf.nest.map_structure(lambda *a: np.concatenate(a), *parts)


def evaluate_saved(workdir: str, which: str, config: RunConfig) -> dict:
    """Evaluates what the run in `workdir` saved (see `load_trained_model` for `which`) on the
    evaluation data of `config`; returns the metrics, per-class accuracy (classification) and
    what was loaded. A regression or text run is evaluated from its export.

    Raises ConfigError if the data's classes are not the ones the run was trained on.
    """
    data = _evaluation_data(workdir, config)
    kind = config.task.task
    text = is_text(config.data)
    if (kind == "regression" or text) and which != "export":
        raise ConfigError(
            f"--checkpoint={which!r}: a {'text' if text else 'regression'} run is evaluated "
            "from its export, whose model.keras holds what a checkpoint does not (the "
            "targets' scale, the tokenizer); accepted: export"
        )
    model, path = load_trained_model(workdir, which, config.model, data.num_classes)
    if kind != "classification":
        task = _saved_task(model, config, data.class_names)
        metrics = Metrics(task=task, evaluation=True)
        step = compile_eval(model, ModeTable(), metrics, task=task)
        result = evaluate(step, metrics, data.eval, data.eval_steps)
        return {"evaluated": path, **result, "skipped_images": list(data.skipped_files)}
    metrics = Metrics(data.num_classes)
    evaluator = compile_eval(model, ModeTable(), metrics)
    result = evaluate(evaluator, metrics, data.eval, data.eval_steps)
    per_class = {
        name: (row[i] / sum(row) if sum(row) else None)
        for i, (name, row) in enumerate(zip(data.class_names, result["confusion"], strict=True))
    }
    return {
        "evaluated": path,
        "loss": result["loss"],
        "accuracy": result["accuracy"],
        "examples": result["examples"],
        "per_class_accuracy": per_class,
        "confusion": result["confusion"],
        "skipped_images": list(data.skipped_files),
    }


def _saved_task(model: TransferModel, config: RunConfig, names: tuple[str, ...]) -> Task:
    """The multilabel or regression task of a saved run (the regression targets' scale read
    from its head)."""
    if config.task.task == "multilabel":
        return MultiLabel(class_names=names, threshold=config.task.threshold)
    scale = model.head.get_layer("targets")
    return Regression(
        len(names),
        loss=config.task.regression_loss,
        scale=(scale.mean, scale.std),
        target_names=names,
    )


def evaluate_tflite(workdir: str, path: str, config: RunConfig) -> dict:
    """Evaluates the TFLite file `path` (made by tlloop for the run in `workdir`) on the
    evaluation data of `config` with the LiteRT interpreter, one image per call: accuracy,
    the loss (cross-entropy of its probabilities), per-class accuracy, the confusion matrix,
    the file's size and its mean latency per image.

    Raises ConfigError if the data's classes are not the run's, or the file takes other images.
    """
    from tlloop import tflite

    data = _evaluation_data(workdir, config)
    try:
        shape = tflite.input_shape(path)
    except ValueError as error:
        raise ConfigError(f"--tflite={path!r}: {error}") from None
    if tuple(shape[1:]) != (config.data.image_size, config.data.image_size, 3):
        raise ConfigError(
            f"--tflite={path!r}: takes images of shape {tuple(shape[1:])}, the data has "
            f"{config.data.image_size} px; accepted: --image_size={shape[1]}"
        )
    classes = data.num_classes
    confusion = np.zeros((classes, classes), np.int64)
    loss, seconds, count = 0.0, 0.0, 0
    batches = data.eval_examples.ordered().batch(256).as_numpy_iterator()
    for images, labels in batches:
        probabilities, per_image = tflite.run(path, images)
        if probabilities.shape[-1] != classes:
            raise ConfigError(
                f"--tflite={path!r}: gives {probabilities.shape[-1]} classes, the data has "
                f"{classes}; accepted: a file exported by this run"
            )
        labels = labels.astype(np.int64)
        picked = probabilities[np.arange(len(labels)), labels]
        loss += float(-np.log(np.clip(picked, 1e-7, 1.0)).sum())
        np.add.at(confusion, (labels, probabilities.argmax(-1)), 1)
        seconds += per_image * len(labels)
        count += len(labels)
    per_class = {
        name: (row[i] / row.sum() if row.sum() else None)
        for i, (name, row) in enumerate(zip(data.class_names, confusion, strict=True))
    }
    return {
        "evaluated": path,
        "loss": loss / max(count, 1),
        "accuracy": float(np.trace(confusion) / max(count, 1)),
        "examples": count,
        "per_class_accuracy": {
            k: (float(v) if v is not None else None) for k, v in per_class.items()
        },
        "confusion": confusion.tolist(),
        "bytes": os.path.getsize(path),
        "latency_ms": round(seconds / max(count, 1) * 1e3, 4),
        "skipped_images": list(data.skipped_files),
    }


def _evaluation_data(workdir: str, config: RunConfig):
    """The evaluation data `config` names; raises ConfigError unless its classes are the ones
    the run in `workdir` was trained on."""
    data = load_task_data(config.data, evaluation_only=True)
    trained = _trained_class_names(workdir)
    if trained is not None and tuple(trained) != data.class_names:
        raise ConfigError(
            f"--classes: the data has classes {list(data.class_names)}, the run in {workdir!r} "
            f"was trained on {trained}; accepted: data with the run's classes (select them "
            "with --classes)"
        )
    return data


def _trained_class_names(workdir: str) -> list[str] | None:
    try:
        with open(os.path.join(workdir, "results.json"), encoding="utf-8") as file:
            return json.load(file)["class_names"]
    except (OSError, ValueError, KeyError):
        return None  # an unfinished run: the head's size is checked when the weights load
