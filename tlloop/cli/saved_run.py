"""Evaluating a saved run from the command line (`python -m tlloop.evaluate`): the run's
flags.txt (with data flags overriding it) -> its RunConfig -> its evaluation data rebuilt ->
the saved model (export, best or latest checkpoint) or a TFLite file of the run -> the
library's evaluation (`tlloop.evaluation.evaluate_batches`)."""

from __future__ import annotations

import importlib.util
import json
import os

from absl import flags

from tlloop.cli import flags as tlloop_flags
from tlloop.cli.config import RunConfig
from tlloop.errors import ConfigError

# TensorFlow is imported inside the functions that need it: `saved_run_config` and
# `check_tflite` refuse bad flags before it loads (a typo fails in a fraction of a second).


def saved_run_config(workdir: str, overrides: flags.FlagValues) -> RunConfig:
    """The RunConfig of the run in `workdir` (its flags.txt), with the data flags given in
    `overrides` instead of the run's; exports nothing. Raises ConfigError naming the flag."""
    flags_file = os.path.join(workdir, "flags.txt")
    if not os.path.isfile(flags_file):
        raise ConfigError(
            "workdir", repr(workdir), "holds no flags.txt", "the workdir of a tlloop run"
        )
    run_flags = tlloop_flags.run_flags(flags_file, overrides=overrides)
    run_flags["workdir"].value = workdir
    # Evaluation exports nothing: the run's TFLite formats need no interpreter here.
    run_flags["export_tflite"].value = []
    return tlloop_flags.to_config(run_flags)


def load_trained_model(workdir: str, which: str, model_config, num_classes: int):
    """The model a run in `workdir` saved: "export" (export/model.keras), "best" (the best
    checkpoint), "latest" (the newest checkpoint) or a checkpoint path; returns it and the path
    it came from. A checkpoint is loaded into a model built from `model_config` (without
    downloading weights it would overwrite). Raises ConfigError naming --checkpoint."""
    import keras
    import tensorflow as tf

    from tlloop import checkpoints as checkpoint_lib
    from tlloop.cli.model import restorable_model

    accepted = "export, best, latest, or a checkpoint path (PREFIX with PREFIX.index)"
    if which == "export":
        path = os.path.join(workdir, "export", "model.keras")
        if not os.path.isfile(path):
            raise ConfigError(
                "checkpoint", repr(which), f"{path!r} does not exist (run unfinished?)", accepted
            )
        return keras.saving.load_model(path), path
    directory = os.path.join(workdir, "checkpoints")
    best = checkpoint_lib.latest(os.path.join(directory, checkpoint_lib.BEST))
    path = {checkpoint_lib.BEST: best, "latest": checkpoint_lib.latest(directory)}.get(
        which, which if tf.io.gfile.exists(which + ".index") else None
    )
    if not path:
        raise ConfigError(
            "checkpoint", repr(which), f"no such checkpoint in {directory!r}", accepted
        )
    model = restorable_model(model_config, num_classes)
    saved = checkpoint_lib.Checkpoints(directory, keep=1, chief=False)
    saved.track(model=model)
    saved.restore(path)  # a checkpoint of other flags: a ConfigError naming it
    return model, path


def evaluate_saved(workdir: str, which: str, config: RunConfig) -> dict:
    """Evaluates what the run in `workdir` saved (see `load_trained_model` for `which`) on the
    evaluation data of `config`; returns the metrics, per-class accuracy (classification) and
    what was loaded. A regression or text run is evaluated from its export.

    Raises ConfigError if the data's classes are not the ones the run was trained on.
    """
    from tlloop.cli.data import is_text
    from tlloop.evaluation import evaluate_batches
    from tlloop.models import ModeTable
    from tlloop.steps import Metrics, compile_eval

    data = evaluation_data(workdir, config)
    kind = config.task.task
    text = is_text(config.data)
    if (kind == "regression" or text) and which != "export":
        # One finished line: --checkpoint is evaluate's own flag, which flags.flag_line (what
        # callers of this function print) does not know.
        raise ConfigError(
            f"--checkpoint={which!r}: a {'text' if text else 'regression'} run is evaluated "
            "from its export, whose model.keras holds what a checkpoint does not (the "
            "targets' scale, the tokenizer); accepted: export"
        )
    model, path = load_trained_model(workdir, which, config.model, data.num_classes)
    if kind != "classification":
        task = saved_task(model, config, data.class_names)
        metrics = Metrics(task=task, evaluation=True)
        step = compile_eval(model, ModeTable(), metrics, task=task)
        result = evaluate_batches(step, metrics, data.eval, data.eval_steps)
        return {"evaluated": path, **result, "skipped_images": list(data.skipped_files)}
    metrics = Metrics(data.num_classes)
    result = evaluate_batches(
        compile_eval(model, ModeTable(), metrics), metrics, data.eval, data.eval_steps
    )
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


def saved_task(model, config: RunConfig, names: tuple[str, ...]):
    """The multilabel or regression Task of a saved run (`model`, its TransferModel; the
    regression targets' scale read from its head)."""
    from tlloop.tasks import MultiLabel, Regression

    if config.task.task == "multilabel":
        return MultiLabel(class_names=names, threshold=config.task.threshold)
    scale = model.head.get_layer("targets")
    return Regression(
        len(names),
        loss=config.task.regression_loss,
        scale=(scale.mean, scale.std),
        target_names=names,
    )


def check_tflite(path: str) -> None:
    """Raises ConfigError (naming --tflite) unless `path` is a TFLite file and the LiteRT
    interpreter is installed; before TensorFlow loads."""
    if not os.path.isfile(path):
        raise ConfigError("tflite", repr(path), "no such file", "a .tflite file")
    with open(path, "rb") as file:
        # A flatbuffer's file identifier (bytes 4-8) is "TFL3" for every TFLite model.
        if file.read(8)[4:8] != b"TFL3":
            raise ConfigError("tflite", repr(path), "not a TFLite file", "a .tflite file")
    if importlib.util.find_spec("ai_edge_litert") is None:
        raise ConfigError(
            "tflite",
            repr(path),
            "the LiteRT interpreter is not installed",
            'pip install "tlloop[tflite]" (ai-edge-litert)',
        )


def evaluate_tflite(workdir: str, path: str, config: RunConfig) -> dict:
    """Evaluates the TFLite file `path` (made by tlloop for the run in `workdir`) on the
    evaluation data of `config` with the LiteRT interpreter, one image per call: accuracy,
    the loss (cross-entropy of its probabilities), per-class accuracy, the confusion matrix,
    the file's size and its mean latency per image.

    Raises ConfigError if the data's classes are not the run's, or the file takes other images.
    """
    import numpy as np

    from tlloop import tflite

    data = evaluation_data(workdir, config)
    try:
        shape = tflite.input_shape(path)
    except ValueError as error:
        raise ConfigError("tflite", repr(path), str(error)) from None
    if tuple(shape[1:]) != (config.data.image_size, config.data.image_size, 3):
        raise ConfigError(
            "tflite",
            repr(path),
            f"takes images of shape {tuple(shape[1:])}, the data has {config.data.image_size} px",
            f"$image_size={shape[1]}",
        )
    classes = data.num_classes
    confusion = np.zeros((classes, classes), np.int64)
    loss, seconds, count = 0.0, 0.0, 0
    batches = data.eval_examples.ordered().batch(256).as_numpy_iterator()
    for images, labels in batches:
        probabilities, per_image = tflite.run(path, images)
        if probabilities.shape[-1] != classes:
            raise ConfigError(
                "tflite",
                repr(path),
                f"gives {probabilities.shape[-1]} classes, the data has {classes}",
                "a file exported by this run",
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


def evaluation_data(workdir: str, config: RunConfig):
    """The evaluation data `config` names; raises ConfigError unless its classes are the ones
    the run in `workdir` was trained on."""
    from tlloop.cli.data import load_task_data

    data = load_task_data(config.data, evaluation_only=True)
    trained = trained_class_names(workdir)
    if trained is not None and tuple(trained) != data.class_names:
        raise ConfigError(
            "classes",
            problem=f"the data has classes {list(data.class_names)}, the run in {workdir!r} "
            f"was trained on {trained}",
            accepted="data with the run's classes (select them with $classes)",
        )
    return data


def trained_class_names(workdir: str) -> list[str] | None:
    """The class names results.json of the run in `workdir` records; None for an unfinished
    run (the head's size is checked when the weights load)."""
    try:
        with open(os.path.join(workdir, "results.json"), encoding="utf-8") as file:
            return json.load(file)["class_names"]
    except (OSError, ValueError, KeyError):
        return None
