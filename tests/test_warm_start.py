"""--init_checkpoint: a warm start loads backbone weights, reports them, and fails clearly."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from conftest import changed, flag_error, make_config, snapshot

from tlloop.cli import experiment as cli_experiment
from tlloop.cli.config import ModelConfig
from tlloop.cli.model import build_model
from tlloop.warm_start import warm_start


def _model(seed: int):
    keras.utils.set_random_seed(seed)
    return build_model(ModelConfig(backbone="small_cnn", image_size=16), 3)


def test_warm_start_loads_every_backbone_weight_from_a_tlloop_checkpoint(tmp_path):
    source = _model(1)
    path = tf.train.Checkpoint(model=source).save(str(tmp_path / "ckpt"))
    target = _model(2)
    head_before = snapshot(target.head)
    assert not np.array_equal(source.backbone.weights[0].numpy(), target.backbone.weights[0])
    report = warm_start(target.backbone, path)
    assert report.root == "model/backbone"
    assert len(report.matched) == len(target.backbone.weights) and not report.missing
    assert not report.unmatched
    for a, b in zip(source.backbone.weights, target.backbone.weights, strict=True):
        assert np.array_equal(a.numpy(), b.numpy())
    # The head is not the backbone: untouched.
    assert all(np.array_equal(v, snapshot(target.head)[k]) for k, v in head_before.items())


def test_warm_start_from_a_plain_checkpoint_of_a_keras_model(tmp_path):
    source = _model(1)
    tf.train.Checkpoint(model=source.backbone).save(str(tmp_path / "plain"))
    target = _model(2)
    report = warm_start(target.backbone, str(tmp_path))  # a checkpoint directory
    assert report.root == "model" and len(report.matched) == len(target.backbone.weights)
    assert np.array_equal(source.backbone.weights[0].numpy(), target.backbone.weights[0].numpy())


def _dense_backbone(units: int, extra: bool = False) -> keras.Model:
    inputs = keras.Input((4,))
    x = keras.layers.Dense(units, name="features")(inputs)
    if extra:
        x = keras.layers.Dense(units, name="more")(x)
    return keras.Model(inputs, x, name="backbone")


def test_warm_start_reports_missing_and_unmatched_variables(tmp_path):
    source = _dense_backbone(3, extra=True)
    path = tf.train.Checkpoint(backbone=source).save(str(tmp_path / "ckpt"))
    target = _dense_backbone(3)  # the first Dense matches, the second is only in the file
    report = warm_start(target, path)
    assert len(report.matched) == 2 and not report.missing
    assert len(report.unmatched) == 2 and all("VARIABLE_VALUE" in k for k in report.unmatched)
    assert "2 matched, 2 unmatched, 0 missing" in report.to_text()


def test_backbone_variables_the_checkpoint_lacks_are_reported_missing_and_kept(tmp_path):
    source = _dense_backbone(3)
    path = tf.train.Checkpoint(backbone=source).save(str(tmp_path / "ckpt"))
    target = _dense_backbone(3, extra=True)  # "more" is only in the model
    before = snapshot(target)
    report = warm_start(target, path)
    assert sorted(report.missing) == ["more/bias", "more/kernel"]
    assert sorted(report.matched) and not report.unmatched
    assert "2 matched, 0 unmatched, 2 missing" in report.to_text()
    assert "missing (kept as built): more/kernel" in report.to_text()
    after = snapshot(target)
    assert changed(before, after) == {"features/kernel"}  # loaded; "more" left as built
    loaded = target.get_layer("features").kernel.numpy()
    np.testing.assert_array_equal(loaded, source.get_layer("features").kernel.numpy())


def test_a_shape_mismatch_names_the_variable_and_loads_nothing(tmp_path):
    path = tf.train.Checkpoint(backbone=_dense_backbone(3)).save(str(tmp_path / "ckpt"))
    target = _dense_backbone(5)
    before = snapshot(target)
    with flag_error(
        r"^--init_checkpoint=.*: variable 'features/kernel' "
        r"has shape \(4, 5\) here but \(4, 3\)",
    ):
        warm_start(target, path)
    assert all(np.array_equal(v, snapshot(target)[k]) for k, v in before.items())


def test_nothing_matched_or_no_checkpoint_is_refused(tmp_path):
    unrelated = tf.Module()
    unrelated.other = tf.Variable(np.zeros((2, 2), np.float32))
    path = tf.train.Checkpoint(thing=unrelated).save(str(tmp_path / "ckpt"))
    with flag_error("no backbone variable matched"):
        warm_start(_dense_backbone(3), path)
    with flag_error(r"^--init_checkpoint='.*nowhere': no checkpoint there"):
        warm_start(_dense_backbone(3), str(tmp_path / "nowhere"))


def test_a_run_warm_started_from_another_run_and_resumed_ignores_the_warm_start(tmp_path):
    donor = str(tmp_path / "donor")
    cli_experiment.train(cli_experiment.build_experiment(make_config(donor, head_epochs=1)), donor)
    workdir = str(tmp_path / "run")
    config = make_config(workdir, init_checkpoint=donor, finetune_epochs=2)
    experiment = cli_experiment.build_experiment(config)
    report = experiment.warm_start
    assert "/checkpoints/best/ckpt-" in report.checkpoint
    assert len(report.matched) == len(experiment.model.backbone.weights)
    donor_backbone = snapshot(experiment.model.backbone)
    results = cli_experiment.train(experiment, workdir)
    assert results["init_checkpoint"]["matched"]

    # The same command again: the experiment is built, so warm-started from the donor, then
    # the run's own (finished) checkpoint is restored over it: the final weights, exactly,
    # and not the donor's backbone. (Re-applied after the restore, the digest would differ.)
    again = cli_experiment.build_experiment(config)
    assert snapshot(again.model.backbone).keys() == donor_backbone.keys()
    resumed = cli_experiment.train(again, workdir)
    assert resumed["weights_sha256"] == results["weights_sha256"]
    assert changed(donor_backbone, snapshot(again.model.backbone))
