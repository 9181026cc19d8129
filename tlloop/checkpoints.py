"""Checkpoints of a run, for resuming it exactly where it stopped.

One `tf.train.CheckpointManager` under WORKDIR/checkpoints holds: the model, the current
phase's optimizer, the global step, the phase index and the step it started at, the train
metrics of the epoch under way, every Keras RNG state (seed generators, which a checkpoint of
the model alone leaves out) and the results of finished phases. The input position needs no
state of its own: the training stream is one seeded pipeline consumed one batch per global
step, so a resumed run rebuilds it and skips that many batches (tf.data's distributed
iterators cannot be checkpointed).

TensorFlow writes a checkpoint's files before it points the `checkpoint` file at them, so a
kill during a save leaves the previous checkpoint the latest one, readable; a save that fails
(a full disk) is cleaned up and reported as RunFailed, the previous checkpoint still the latest.
WORKDIR/checkpoints/best holds the model weights of the best evaluation so far.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import shutil
import tempfile

import keras
import tensorflow as tf

from tlloop.config import ConfigError
from tlloop.errors import RunFailed
from tlloop.models import build_model
from tlloop.models.modes import SUBMODULES
from tlloop.models.walk import seed_generators

BEST = "best"  # WORKDIR/checkpoints/best


class RunState(tf.Module):
    """The run's position: phase index, the global step that phase began at, finished results;
    and what best-model tracking and early stopping need: the best value so far and its step,
    the phase's best, the evaluations since it improved, and the step last evaluated."""

    def __init__(self) -> None:
        super().__init__(name="run_state")

        def variable(value, dtype, name):
            return tf.Variable(value, dtype=dtype, trainable=False, name=name)

        self.phase = variable(0, tf.int64, "phase")
        self.phase_start = variable(0, tf.int64, "phase_start")
        self.results = variable("[]", tf.string, "results")
        self.best = variable(math.nan, tf.float64, "best")
        self.best_step = variable(-1, tf.int64, "best_step")
        self.phase_best = variable(math.nan, tf.float64, "phase_best")
        self.since_phase_best = variable(0, tf.int64, "since_phase_best")
        self.evaluated_step = variable(-1, tf.int64, "evaluated_step")
        self.nonfinite_steps = variable(0, tf.int64, "nonfinite_steps")  # skipped, NaN/Inf

    def start_phase(self, index: int, step: int) -> None:
        self.phase.assign(index)
        self.phase_start.assign(step)
        self.phase_best.assign(math.nan)
        self.since_phase_best.assign(0)

    def finished_phases(self) -> list[dict]:
        return json.loads(self.results.numpy().decode())

    def record(self, phases: list[dict]) -> None:
        self.results.assign(json.dumps(phases))


def latest(directory: str) -> str | None:
    """The newest checkpoint under `directory`, or None."""
    return tf.train.latest_checkpoint(directory)


def position(path: str) -> tuple[int, int]:
    """(phase index, global step) stored in checkpoint `path`."""
    try:
        phase = tf.train.load_variable(path, "state/phase/.ATTRIBUTES/VARIABLE_VALUE")
        step = tf.train.load_variable(path, "step/.ATTRIBUTES/VARIABLE_VALUE")
    except (tf.errors.OpError, ValueError) as error:
        raise ConfigError(
            f"checkpoint {path!r}: unreadable or not a tlloop checkpoint "
            f"({error.__class__.__name__}); accepted: the checkpoints a tlloop run wrote, or "
            "--overwrite to start afresh"
        ) from None
    return int(phase), int(step)


def phase_start(path: str) -> int:
    """The global step at which the phase under way in checkpoint `path` began."""
    return int(tf.train.load_variable(path, "state/phase_start/.ATTRIBUTES/VARIABLE_VALUE"))


class Checkpoints:
    """Saves and restores one run. On a non-chief task saves go to a temporary directory that
    is deleted again (TensorFlow's convention: every task must save, because reading
    sync-on-read variables is a collective, but only the chief keeps the files)."""

    def __init__(self, directory: str, *, keep: int, chief: bool) -> None:
        self.directory = directory
        self.keep = keep
        self.chief = chief
        self.checkpoint: tf.train.Checkpoint | None = None

    def track(self, **objects) -> None:
        """Sets what the next saves and restores hold; called at each phase start."""
        self.checkpoint = tf.train.Checkpoint(**objects)

    def save(self, step: int) -> None:
        """Saves what is tracked as checkpoint number `step`.

        Raises RunFailed if the files cannot be written (a full disk): the partial files are
        removed and the previous checkpoint stays the latest.
        """
        directory = self.directory if self.chief else tempfile.mkdtemp(prefix="tlloop-worker-")
        try:
            manager = tf.train.CheckpointManager(
                self.checkpoint, directory, max_to_keep=self.keep, step_counter=None
            )
            manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as error:
            # TensorFlow leaves its partial files in a "<prefix>_temp" directory.
            for partial in glob.glob(os.path.join(directory, f"ckpt-{step}_temp*")):
                shutil.rmtree(partial, ignore_errors=True)
            previous = latest(directory) if self.chief else None
            kept = f"{previous!r} is intact" if previous else "no earlier checkpoint exists"
            message = getattr(error, "message", None) or str(error)
            raise RunFailed(
                f"checkpoint at step {step} could not be written to {directory!r} "
                f"({_last_clause(message)}); {kept}; accepted: a workdir with free space and "
                "write access (the same command then resumes)"
            ) from None
        finally:
            if not self.chief:
                shutil.rmtree(directory, ignore_errors=True)

    def check(self, path: str, model) -> None:
        """Raises ConfigError unless `path` holds a value of the right shape for every weight
        of `model`; run before anything is written, so a bad checkpoint changes nothing."""
        _restore(tf.train.Checkpoint(model=model), path)

    def restore(self, path: str) -> None:
        """Restores everything tracked from `path`; a mismatch is a ConfigError naming it.

        The checkpoint may hold more than is tracked (a finished run's optimizer, when only
        its results are wanted); every tracked object must be in it.
        """
        _restore(self.checkpoint, path)


def _last_clause(message: str) -> str:
    """The cause at the end of a TensorFlow error message, e.g. "File too large"."""
    text = " ".join(message.split())
    return text.rsplit(";", 1)[-1].split("[Op:", 1)[0].strip()[:160] or text[:160]


def _restore(checkpoint: tf.train.Checkpoint, path: str) -> None:
    status = checkpoint.restore(path)
    status.expect_partial()  # no warnings at exit about values this object does not hold
    try:
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as error:
        text = " ".join(str(error).split())[:300]
        raise ConfigError(
            f"checkpoint {path!r}: does not fit this model ({text}); accepted: a checkpoint "
            "of the same flags, or --overwrite to start afresh"
        ) from None


def rng_states(model) -> list:
    """The state variable of every Keras SeedGenerator in `model`'s submodules, at any depth
    (a Dropout inside a custom layer, every layer of a text encoder), each once.

    Dropout and the random augmentation layers draw from these; they are not among the
    model's weights, so a checkpoint of the model alone would resume with fresh randomness.
    The order (submodule, then layers depth first) keeps a checkpoint of a model whose random
    layers all sit at its top level readable under the keys earlier versions wrote.
    """
    states, seen = [], set()
    for name in SUBMODULES:
        for generator in seed_generators(getattr(model, name)):
            if id(generator) not in seen:  # a layer shared by two submodules
                seen.add(id(generator))
                states.append(generator.state)
    return states


# What `load_trained_model` can load from a workdir, besides a checkpoint path.
SAVED = ("export", BEST, "latest")


def load_trained_model(workdir: str, which: str, model_config, num_classes: int):
    """The model a run in `workdir` saved: "export" (export/model.keras), "best" (the best
    checkpoint), "latest" (the newest checkpoint) or a checkpoint path; returns it and the path
    it came from. A checkpoint is loaded into a model built from `model_config` (without
    downloading weights it would overwrite). Raises ConfigError naming --checkpoint."""
    flag = f"--checkpoint={which!r}"
    accepted = "export, best, latest, or a checkpoint path (PREFIX with PREFIX.index)"
    if which == "export":
        path = os.path.join(workdir, "export", "model.keras")
        if not os.path.isfile(path):
            raise ConfigError(
                f"{flag}: {path!r} does not exist (run unfinished?); accepted: {accepted}"
            )
        return keras.saving.load_model(path), path
    directory = os.path.join(workdir, "checkpoints")
    path = {BEST: latest(os.path.join(directory, BEST)), "latest": latest(directory)}.get(
        which, which if tf.io.gfile.exists(which + ".index") else None
    )
    if not path:
        raise ConfigError(f"{flag}: no such checkpoint in {directory!r}; accepted: {accepted}")
    application = not model_config.backbone.endswith(".keras")
    model_config = dataclasses.replace(
        model_config, weights="none" if application else model_config.weights, init_checkpoint=""
    )
    model = build_model(model_config, num_classes)
    _restore(tf.train.Checkpoint(model=model), path)
    return model, path
