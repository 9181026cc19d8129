"""The feature-extraction fast path: same result as the slow path, chosen only when valid."""

from __future__ import annotations

import dataclasses

import numpy as np
from conftest import make_config

from tlloop.cli import experiment as cli_experiment
from tlloop.config import CheckpointConfig, TrainingConfig


def _run(workdir: str, feature_cache: str, **overrides):
    # SGD: Adam would turn last-bit feature differences (other batch sizes) near a zero
    # gradient into full learning-rate steps of either sign.
    values = {"head_epochs": 3, "finetune_epochs": 1, **overrides}
    sgd = TrainingConfig(optimizer="sgd")
    config = make_config(
        workdir, checkpoint=CheckpointConfig(export="last"), training=sgd, **values
    )
    experiment = cli_experiment.build_experiment(
        dataclasses.replace(config, feature_cache=feature_cache)
    )
    return experiment, cli_experiment.train(experiment, workdir)


def test_cached_features_train_the_head_as_the_backbone_would(tmp_path):
    # Dropout 0.2 in the head: both paths must also draw the same masks.
    slow, slow_results = _run(str(tmp_path / "slow"), "off")
    fast, fast_results = _run(str(tmp_path / "fast"), "auto")
    head, finetune = fast_results["phases"]
    assert head["feature_cache"].startswith("on: backbone frozen and no augmentation")
    assert finetune["feature_cache"] == "off: backbone weights train in this phase"
    assert slow_results["phases"][0]["feature_cache"] == "off (feature_cache=off)"
    # Features computed in batches of 64 instead of 16: float tolerance, then the same steps.
    for a, b in zip(fast.model.weights, slow.model.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-5, err_msg=a.path)
    for fast_phase, slow_phase in zip(fast_results["phases"], slow_results["phases"], strict=True):
        assert fast_phase["eval"]["accuracy"] == slow_phase["eval"]["accuracy"]
        assert abs(fast_phase["train"]["loss"] - slow_phase["train"]["loss"]) < 1e-5


def test_augmentation_keeps_the_slow_path(tmp_path):
    _, results = _run(str(tmp_path / "run"), "auto", augment="flip", finetune_epochs=0)
    assert results["phases"][0]["feature_cache"] == (
        "off: augmentation makes every epoch's images differ"
    )
