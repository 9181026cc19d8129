"""Shared test helpers: tiny real runs on the embedded digits."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from tlloop import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAINED = os.path.join(REPO, "experiments", "pretrained", "small_cnn_digits0-4.keras")


def make_config(workdir: str, **overrides) -> config_lib.RunConfig:
    """A small run on digits 5-9: 8 training examples per class, 32 px, batch 16."""
    values = {
        "classes": "5-9",
        "per_class": 8,
        "image_size": 32,
        "batch_size": 16,
        "backbone": PRETRAINED,
        "weights": "",
        "dropout": 0.2,
        "augment": "",
        "head_epochs": 1,
        "head_lr": 1e-2,
        "finetune_epochs": 1,
        "finetune_lr": 1e-3,
        "unfreeze": "all",
        "bn_mode": "frozen",
        "jit_compile": False,
        "steps_per_loop": 1,
        "init_checkpoint": "",
        "checkpoint": config_lib.CheckpointConfig(),
        "nan_policy": "stop",
        "training": config_lib.TrainingConfig(),
    }
    values.update(overrides)
    data = config_lib.DataConfig(
        classes=config_lib.parse_classes(values["classes"]),
        train_examples_per_class=values["per_class"],
        image_size=values["image_size"],
        batch_size=values["batch_size"],
    )
    model = config_lib.ModelConfig(
        backbone=values["backbone"],
        weights=values["weights"],
        image_size=values["image_size"],
        dropout=values["dropout"],
        augment=config_lib.parse_augment(values["augment"]),
        init_checkpoint=values["init_checkpoint"],
    )
    phases = (
        config_lib.PhaseConfig(
            "head", values["head_epochs"], values["head_lr"], config_lib.Unfreeze("none")
        ),
        config_lib.PhaseConfig(
            "finetune",
            values["finetune_epochs"],
            values["finetune_lr"],
            config_lib.Unfreeze.parse(values["unfreeze"]),
            bn_mode=values["bn_mode"],
        ),
    )
    return config_lib.RunConfig(
        workdir=workdir,
        data=data,
        model=model,
        phases=phases,
        jit_compile=values["jit_compile"],
        steps_per_loop=values["steps_per_loop"],
        checkpoint=values["checkpoint"],
        nan_policy=values["nan_policy"],
        training=values["training"],
    )


class StopAfter(threading.Event):
    """A stop request for `trainer.train` that reads as set from its `calls`-th check on: the
    trainer checks once per host call, so with --steps_per_loop=1 it stops after that step."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = calls

    def is_set(self) -> bool:
        self.calls -= 1
        return self.calls <= 0


def eval_accuracy(model, eval_batches) -> tuple[float, float]:
    """(accuracy, example count) of `model` (logits) over padded, weighted eval batches."""
    correct = total = 0.0
    for images, labels, weights in eval_batches:
        hits = (np.argmax(model(images), -1) == labels.numpy()) * weights.numpy()
        correct, total = correct + hits.sum(), total + weights.numpy().sum()
    return correct / total, total


def snapshot(layer) -> dict[str, np.ndarray]:
    """Copies of every variable of `layer`, by path."""
    return {v.path: np.array(v.numpy()) for v in layer.weights}


def changed(before: dict, after: dict) -> set[str]:
    """Paths whose values are not bit-identical."""
    return {path for path in before if not np.array_equal(before[path], after[path])}


def _cli(args, env: dict | None, module: str = "tlloop.run") -> dict:
    return {
        "args": [sys.executable, "-m", module, *args],
        "cwd": REPO,
        "env": {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO, **(env or {})},
        "text": True,
    }


def run_cli(
    *args: str, timeout: int = 300, env: dict | None = None, module: str = "tlloop.run", **kw
) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in a subprocess (extra `env`, and subprocess.run's `kw`, e.g.
    preexec_fn); killed after `timeout` s."""
    return subprocess.run(**_cli(args, env, module), capture_output=True, timeout=timeout, **kw)


def start_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`python -m tlloop.run ARGS` started in the background; stderr piped, stdout dropped.

    The caller ends it: wait for it, or SIGKILL it by its pid in a `finally`.
    """
    return subprocess.Popen(**_cli(args, env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture
def workdir(tmp_path) -> str:
    return str(tmp_path / "run")
