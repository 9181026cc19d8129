"""Evaluation of a model over a whole evaluation set, in training and after it."""

from __future__ import annotations

import json
import os

from tlloop.checkpoints import load_trained_model
from tlloop.config import ConfigError, RunConfig
from tlloop.data import load_data
from tlloop.models import ModeTable
from tlloop.steps import EvalStep, Metrics


def evaluate(eval_step: EvalStep, metrics: Metrics, batches, steps: int) -> dict:
    """Loss, accuracy and example count (and the confusion matrix, if `metrics` keeps it)
    over the `steps` batches of `batches`, every submodule in inference mode."""
    metrics.reset()
    eval_step(iter(batches), steps)
    return metrics.result()


def evaluate_saved(workdir: str, which: str, config: RunConfig) -> dict:
    """Evaluates what the run in `workdir` saved (see `load_trained_model` for `which`) on the
    evaluation data of `config`; returns the metrics, per-class accuracy and what was loaded.

    Raises ConfigError if the data's classes are not the ones the run was trained on.
    """
    data = load_data(config.data, evaluation_only=True)
    trained = _trained_class_names(workdir)
    if trained is not None and tuple(trained) != data.class_names:
        raise ConfigError(
            f"--classes: the data has classes {list(data.class_names)}, the run in {workdir!r} "
            f"was trained on {trained}; accepted: data with the run's classes (select them "
            "with --classes)"
        )
    model, path = load_trained_model(workdir, which, config.model, data.num_classes)
    metrics = Metrics(data.num_classes)
    result = evaluate(EvalStep(model, ModeTable(), metrics), metrics, data.eval, data.eval_steps)
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


def _trained_class_names(workdir: str) -> list[str] | None:
    try:
        with open(os.path.join(workdir, "results.json"), encoding="utf-8") as file:
            return json.load(file)["class_names"]
    except (OSError, ValueError, KeyError):
        return None  # an unfinished run: the head's size is checked when the weights load
