"""L2-SP (--l2sp, --l2sp_head) and where fine-tuning moved the weights (drift from w0)."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import StopAfter, flag_error, make_config, run_cli
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from tlloop import config as config_lib
from tlloop import trainer
from tlloop.checkpoints import latest
from tlloop.cli import experiment as cli_experiment

ALPHA, BETA = 0.5, 0.05
# 40 examples, batch 16: 3 steps per epoch; head steps 1-3, fine-tune steps 4-9, where only
# conv3 trains (top:1; BatchNorm frozen).
L2SP_RUN = dict(
    l2sp=ALPHA,
    l2sp_head=BETA,
    unfreeze="top:1",
    finetune_epochs=2,
    finetune_lr=1e-2,
    log_every_steps=1,
    checkpoint_every_steps=1,
    keep_checkpoints=20,
    export="last",
)


def _rows(workdir: pathlib.Path, kind: str = "train") -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["kind"] == kind]


def _fresh_model(workdir: pathlib.Path, checkpoint: str | None = None):
    """The run's model as built (w0), or with a checkpoint's weights."""
    model = cli_experiment.build_experiment(make_config(str(workdir), **L2SP_RUN)).model
    if checkpoint:
        tf.train.Checkpoint(model=model).restore(checkpoint).expect_partial()
    return model


def _tensor_scalars(logdir: pathlib.Path, prefix: str) -> dict[str, dict[int, float]]:
    sizes = {"tensors": 0}  # the default keeps only 10 events per tag
    events = event_accumulator.EventAccumulator(str(logdir), size_guidance=sizes)
    events.Reload()
    return {
        tag: {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)}
        for tag in events.Tags()["tensors"]
        if tag.startswith(prefix)
    }


@pytest.fixture(scope="module")
def l2sp_run(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    workdir = tmp_path_factory.mktemp("l2sp") / "run"
    config = make_config(str(workdir), **L2SP_RUN)
    results = cli_experiment.train(cli_experiment.build_experiment(config), str(workdir))
    return workdir, results


def test_logged_penalty_equals_numpy_from_the_saved_w0_and_each_steps_weights(l2sp_run):
    workdir, _ = l2sp_run
    start = _fresh_model(workdir)
    # The checkpoint's w0 are the backbone's weights as the run started, in the walk's order.
    reader = tf.train.load_checkpoint(latest(str(workdir / "checkpoints")))
    saved = sorted(k for k in reader.get_variable_to_shape_map() if k.startswith("anchors/"))
    w0 = {v.path: v.numpy() for v in start.backbone.weights if "seed_generator" not in v.path}
    assert len(saved) == len(w0)
    for key in saved:
        value = reader.get_tensor(key)
        assert any(v.shape == value.shape and np.array_equal(v, value) for v in w0.values())

    rows = {row["step"]: row for row in _rows(workdir)}
    assert all(rows[s]["l2sp"] == 0.0 for s in (1, 2, 3, 4))  # frozen, then at w0
    for step in range(4, 9):  # the penalty logged at step s + 1: of the weights after step s
        model = _fresh_model(workdir, str(workdir / "checkpoints" / f"ckpt-{step}"))
        now = {v.path: v.numpy() for v in model.backbone.weights}
        pulled = [p for p in w0 if p.startswith("conv3/")]  # the trainable backbone weights
        expected = ALPHA / 2 * sum(np.sum((now[p].astype(np.float64) - w0[p]) ** 2) for p in pulled)
        kernels = [v.numpy() for v in model.head.weights if v.path.endswith("kernel")]
        head = BETA / 2 * sum(np.sum(k.astype(np.float64) ** 2) for k in kernels)
        assert rows[step + 1]["l2sp"] == pytest.approx(expected, rel=1e-5)
        assert rows[step + 1]["l2sp_head"] == pytest.approx(head, rel=1e-5)
    assert rows[9]["l2sp"] > 0
    # The same values as TensorBoard scalars of their own.
    logged = _tensor_scalars(workdir / "tensorboard" / "train", "l2sp")
    for step, row in rows.items():
        assert logged["l2sp"][step] == pytest.approx(row["l2sp"], rel=1e-6)
        assert logged["l2sp_head"][step] == pytest.approx(row["l2sp_head"], rel=1e-6)


def test_drift_is_zero_for_frozen_layers_and_equals_numpy_in_results_and_tensorboard(l2sp_run):
    workdir, results = l2sp_run
    start = _fresh_model(workdir)
    w0 = {v.path: v.numpy().astype(np.float64) for v in start.backbone.weights}
    scalars = _tensor_scalars(workdir / "tensorboard" / "eval", "drift/")
    on_disk = json.loads((workdir / "results.json").read_text())
    for index, phase in enumerate(results["phases"]):
        step = phase["last_step"]
        model = _fresh_model(workdir, str(workdir / "checkpoints" / f"ckpt-{step}"))
        now = {v.path: v.numpy().astype(np.float64) for v in model.backbone.weights}
        layers = {path.rsplit("/", 1)[0] for path in w0}
        assert set(phase["drift"]) == layers == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3"}
        assert on_disk["phases"][index]["drift"] == phase["drift"]
        for layer, value in phase["drift"].items():
            paths = [p for p in w0 if p.startswith(layer + "/")]
            moved = sum(np.sum((now[p] - w0[p]) ** 2) for p in paths)
            expected = np.sqrt(moved / sum(np.sum(w0[p] ** 2) for p in paths))
            assert value == pytest.approx(expected, rel=1e-6, abs=0)
            assert scalars[f"drift/{layer}"][step] == pytest.approx(value, rel=1e-6)
    head, finetune = results["phases"]
    assert set(head["drift"].values()) == {0.0}  # the head phase trains no backbone layer
    assert finetune["drift"]["conv3"] > 0
    frozen = {k: v for k, v in finetune["drift"].items() if k != "conv3"}
    assert set(frozen.values()) == {0.0}  # exactly: untouched by the fine-tune phase
    # One value per evaluation (every epoch): steps 3, 6 and 9.
    assert sorted(scalars["drift/conv3"]) == [3, 6, 9]


def _finetune_drift(workdir: pathlib.Path, l2sp: float) -> dict:
    config = make_config(
        str(workdir),
        head_epochs=0,
        finetune_epochs=2,
        optimizer="sgd",
        finetune_lr=3e-3,
        unfreeze="all",
        l2sp=l2sp,
    )
    return cli_experiment.train(cli_experiment.build_experiment(config), str(workdir))["phases"][0][
        "drift"
    ]


def test_a_large_l2sp_keeps_the_backbone_near_w0_where_plain_fine_tuning_leaves(tmp_path):
    # SGD (momentum 0.9) at 3e-3 for 6 steps from a random head: plain fine-tuning moves the
    # conv layers by 1.17, 0.39 and 0.10 of their norm (measured); with ALPHA = 300 (rate x
    # ALPHA = 0.9: a strong, stable pull) by 0.28, 0.16 and 0.05.
    plain = _finetune_drift(tmp_path / "plain", 0.0)
    anchored = _finetune_drift(tmp_path / "l2sp", 300.0)
    bound = 0.5
    assert max(plain.values()) > bound
    assert max(anchored.values()) < bound
    for layer in ("conv1", "conv2", "conv3"):
        assert anchored[layer] < 0.6 * plain[layer]


def test_l2sp_resumes_bit_identical_with_the_first_starts_w0(tmp_path):
    last = config_lib.CheckpointConfig(export="last")
    config = dict(L2SP_RUN, deterministic=True, checkpoint=last, keep_checkpoints=3)
    whole = tmp_path / "whole"
    expected = cli_experiment.train(
        cli_experiment.build_experiment(make_config(str(whole), **config)), whole
    )
    resumed = tmp_path / "resumed"
    experiment = cli_experiment.build_experiment(make_config(str(resumed), **config))
    with pytest.raises(trainer.Stopped):  # in the fine-tune phase: conv3 has moved from w0
        cli_experiment.train(experiment, str(resumed), stop=StopAfter(6))
    # The same model object resumes: it holds the stopped weights, not w0; only the
    # checkpoint's w0 give the uninterrupted run's penalty.
    results = cli_experiment.train(experiment, str(resumed))
    assert results["weights_sha256"] == expected["weights_sha256"]
    speed = ("examples_per_second", "step_time_ms")
    rows = [
        [{k: v for k, v in r.items() if k not in speed} for r in _rows(w)] for w in (resumed, whole)
    ]
    assert rows[0][-3:] == rows[1][-3:]
    assert results["phases"][1]["drift"] == expected["phases"][1]["drift"]


def test_l2sp_refuses_decoupled_weight_decay_on_the_same_weights():
    with flag_error(r"^--weight_decay=0\.01: .*--l2sp"):
        config_lib.TrainingConfig(l2sp=0.1, weight_decay=0.01)
    with flag_error(r"^--l2sp=-1\.0: negative"):
        config_lib.TrainingConfig(l2sp=-1.0)
    assert dataclasses.asdict(config_lib.TrainingConfig(l2sp=0.1, l2sp_head=0.2))["l2sp"] == 0.1


# Two replicas against one: the same penalty (added once per global step) and weights.
REPLICA_RUN = [
    "--flagfile=experiments/quickstart.flags",
    "--train_examples_per_class=8",
    "--batch_size=16",
    "--head_epochs=1",
    "--finetune_epochs=2",
    "--finetune_lr=1e-2",
    "--augment=",  # no randomness that differs per replica
    "--dropout=0",
    "--l2sp=0.5",
    "--l2sp_head=0.05",
    "--log_every_steps=1",
    "--export=last",
    "--quiet",
]


def test_two_replicas_give_the_penalty_and_weights_of_one(tmp_path):
    runs = {}
    for name, extra in (("one", ["--strategy=default"]), ("two", ["--strategy=mirrored"])):
        workdir = tmp_path / name
        if name == "two":
            extra += ["--logical_devices=2"]
        result = run_cli(*REPLICA_RUN, *extra, f"--workdir={workdir}")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = workdir
    assert json.loads((runs["two"] / "results.json").read_text())["replicas"] == 2
    one, two = _rows(runs["one"]), _rows(runs["two"])
    assert [r["step"] for r in one] == [r["step"] for r in two]
    assert one[-1]["l2sp"] > 0
    for a, b in zip(one, two, strict=True):  # a per-replica sum would be twice as large
        assert b["l2sp"] == pytest.approx(a["l2sp"], rel=1e-4, abs=1e-9)
        assert b["l2sp_head"] == pytest.approx(a["l2sp_head"], rel=1e-4)
    weights = [
        {v.path: v.numpy() for v in keras.saving.load_model(run / "export/model.keras").weights}
        for run in runs.values()
    ]
    assert max(float(np.abs(weights[0][k] - weights[1][k]).max()) for k in weights[0]) < 1e-5


def test_a_checkpoint_written_before_w0_was_kept_still_restores(tmp_path):
    from tlloop.anchors import Anchors
    from tlloop.checkpoints import Checkpoints

    inputs = keras.Input((4,))
    backbone = keras.Model(inputs, keras.layers.Dense(3, name="dense")(inputs))
    anchors = Anchors(backbone)
    start = [v.numpy() for v in anchors.variables]
    # An earlier tlloop's checkpoint: the model's weights (moved since the start), no w0.
    moved = [w.numpy() + 1.0 for w in backbone.weights]
    for weight, value in zip(backbone.weights, moved, strict=True):
        weight.assign(value)
    old = tf.train.Checkpoint(model=backbone).save(str(tmp_path / "old" / "ckpt"))
    for weight in backbone.weights:
        weight.assign(tf.zeros_like(weight))

    checkpointer = Checkpoints(str(tmp_path / "run"), keep=2, chief=True)
    checkpointer.track(model=backbone, anchors=anchors.variables)
    checkpointer.restore(old)  # refused as "does not fit this model" before
    assert all(np.array_equal(w.numpy(), v) for w, v in zip(backbone.weights, moved, strict=True))
    assert all(np.array_equal(a.numpy(), v) for a, v in zip(anchors.variables, start, strict=True))
    # A checkpoint that holds w0 restores it.
    for anchor in anchors.variables:
        anchor.assign(anchor + 5.0)
    checkpointer.save(7)
    for anchor in anchors.variables:
        anchor.assign(tf.zeros_like(anchor))
    checkpointer.restore(latest(str(tmp_path / "run")))
    assert all(
        np.array_equal(a.numpy(), v + 5.0) for a, v in zip(anchors.variables, start, strict=True)
    )
