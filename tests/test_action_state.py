"""Stateful actions keep their own state in the run's checkpoint, and a checkpoint written
before they did (the best evaluation and the early-stopping count in the run state) still
resumes with both."""

from __future__ import annotations

import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, brightest_channel

import tlloop
from tlloop.loop.position import stored

SIZE, CLASSES = 8, 3
# A run written by tlloop before the actions kept their own state (main at c77c930): `_fit`
# with `_StopAtSecondEpoch`, which raised at the second epoch's end; its checkpoint (ckpt-6)
# holds the best evaluation (step 3) and one evaluation without a better one in `state/`.
OLD_RUN = os.path.join(REPO, "tests", "data", "old_run_state_layout")


def _model() -> tlloop.TransferModel:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    backbone = keras.Model(inputs, keras.layers.Conv2D(2, 3, name="conv")(x), name="backbone")
    features = keras.Input(backbone.outputs[0].shape[1:])
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    head = keras.Model(features, keras.layers.Dense(CLASSES, name="logits")(pooled), name="head")
    return tlloop.TransferModel(backbone, head)


class _StopAtSecondEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise ValueError("stopped for the test")


def _fit(workdir: str, callbacks=()) -> tlloop.Results:
    """6 epochs of 3 steps that change nothing (SGD at rate 0): every evaluation equals the
    first, so the best stays at step 3 and patience 3 ends the phase at its 4th evaluation."""
    trainer = tlloop.Trainer(
        workdir,
        phases=[tlloop.Phase("head", 6, optimizer=keras.optimizers.SGD(learning_rate=0.0))],
        checkpoint=tlloop.CheckpointConfig(early_stopping_patience=3, every_steps=0),
        logging=tlloop.LoggingConfig(quiet=True),
        callbacks=list(callbacks),
    )
    train, evaluation = brightest_channel(24, 1, SIZE), brightest_channel(9, 2, SIZE)
    return trainer.fit(_model(), train, evaluation, batch_size=8, export=False)


def test_a_checkpoint_of_the_old_run_state_layout_resumes_with_best_and_patience(tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(OLD_RUN, workdir)
    latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    assert stored(latest) == (0, 6)
    names = {name for name, _ in tf.train.list_variables(latest)}
    assert "state/since_phase_best/.ATTRIBUTES/VARIABLE_VALUE" in names  # the old layout
    assert not any(name.startswith("actions/") for name in names)
    old_best = float(tf.train.load_variable(latest, "state/best/.ATTRIBUTES/VARIABLE_VALUE"))

    results = _fit(workdir)
    [head] = results.phases
    # Patience carried over: one evaluation without a better value before the resume, two
    # after it end the phase at epoch 4 (counted afresh, it would run all 6).
    assert head["stopped_early"] and head["epochs_run"] == 4 and head["last_step"] == 12
    # The best carried over: still the first evaluation's (a fresh best would be step 9's).
    assert results["best"]["step"] == 3
    assert results["best"]["value"] == pytest.approx(old_best, abs=0)
    # The run's new checkpoints keep both under the actions' own keys.
    latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    assert tf.train.load_variable(latest, "actions/best/step/.ATTRIBUTES/VARIABLE_VALUE") == 3
    count = "actions/early_stopping/since_phase_best/.ATTRIBUTES/VARIABLE_VALUE"
    assert tf.train.load_variable(latest, count) == 3


def test_stateful_actions_resume_from_their_own_keys(tmp_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(tlloop.CallbackError):
        _fit(workdir, [_StopAtSecondEpoch()])
    latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    count = "actions/early_stopping/since_phase_best/.ATTRIBUTES/VARIABLE_VALUE"
    assert tf.train.load_variable(latest, count) == 1
    assert not any(name.startswith("state/best") for name, _ in tf.train.list_variables(latest))
    results = _fit(workdir)
    [head] = results.phases
    assert head["stopped_early"] and head["last_step"] == 12
    assert results["best"]["step"] == 3
    assert np.isfinite(results["best"]["value"])
