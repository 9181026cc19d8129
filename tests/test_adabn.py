"""AdaBN (bn_mode="adapt"): every backbone BatchNorm takes the exact statistics of the training
images once, before the first phase, at any depth; frozen after; checkpointed, not redone on
resume; the same on 1 and 2 replicas."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import StopAfter, flag_error, make_config, run_cli, snapshot
from tensorboard.backend.event_processing import event_accumulator

import tlloop
from tlloop import adabn, trainer
from tlloop.cli import config as cli_config
from tlloop.cli import experiment as cli_experiment
from tlloop.config import PhaseConfig
from tlloop.data.examples import InMemoryExamples, StreamedExamples


@keras.saving.register_keras_serializable("test_adabn")
class Block(keras.layers.Layer):
    """A custom layer holding its own BatchNorm (not in any functional graph)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(4, 3, padding="same", name="block_conv")
        self.norm = keras.layers.BatchNormalization(name="block_norm")

    def call(self, x, training=None):
        return keras.ops.relu(self.norm(self.conv(x), training=training))


def make_backbone(seed: int = 0) -> keras.Model:
    """Conv -> BatchNorm -> ReLU -> Dropout -> Block (conv, nested BatchNorm): old statistics
    far from the data's, a Dropout in front of the nested BatchNorm (off during adaptation)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="top_norm")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dropout(0.5)(x)
    outputs = Block(name="block")(x)
    backbone = keras.Model(inputs, outputs, name="backbone")
    rng = np.random.default_rng(seed)
    for layer in adabn.batch_norms(backbone):
        channels = layer.moving_mean.shape[0]
        layer.moving_mean.assign(rng.normal(size=channels).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.5, 3.0, size=channels).astype("float32"))
    return backbone


def images(n: int = 40, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, size=(n, 8, 8, 3)).astype("float32"), np.arange(n) % 3


def reference(backbone: keras.Model, x: np.ndarray) -> dict[str, tuple]:
    """Per BatchNorm: the mean and (biased) variance over examples and positions of its
    inputs as `backbone` computes them, from a model that outputs them."""
    top, block = backbone.get_layer("top_norm"), backbone.get_layer("block")
    top_inputs = keras.Model(backbone.input, top.input).predict(x, verbose=0)
    block_inputs = keras.Model(backbone.input, block.input).predict(x, verbose=0)
    nested_inputs = block.conv(block_inputs).numpy()
    found = {}
    for name, values in (("top_norm", top_inputs), ("block_norm", nested_inputs)):
        values = values.astype(np.float64).reshape(-1, values.shape[-1])
        found[name] = (values.mean(0), values.var(0))
    return found


def statistics(backbone) -> dict[str, tuple]:
    return {
        layer.name: (layer.moving_mean.numpy(), layer.moving_variance.numpy())
        for layer in adabn.batch_norms(backbone)
    }


def assert_population(backbone, expected: dict) -> None:
    found = statistics(backbone)
    assert found.keys() == expected.keys()
    for name, (mean, variance) in expected.items():
        np.testing.assert_allclose(found[name][0], mean, rtol=1e-4, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(found[name][1], variance, rtol=1e-4, err_msg=name)


def test_adapt_takes_the_population_statistics_at_any_depth_and_nothing_else():
    x, y = images()
    backbone = make_backbone()
    before_adapting = reference(backbone, x)
    before = snapshot(backbone)
    # 40 examples in batches of 16: two full batches and a partial one, merged exactly.
    adapted = adabn.adapt(backbone, InMemoryExamples(x, y), batch_size=16)
    # Each BatchNorm holds the statistics of its inputs in the adapted network: the nested
    # one's inputs changed when the first was adapted, so a second pass took them (a third
    # would change nothing: two layers in a chain take two passes).
    expected = reference(backbone, x)
    assert_population(backbone, expected)
    assert adapted["passes"] == 2
    first, nested = before_adapting["top_norm"][0], before_adapting["block_norm"][0]
    np.testing.assert_allclose(expected["top_norm"][0], first, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(expected["block_norm"][0] - nested)) > 0.01  # not one pass's
    after = snapshot(backbone)
    moved = {path for path in before if not np.array_equal(before[path], after[path])}
    assert len(moved) == 4 and all(p.endswith(("moving_mean", "moving_variance")) for p in moved)
    report = adapted["layers"]
    assert [row["layer"] for row in report] == [bn.path for bn in adabn.batch_norms(backbone)]
    assert all(row["mean_shift"] > 0.1 and row["count"] == 40 * 64 for row in report)
    # Streamed examples (a tf.data pipeline in its own order) give the same statistics.
    streamed = make_backbone()
    adabn.adapt(streamed, StreamedExamples(tf.data.Dataset.from_tensor_slices((x, y))), 7)
    assert_population(streamed, expected)


def test_a_fit_adapts_once_then_keeps_the_statistics_frozen(tmp_path, monkeypatch):
    x, y = images()
    twin = make_backbone()  # the same weights: adapted here, on its own
    adabn.adapt(twin, InMemoryExamples(x, y))
    expected = reference(twin, x)
    calls = []
    original = adabn.adapt
    monkeypatch.setattr(adabn, "adapt", lambda *a, **k: calls.append(1) or original(*a, **k))
    backbone = make_backbone()
    model = tlloop.TransferModel(backbone, tlloop.classification_head(backbone, 3))
    before = snapshot(backbone)
    phases = [
        PhaseConfig("head", 1, 1e-2, bn_mode="adapt"),
        PhaseConfig("finetune", 2, 1e-2, unfreeze="all", bn_mode="adapt"),
    ]
    workdir = str(tmp_path / "run")
    fit = tlloop.Trainer(workdir, phases=phases, seed=0)
    results = fit.fit(model, (x, y), (x[:10], y[:10]), batch_size=16, export=False)
    assert calls == [1]
    # Fine-tuning moved the convolutions; the statistics stayed those adaptation set.
    assert not np.array_equal(before["conv/kernel"], backbone.get_layer("conv").kernel.numpy())
    assert_population(backbone, expected)
    gamma = backbone.get_layer("top_norm").gamma.numpy()
    np.testing.assert_array_equal(gamma, before["top_norm/gamma"])  # frozen as "frozen" is
    adapted = results["bn_adapt"]
    assert not adapted["resumed"] and adapted["passes"] == 2 and len(adapted["layers"]) == 2
    with open(os.path.join(workdir, "results.json")) as file:
        assert json.load(file)["bn_adapt"] == adapted
    events = event_accumulator.EventAccumulator(
        os.path.join(workdir, "tensorboard", "train"), size_guidance={"tensors": 0}
    )
    tags = events.Reload().Tags()["tensors"]
    assert "bn_adapt/mean_shift/top_norm" in tags and "bn_adapt" in tags


def test_a_resumed_run_does_not_adapt_again_and_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    calls = []
    original = adabn.adapt
    monkeypatch.setattr(adabn, "adapt", lambda *a, **k: calls.append(1) or original(*a, **k))
    workdir = str(tmp_path / "resumed")
    config = make_config(workdir, bn_mode="adapt", deterministic=True)
    with pytest.raises(trainer.Stopped):
        cli_experiment.train(cli_experiment.build_experiment(config), workdir, stop=StopAfter(4))
    assert calls == [1]
    experiment = cli_experiment.build_experiment(config)
    resumed = cli_experiment.train(experiment, workdir)
    assert calls == [1]  # the checkpoint said it was done
    assert resumed["bn_adapt"]["resumed"]
    other = str(tmp_path / "uninterrupted")
    whole = cli_experiment.train(
        cli_experiment.build_experiment(make_config(other, bn_mode="adapt", deterministic=True)),
        other,
    )
    assert calls == [1, 1]
    assert resumed["weights_sha256"] == whole["weights_sha256"]
    assert resumed["bn_adapt"]["layers"] == whole["bn_adapt"]["layers"]
    assert resumed["bn_adapt"]["passes"] == whole["bn_adapt"]["passes"] == 3
    # The shipped backbone's three BatchNorm layers moved to the digits 5-9 statistics.
    assert [row["layer"] for row in whole["bn_adapt"]["layers"]] == ["bn1", "bn2", "bn3"]
    assert all(row["mean_change"] > 0 for row in whole["bn_adapt"]["layers"])


def test_resuming_a_run_that_did_not_adapt_is_refused(tmp_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(trainer.Stopped):
        cli_experiment.train(
            cli_experiment.build_experiment(make_config(workdir)), workdir, stop=StopAfter(2)
        )
    experiment = cli_experiment.build_experiment(make_config(workdir, bn_mode="adapt"))
    with flag_error(r"bn_mode=adapt: checkpoint .* did not adapt"):
        cli_experiment.train(experiment, workdir)


def _bn_statistics(workdir) -> dict[str, np.ndarray]:
    model = keras.saving.load_model(os.path.join(workdir, "export", "model.keras"))
    return {
        f"{layer.path}/{name}": getattr(layer, name).numpy()
        for layer in adabn.batch_norms(model.backbone)
        for name in ("moving_mean", "moving_variance")
    }


def test_two_replicas_adapt_to_the_statistics_of_one(tmp_path):
    args = [
        "--classes=5-9",
        "--train_examples_per_class=13",
        "--head_epochs=1",
        "--finetune_epochs=0",  # the head phase adapts too: --bn_mode is the run's
        "--bn_mode=adapt",
        "--recipe=guide",
        "--quiet",
    ]
    found = []
    for name, extra in (("one", []), ("two", ["--strategy=mirrored", "--logical_devices=2"])):
        workdir = tmp_path / name
        result = run_cli(*args, *extra, f"--workdir={workdir}")
        assert result.returncode == 0, result.stderr[-3000:]
        results = json.loads((workdir / "results.json").read_text())
        assert results["replicas"] == (2 if extra else 1)
        found.append((results["bn_adapt"], _bn_statistics(workdir)))
    (report_one, one), (report_two, two) = found
    assert report_one == report_two and len(report_one["layers"]) == 3
    assert one.keys() == two.keys()
    for key in one:
        np.testing.assert_array_equal(one[key], two[key], err_msg=key)


def test_the_flag_adapts_before_the_head_phase_too_and_a_bad_mode_is_named(tmp_path):

    config = make_config(str(tmp_path), bn_mode="adapt", finetune_epochs=0)
    assert [phase.bn_mode for phase in config.phases] == ["adapt", "adapt"]
    assert cli_config.flag_values(config)["bn_mode"] == "adapt"  # flags.txt says it back
    with flag_error(r"--bn_mode='adabn': unknown; accepted: .*adapt"):
        PhaseConfig("finetune", 1, 1e-3, bn_mode="adabn")


def test_adapt_on_a_backbone_without_batch_norm_is_refused_before_anything_is_written(tmp_path):
    x, y = images()
    inputs = keras.Input(x.shape[1:])
    backbone = keras.Model(inputs, keras.layers.Conv2D(4, 3, name="conv")(inputs), name="plain")
    model = tlloop.TransferModel(backbone, tlloop.classification_head(backbone, 3))
    workdir = tmp_path / "run"
    fit = tlloop.Trainer(str(workdir), phases=[PhaseConfig("head", 1, 1e-2, bn_mode="adapt")])
    with pytest.raises(ValueError, match=r"^bn_mode=adapt: the backbone \(plain\) holds no Batch"):
        fit.fit(model, (x, y), (x[:10], y[:10]), batch_size=16, export=False)
    assert not workdir.exists()
