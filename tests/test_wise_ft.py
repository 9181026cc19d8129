"""WiSE-FT: the interpolations between the head phase's model and the fine-tuned one."""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import SMALL_RUN, StopAfter, flag_error, make_config, run_cli
from tensorboard.backend.event_processing import event_accumulator

import tlloop
from tlloop import checkpoints as checkpoint_lib
from tlloop import trainer
from tlloop.cli import experiment as cli_experiment
from tlloop.config import CheckpointConfig, PhaseConfig, Unfreeze
from tlloop.loop.position import stored
from tlloop.wise_ft import LP, interpolate
from tlloop.workdir import prepare

ALPHAS = "0,0.5,1"
# The export takes a=0.5; the run's own evaluations of both ends are compared with a=0 and a=1
# exactly, so every evaluation goes through the same (uncached) evaluation step.
WISE = dict(
    wise_ft=ALPHAS, wise_ft_export="0.5", export="last", feature_cache="off", deterministic=True
)


def _weights(model) -> list[np.ndarray]:
    """Every weight of `model` but its RNG states, in order."""
    return [np.array(v.numpy()) for v in model.weights if "seed_generator" not in v.path]


class _Snapshots(keras.callbacks.Callback):
    """The model's weights at each epoch's end (epoch 0: the head phase's end)."""

    def __init__(self) -> None:
        super().__init__()
        self.at_epoch_end = []

    def on_epoch_end(self, epoch, logs=None) -> None:
        self.at_epoch_end.append(_weights(self.model))


def test_wise_ft_evaluates_both_ends_exactly_and_exports_the_chosen_interpolation(tmp_path):
    workdir = str(tmp_path / "run")
    config = make_config(workdir, **WISE)
    experiment = cli_experiment.build_experiment(config)
    snapshots = _Snapshots()
    results = cli_experiment.train(experiment, workdir, callbacks=[snapshots])
    head_end, finetuned = snapshots.at_epoch_end

    # theta_LP as saved is the model at the head phase's end, bit for bit.
    lp_path = checkpoint_lib.latest(os.path.join(workdir, "checkpoints", LP))
    fresh = cli_experiment.build_experiment(config).model
    checkpoint_lib.Checkpoints(os.path.dirname(lp_path), keep=1, chief=True).check(lp_path, fresh)
    assert all(np.array_equal(a, b) for a, b in zip(_weights(fresh), head_end, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(head_end, finetuned, strict=True))

    # a=0 is the head phase's model, a=1 the fine-tuned one: their metrics are the run's own
    # evaluations of those models, exactly.
    rows = {row["alpha"]: row["metrics"] for row in results["wise_ft"]}
    assert list(rows) == [0.0, 0.5, 1.0]
    assert rows[0.0] == results["phases"][0]["eval"]
    assert rows[1.0] == results["phases"][1]["eval"]
    assert rows[0.5] != rows[0.0] and rows[0.5] != rows[1.0]
    assert results["wise_ft_export"]["alpha"] == 0.5
    assert results["wise_ft_export"]["theta_ft"] == {
        "weights": "last",
        "step": results["phases"][1]["last_step"],
    }
    assert results["export"]["weights"] == "wise_ft"

    # The export holds (1 - a) * theta_LP + a * theta_FT for a=0.5, BatchNorm statistics too.
    exported = keras.saving.load_model(os.path.join(workdir, "export", "model.keras"))
    expected = [0.5 * lp + 0.5 * ft for lp, ft in zip(head_end, finetuned, strict=True)]
    assert all(np.array_equal(a, b) for a, b in zip(_weights(exported), expected, strict=True))
    paths = [v.path for v in exported.weights if "seed_generator" not in v.path]
    assert any("moving_mean" in path for path in paths)

    # results.json and TensorBoard hold each a's metrics.
    with open(os.path.join(workdir, "results.json")) as file:
        written = json.load(file)
    assert written["wise_ft"] == results["wise_ft"]
    events = event_accumulator.EventAccumulator(
        os.path.join(workdir, "tensorboard", "eval"), size_guidance={"tensors": 0}
    ).Reload()
    for name in ("accuracy", "loss"):
        logged = {
            e.step: float(tf.make_ndarray(e.tensor_proto))
            for e in events.Tensors(f"wise_ft/{name}")
        }
        assert logged == pytest.approx({round(100 * a): m[name] for a, m in rows.items()}, rel=1e-6)

    # Killed during fine-tuning and resumed: WiSE-FT from the theta_LP saved before, the same.
    resumed = str(tmp_path / "resumed")
    prepare(resumed, None, overwrite=False)  # as fit does: the workdir is tlloop's
    with pytest.raises(trainer.Stopped):
        cli_experiment.train(
            cli_experiment.build_experiment(make_config(resumed, **WISE)),
            resumed,
            stop=StopAfter(5),
        )
    stopped = checkpoint_lib.latest(os.path.join(resumed, "checkpoints"))
    assert stored(stopped) == (1, 5)
    again = cli_experiment.train(
        cli_experiment.build_experiment(make_config(resumed, **WISE)), resumed
    )
    assert again["wise_ft"] == results["wise_ft"]
    assert (
        again["wise_ft_export"]["theta_lp"]["step"] == results["wise_ft_export"]["theta_lp"]["step"]
    )
    assert again["weights_sha256"] == results["weights_sha256"]
    # The same command on the finished run computes the same again from its checkpoints.
    finished = cli_experiment.train(
        cli_experiment.build_experiment(make_config(resumed, **WISE)), resumed
    )
    assert finished["wise_ft"] == results["wise_ft"]
    # theta_LP is one of the run's outputs: --overwrite removes it.
    prepare(resumed, None, overwrite=True)
    assert not os.path.exists(os.path.join(resumed, "checkpoints", LP))


def test_resuming_a_run_started_without_wise_ft_with_it_is_refused(workdir):
    with pytest.raises(trainer.Stopped):
        cli_experiment.train(
            cli_experiment.build_experiment(make_config(workdir)), workdir, stop=StopAfter(4)
        )
    with flag_error(r"^--wise_ft: the run in .* holds none \(the run was"):
        cli_experiment.train(
            cli_experiment.build_experiment(make_config(workdir, wise_ft="0,1")), workdir
        )


def test_with_ema_both_ends_are_the_weights_each_phase_evaluated(workdir):
    config = make_config(workdir, **{**WISE, "wise_ft": "0,1", "wise_ft_export": "best"})
    config = dataclasses.replace(
        config, training=dataclasses.replace(config.training, ema_decay=0.5)
    )
    results = cli_experiment.train(cli_experiment.build_experiment(config), workdir)
    rows = [row["metrics"] for row in results["wise_ft"]]
    assert rows == [results["phases"][0]["eval"], results["phases"][1]["eval"]]


def test_interpolate_gives_each_end_bit_for_bit():
    lp = np.array([1.0, -0.0, 3e-8, np.float32(0.1)], np.float32)
    ft = np.array([-0.0, 2.0, 7.0, np.float32(0.3)], np.float32)
    assert interpolate(0.0, lp, ft).tobytes() == lp.tobytes()
    assert interpolate(1.0, lp, ft).tobytes() == ft.tobytes()
    assert interpolate(0.25, lp, ft).dtype == np.float32
    np.testing.assert_array_equal(interpolate(0.25, lp, ft), 0.75 * lp + 0.25 * ft)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"wise_ft": "0,1.5"}, r"^--wise_ft='0,1.5': '1.5' is not in \[0, 1\]; accepted: "),
        ({"wise_ft": "0,x"}, r"^--wise_ft='0,x': 'x' is not in \[0, 1\]"),
        ({"wise_ft": "0.5,0.5"}, r"^--wise_ft='0.5,0.5': a value twice"),
        (
            {"wise_ft": "0,1", "wise_ft_export": "0.5"},
            r"^--wise_ft_export=0.5: not among --wise_ft=0.0,1.0; accepted: best, or one",
        ),
        ({"wise_ft_export": "0.5"}, r"^--wise_ft_export=0.5: not among --wise_ft="),
        ({"wise_ft_export": "half"}, r"^--wise_ft_export='half': not best or a number"),
    ],
)
def test_bad_wise_ft_flags_are_refused_in_one_line(workdir, flags, message):
    with flag_error(message):
        make_config(workdir, **flags)


def test_runs_wise_ft_cannot_act_on_are_refused_before_anything_is_written(workdir):
    with flag_error(r"^--wise_ft=0.0,1.0: no phase trains the backbone"):
        cli_experiment.build_experiment(make_config(workdir, wise_ft="0,1", finetune_epochs=0))
    assert not os.path.exists(workdir)
    options = CheckpointConfig(wise_ft=(0, 1))
    head = PhaseConfig("head", 1, 1e-2, Unfreeze("none"))
    finetune = PhaseConfig("finetune", 1, 1e-3, Unfreeze("all"))
    with pytest.raises(ValueError, match=r"^wise_ft=0.0,1.0: no phase trains the backbone"):
        tlloop.Trainer(workdir, phases=[head], checkpoint=options)
    with pytest.raises(ValueError, match=r"^wise_ft=0.0,1.0: no phase before 'finetune'"):
        tlloop.Trainer(workdir, phases=[finetune], checkpoint=options)
    with pytest.raises(ValueError, match=r"no phase before 'finetune'"):
        tlloop.Trainer(
            workdir,
            phases=[PhaseConfig("head", 0, 1e-2, Unfreeze("none")), finetune],
            checkpoint=options,
        )
    tlloop.Trainer(workdir, phases=[head, finetune], checkpoint=options)  # accepted


def test_two_replicas_evaluate_each_end_as_the_run_did(tmp_path):
    workdir = tmp_path / "run"
    small = [f"--{name}={value}" for name, value in SMALL_RUN.items()]
    result = run_cli(
        *small,
        "--strategy=mirrored",
        "--logical_devices=2",
        "--eval_batch_size=7",  # neither 269 examples nor 2 replicas divide it
        "--feature_cache=off",
        "--wise_ft=0,0.5,1",
        "--quiet",
        f"--workdir={workdir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["replicas"] == 2
    rows = [row["metrics"] for row in results["wise_ft"]]
    assert [row["examples"] for row in rows] == [269] * 3
    assert rows[0] == results["phases"][0]["eval"] and rows[2] == results["phases"][1]["eval"]
