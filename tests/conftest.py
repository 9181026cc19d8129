"""Shared test helpers: tiny real runs on the embedded digits."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from tlloop.cli import config as cli_config
from tlloop.cli.flags import flag_line
from tlloop.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAINED = os.path.join(REPO, "experiments", "pretrained", "small_cnn_digits0-4.keras")


# The small run most tests train, as flag values: the flags' defaults otherwise.
SMALL_RUN = {
    "classes": "5-9",
    "train_examples_per_class": 8,
    "batch_size": 16,
    "backbone": PRETRAINED,
    "head_epochs": 1,
    "head_lr": 1e-2,
    "finetune_epochs": 1,
    "finetune_lr": 1e-3,
    # One step per host call: StopAfter counts host calls (auto is tested on its own).
    "steps_per_loop": "1",
    # The flags' own defaults for what is not given (the auto recipe is tested on its own).
    "recipe": "guide",
}


def make_config(workdir: str, **overrides) -> cli_config.RunConfig:
    """A small run on digits 5-9: 8 training examples per class, 32 px, batch 16.

    `overrides` are flag values by flag name (`per_class` for --train_examples_per_class), or
    whole sections of the RunConfig by field name (`checkpoint=`, `training=`, ...)."""
    flag_names = {meta.flag for meta in cli_config.options()}
    sections = {f.name for f in dataclasses.fields(cli_config.RunConfig)} - flag_names
    replaced = {name: overrides.pop(name) for name in sections & set(overrides)}
    if "per_class" in overrides:
        overrides["train_examples_per_class"] = overrides.pop("per_class")
    config = cli_config.from_flags({**SMALL_RUN, **overrides, "workdir": workdir})
    return dataclasses.replace(config, **replaced)


class StopAfter(threading.Event):
    """A stop request for `trainer.train` that reads as set from its `calls`-th check on: the
    trainer checks once per host call, so with --steps_per_loop=1 it stops after that step."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = calls

    def is_set(self) -> bool:
        self.calls -= 1
        return self.calls <= 0


@contextlib.contextmanager
def flag_error(pattern: str):
    """Expects a ConfigError whose command-line line (the flags' words the CLI prints) matches
    `pattern` (re.search); yields pytest's ExceptionInfo."""
    with pytest.raises(ConfigError) as caught:
        yield caught
    line = flag_line(caught.value)
    assert re.search(pattern, line), f"{pattern!r} not in {line!r}"


def eval_accuracy(model, eval_batches) -> tuple[float, float]:
    """(accuracy, example count) of `model` (logits) over padded, weighted eval batches."""
    correct = total = 0.0
    for images, labels, weights in eval_batches:
        hits = (np.argmax(model(images), -1) == labels.numpy()) * weights.numpy()
        correct, total = correct + hits.sum(), total + weights.numpy().sum()
    return correct / total, total


def brightest_channel(count: int, seed: int, size: int, classes: int = 3):
    """(images, labels): `count` RGB images of `size` px in [0, 220] whose class is their
    brightest colour channel, learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, count).astype("int32")
    images = rng.uniform(0, 120, (count, size, size, 3)).astype("float32")
    images[np.arange(count), :, :, labels] += 100.0
    return images, labels


# A tiny CLI run on an image folder (append --data_dir and --workdir): a random small CNN,
# 16 px, one head epoch.
TINY_FOLDER_RUN = (
    "--dataset=folder",
    "--backbone=small_cnn",
    "--weights=none",
    "--image_size=16",
    "--batch_size=4",
    "--head_epochs=1",
    "--finetune_epochs=0",
    "--quiet",
)


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


def python_command(*args: str, env: dict | None = None) -> dict:
    """subprocess keyword arguments for `python ARGS` in the repo, with tlloop importable and
    the extra `env`."""
    return {
        "args": [sys.executable, *args],
        "cwd": REPO,
        "env": {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO, **(env or {})},
        "text": True,
    }


def run_python(
    *args: str, timeout: int = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python ARGS` (a script and its arguments, or -c CODE) in a subprocess, output captured;
    killed after `timeout` s."""
    return subprocess.run(**python_command(*args, env=env), capture_output=True, timeout=timeout)


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


@pytest.fixture(autouse=True)
def _op_determinism_ends_with_the_test():
    """A test that trains with deterministic=True turns op determinism on for the whole
    process (TensorFlow's switch is global), where XLA then refuses ops it has no
    deterministic kernel for (MaxPool's gradient): it is turned off again after the test."""
    yield
    from tensorflow.python.framework import config as framework_config  # no public switch off

    if framework_config.is_op_determinism_enabled():
        framework_config.disable_op_determinism()


@pytest.fixture
def workdir(tmp_path) -> str:
    return str(tmp_path / "run")
