"""The learning-rate range test: what it records, what it suggests, what it leaves behind."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pytest
from conftest import flag_error, make_config, run_cli, snapshot
from tensorboard.backend.event_processing import event_accumulator

from tlloop import lr_range
from tlloop.cli import experiment as cli_experiment
from tlloop.cli.flags import flags_text
from tlloop.cli.head_lr import experiment_range_test
from tlloop.config import TrainingConfig


def test_range_test_rises_geometrically_suggests_and_restores_the_model(workdir):
    experiment = cli_experiment.build_experiment(make_config(workdir))
    before = snapshot(experiment.model)
    result = experiment_range_test(experiment, 0, 1e-5, 1e3, steps=100)
    assert changed_paths(before, snapshot(experiment.model)) == []
    rates = np.asarray(result.rates)
    assert rates[0] == pytest.approx(1e-5, rel=1e-5)
    np.testing.assert_allclose(rates[1:] / rates[:-1], (1e8) ** (1 / 99), rtol=1e-4)
    # Adam at rates up to 1e3 blows the loss up: the test stops there.
    assert result.stopped_early and len(rates) < 100
    # The suggestion is a tenth of a rate the test ran, where the smoothed loss was lowest.
    at = int(np.argmin(np.abs(rates - 10 * result.suggestion)))
    assert rates[at] == pytest.approx(10 * result.suggestion, rel=1e-6)
    assert result.smoothed[at] == min(result.smoothed)
    assert min(result.smoothed) < result.smoothed[0]


def _range_losses(workdir, **training) -> list[float]:
    config = dataclasses.replace(make_config(workdir), training=TrainingConfig(**training))
    return experiment_range_test(
        cli_experiment.build_experiment(config), 0, 1e-3, 1.0, steps=6
    ).losses


def test_range_test_runs_the_runs_own_step(workdir):
    # Same model, same batches, same rates: only the run's training settings differ, and each
    # shows in the losses the test records (it once used plain Adam and plain cross-entropy).
    plain = _range_losses(workdir)
    smoothed = _range_losses(workdir, label_smoothing=0.5)
    sgd = _range_losses(workdir, optimizer="sgd")
    assert abs(smoothed[0] - plain[0]) > 1e-3  # the first step's loss: another loss function
    assert sgd[0] == pytest.approx(plain[0], rel=1e-6)  # same loss before any update...
    assert abs(sgd[-1] - plain[-1]) > 1e-3  # ...another optimizer after a few


def changed_paths(before: dict, after: dict) -> list[str]:
    return [path for path in before if not np.array_equal(before[path], after[path])]


def test_smoothing_is_bias_corrected():
    # fastai's smoothed loss at step i is the average of the losses so far weighted by
    # beta^(i - j): computed here as that normalised weighted mean, not as a recursion. A plain
    # (uncorrected) moving average would start at (1 - beta) x the first loss; a plain mean
    # would weigh old losses as much as new ones.
    losses = [5.0, 1.0, 4.0, 0.5, 3.0, 2.0]
    beta = 0.9
    expected = []
    for i in range(1, len(losses) + 1):
        weights = beta ** np.arange(i - 1, -1, -1)
        expected.append(float(np.sum(weights * losses[:i]) / np.sum(weights)))
    assert lr_range.smooth(losses, beta) == pytest.approx(expected, rel=1e-12)
    assert lr_range.smooth(losses)[0] == 5.0
    assert lr_range.smooth(losses)[1] != pytest.approx(np.mean(losses[:2]))


def test_suggestion_is_a_tenth_of_the_rate_at_the_lowest_smoothed_loss():
    rates = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    assert lr_range.suggest(rates, [3.0, 2.0, 0.5, 1.0, 9.0]) == pytest.approx(1e-3)
    assert lr_range.suggest(rates, [3.0, 2.5, 2.0, 1.5, 1.0]) == pytest.approx(0.1)


def test_lr_find_command_prints_a_suggestion_and_writes_the_curve(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli(
        "--flagfile=experiments/quickstart.flags",
        f"--workdir={workdir}",
        "--find_steps=20",
        "--lr_max=1",
        module="tlloop.lr_find",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("suggested --head_lr=")
    events = event_accumulator.EventAccumulator(
        str(workdir / "lr_find" / "tensorboard" / "train"), size_guidance={"tensors": 0}
    )
    events.Reload()
    assert len(events.Tensors("smoothed_loss")) == len(events.Tensors("learning_rate")) > 5
    assert {"loss_vs_learning_rate", "suggestion"} <= set(events.Tags()["tensors"])
    assert sorted(p.name for p in workdir.iterdir()) == ["lr_find"]  # nothing else written

    bad = run_cli(
        "--flagfile=experiments/quickstart.flags",
        f"--workdir={workdir}",
        "--lr_min=1",
        "--lr_max=0.1",
        module="tlloop.lr_find",
    )
    assert bad.returncode == 2 and "--lr_min=1 / --lr_max=0.1: not a rising range" in bad.stderr


# --head_lr=auto: the range test chooses the head phase's rate before training.


def test_head_lr_auto_trains_the_head_at_the_suggestion_and_keeps_auto_in_the_flags(workdir):
    config = make_config(workdir, head_lr="auto", deterministic=True)
    assert config.phases[0].learning_rate == "auto"
    experiment = cli_experiment.build_experiment(config)
    found = experiment.found_rate
    plain = cli_experiment.build_experiment(config, find_rates=False)  # same seed, same model
    expected = experiment_range_test(plain, 0, *lr_range.RANGE_TEST)
    assert found.rate == pytest.approx(expected.suggestion, rel=1e-6)
    assert found.steps == len(expected.rates) and found.seconds > 0 and not found.reused
    assert experiment.phases[0].config.learning_rate == found.rate
    assert experiment.phases[1].config.learning_rate == 1e-3  # the fine-tune rate as given
    assert experiment.config.phases[0].learning_rate == "auto"  # flags.txt keeps the choice
    assert "--head_lr=auto" in flags_text(experiment.config)

    results = cli_experiment.train(experiment, workdir)
    assert results["found_rate"]["rate"] == found.rate
    with open(os.path.join(workdir, "found_rate.json")) as file:
        assert json.load(file)["rate"] == found.rate


def test_head_lr_auto_reuses_the_recorded_rate_when_resuming_unless_overwriting(workdir):
    os.makedirs(workdir, exist_ok=True)
    record = {"phase": "head", "rate": 0.0123, "steps": 61, "seconds": 2.5}
    with open(os.path.join(workdir, "found_rate.json"), "w") as file:
        json.dump({**record, "stopped_early": True}, file)
    experiment = cli_experiment.build_experiment(make_config(workdir, head_lr="auto"))
    assert experiment.found_rate.reused and experiment.found_rate.rate == 0.0123
    assert experiment.phases[0].config.learning_rate == 0.0123
    assert "no range test" in experiment.found_rate.line()

    fresh = cli_experiment.build_experiment(make_config(workdir, head_lr="auto", overwrite=True))
    assert not fresh.found_rate.reused and fresh.found_rate.rate != 0.0123

    with open(os.path.join(workdir, "found_rate.json"), "w") as file:
        file.write("{not json")
    with flag_error(r"found_rate\.json'?: not the rate record"):
        cli_experiment.build_experiment(make_config(workdir, head_lr="auto"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"finetune_lr": "auto"}, "--finetune_lr='auto': the range test runs before training"),
        ({"head_lr": "auto", "head_epochs": 0}, "the head phase, which has 0 epochs"),
        ({"head_lr": "fast"}, "--head_lr='fast': not a positive number"),
        ({"head_lr": "-1"}, "--head_lr='-1': not a positive number"),
    ],
)
def test_rate_flags_refuse_what_they_cannot_take(workdir, flags, message):
    with flag_error(re.escape(message)):
        make_config(workdir, **flags)


def test_a_trainer_refuses_a_phase_whose_rate_is_still_auto(workdir):
    experiment = cli_experiment.build_experiment(
        make_config(workdir, head_lr="auto"), find_rates=False
    )
    assert experiment.found_rate is None
    with pytest.raises(ValueError, match="'head' has learning_rate='auto'"):
        experiment.trainer().fit(
            experiment.model, experiment.data.train_examples, experiment.data.eval_examples
        )


def test_head_lr_auto_from_the_command_line_resumes_at_the_same_rate(tmp_path):
    workdir = tmp_path / "run"
    command = (
        "--flagfile=experiments/quickstart.flags",
        f"--workdir={workdir}",
        "--head_lr=auto",
        "--head_epochs=1",
        "--finetune_epochs=1",
    )
    first = run_cli(*command)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "--head_lr=auto: " in first.stderr and "range test of" in first.stderr
    rate = json.loads((workdir / "results.json").read_text())["found_rate"]["rate"]
    again = run_cli(*command)  # the finished run, resumed: no second test, the same rate
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"--head_lr=auto: {rate:.3g}, the rate this run's first start found" in again.stderr
