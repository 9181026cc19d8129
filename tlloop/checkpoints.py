"""Checkpoints of a run, for resuming it exactly where it stopped.

One `tf.train.CheckpointManager` under WORKDIR/checkpoints holds: the model, the current
phase's optimizer, the global step, the phase index and the step it started at, the train
metrics of the epoch under way, every Keras RNG state (seed generators, which a checkpoint of
the model alone leaves out) and the results of finished phases. The input position needs no
state of its own: the training stream is one seeded pipeline consumed one batch per global
step, so a resumed run rebuilds it and skips that many batches (tf.data's distributed
iterators cannot be checkpointed).

TensorFlow writes a checkpoint's files before it points the `checkpoint` file at them, so a
kill during a save leaves the previous checkpoint the latest one, readable.
"""

from __future__ import annotations

import json
import shutil
import tempfile

import keras
import tensorflow as tf

from tlloop.config import ConfigError
from tlloop.models.modes import SUBMODULES
from tlloop.phases import leaf_layers


class RunState(tf.Module):
    """The run's position: phase index, the global step that phase began at, finished results."""

    def __init__(self) -> None:
        super().__init__(name="run_state")
        self.phase = tf.Variable(0, dtype=tf.int64, trainable=False, name="phase")
        self.phase_start = tf.Variable(0, dtype=tf.int64, trainable=False, name="phase_start")
        self.results = tf.Variable("[]", dtype=tf.string, trainable=False, name="results")

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
        directory = self.directory if self.chief else tempfile.mkdtemp(prefix="tlloop-worker-")
        try:
            manager = tf.train.CheckpointManager(
                self.checkpoint, directory, max_to_keep=self.keep, step_counter=None
            )
            manager.save(checkpoint_number=step)
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
    """The state variable of every Keras SeedGenerator in `model`'s submodules.

    Dropout and the random augmentation layers draw from these; they are not among the
    model's weights, so a checkpoint of the model alone would resume with fresh randomness.
    """
    states = []
    for name in SUBMODULES:
        for layer in leaf_layers(getattr(model, name)):
            for value in vars(layer).values():
                if isinstance(value, keras.random.SeedGenerator):
                    states.append(value.state)
    return states
