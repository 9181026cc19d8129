"""Best-model tracking, early stopping, --export=best|last, and an evaluation a kill skipped."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import eval_accuracy, make_config

from tlloop import trainer
from tlloop.cli import experiment as cli_experiment
from tlloop.config import BestMetric, CheckpointConfig, TrainingConfig


def _run(workdir: str, **overrides) -> dict:
    config = make_config(workdir, **overrides)
    return cli_experiment.train(cli_experiment.build_experiment(config), workdir)


def _evals(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as file:
        rows = [json.loads(line) for line in file]
    return [row for row in rows if row["kind"] == "eval"]


def test_the_best_evaluation_is_kept_and_exported(tmp_path):
    workdir = str(tmp_path / "run")
    results = _run(workdir, head_epochs=4, finetune_epochs=2, head_lr=3e-2)
    evals = _evals(workdir)
    accuracies = [row["accuracy"] for row in evals]
    first_best = int(np.argmax(accuracies))  # the first of equal values: later ties lose
    assert results["best"] == {
        "metric": "accuracy:max",
        "value": pytest.approx(accuracies[first_best], abs=1e-7),
        "step": evals[first_best]["step"],
    }
    best_dir = os.path.join(workdir, "checkpoints", "best")
    assert tf.train.latest_checkpoint(best_dir).endswith(f"ckpt-{results['best']['step']}")
    assert results["export"]["weights"] == "best"
    assert results["export"]["step"] == results["best"]["step"]
    # The exported model scores the best value on the evaluation data.
    import tlloop.models  # noqa: F401  registers tlloop's classes

    model = keras.saving.load_model(results["export"]["model"])
    experiment = cli_experiment.build_experiment(make_config(workdir))
    accuracy, _ = eval_accuracy(model, experiment.data.eval)
    assert accuracy == pytest.approx(results["best"]["value"], abs=1e-6)


def test_export_last_exports_the_final_weights(tmp_path):
    workdir = str(tmp_path / "run")
    checkpoint = CheckpointConfig(export="last", best_metric=BestMetric.parse("loss"))
    results = _run(workdir, head_epochs=3, finetune_epochs=1, checkpoint=checkpoint)
    assert results["best"]["metric"] == "loss:min"
    assert results["best"]["value"] == pytest.approx(min(r["loss"] for r in _evals(workdir)))
    assert results["export"]["weights"] == "last"
    model = keras.saving.load_model(results["export"]["model"])
    assert trainer.weights_digest(model) == results["weights_sha256"]


def test_early_stopping_ends_a_phase_and_the_next_one_runs(tmp_path):
    workdir = str(tmp_path / "run")
    # A learning rate of 1e-9 leaves the evaluation accuracy exactly where it is: after the
    # phase's first evaluation, none is better, so patience 2 ends the phase at its third.
    checkpoint = CheckpointConfig(early_stopping_patience=2)
    results = _run(workdir, head_epochs=10, head_lr=1e-9, finetune_epochs=2, checkpoint=checkpoint)
    head, finetune = results["phases"]
    steps_per_epoch = 3  # 40 examples, batch 16
    assert head["stopped_early"] and head["last_step"] == 3 * steps_per_epoch
    assert not finetune["stopped_early"]
    assert finetune["last_step"] == head["last_step"] + 2 * steps_per_epoch
    assert [row["phase"] for row in _evals(workdir)] == ["head"] * 3 + ["finetune"] * 2


def test_an_evaluation_a_kill_skipped_is_run_on_resume(tmp_path):
    # A run killed after an epoch's last step was checkpointed, but before its evaluation:
    # made here by pointing a finished run's checkpoint state back at that step.
    checkpoint = CheckpointConfig(every_steps=3, keep=100, export="last")
    complete = str(tmp_path / "complete")
    # SGD: without --deterministic CPU gradients differ in the last bits from run to run, and
    # Adam turns a near-zero gradient's sign flip into a step of the full learning rate.
    config = make_config(
        complete,
        head_epochs=2,
        finetune_epochs=1,
        checkpoint=checkpoint,
        training=TrainingConfig(optimizer="sgd"),
    )
    experiment = cli_experiment.build_experiment(config)
    expected = cli_experiment.train(experiment, complete)
    killed = str(tmp_path / "killed")
    shutil.copytree(complete, killed)
    shutil.rmtree(os.path.join(killed, "export"))
    os.remove(os.path.join(killed, "results.json"))
    directory = os.path.join(killed, "checkpoints")
    tf.compat.v1.train.update_checkpoint_state(directory, os.path.join(directory, "ckpt-3"))
    for later in glob.glob(os.path.join(directory, "ckpt-[69]*")):  # not written before the kill
        os.remove(later)
    shutil.rmtree(os.path.join(directory, "best"))  # written after that point
    with open(os.path.join(killed, "metrics.jsonl")) as file:
        rows = [json.loads(line) for line in file]
    with open(os.path.join(killed, "metrics.jsonl"), "w") as file:
        file.writelines(
            json.dumps(row) + "\n" for row in rows if row["step"] <= 3 and row["kind"] != "eval"
        )

    resumed_experiment = cli_experiment.build_experiment(
        dataclasses.replace(config, workdir=killed)
    )
    resumed = cli_experiment.train(resumed_experiment, killed)
    assert [row["step"] for row in _evals(killed)] == [3, 6, 9]
    # Step 3's evaluation runs on the restored weights: exactly the uninterrupted numbers.
    assert _evals(killed)[0] == _evals(complete)[0]
    for row, reference in zip(_evals(killed), _evals(complete), strict=True):
        assert row["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-6)
    assert resumed["best"]["step"] == expected["best"]["step"]
    for a, b in zip(resumed_experiment.model.weights, experiment.model.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-5)
