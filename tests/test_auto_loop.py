"""--steps_per_loop=auto: fewer host calls, the same run as one step per call."""

from __future__ import annotations

import json
import os

import pytest
import tensorflow as tf
from conftest import REPO, flag_error, make_config

from tlloop import trainer
from tlloop.cli import experiment as cli_experiment
from tlloop.cli.config import from_flags
from tlloop.loop.position import AutoLoop


def _run(workdir: str, steps_per_loop: str) -> tuple[dict, list[dict], list[str]]:
    config = make_config(
        workdir,
        steps_per_loop=steps_per_loop,
        per_class=20,  # 100 examples, batch 16: 7 steps per epoch
        head_epochs=2,
        finetune_epochs=1,
        augment="translate:0.2",  # random draws and Dropout: the RNG must follow the steps
        log_every_steps=3,
        checkpoint_every_steps=5,
        keep_checkpoints=10,
        deterministic=True,
    )
    results = cli_experiment.train(cli_experiment.build_experiment(config), workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as file:
        rows = [json.loads(line) for line in file]
    for row in rows:  # the host's timing of each call differs; everything else must not
        row.pop("examples_per_second", None)
        row.pop("step_time_ms", None)
    state = tf.train.get_checkpoint_state(os.path.join(workdir, "checkpoints"))
    saved = [path.rsplit("-", 1)[1] for path in state.all_model_checkpoint_paths]
    return results, rows, saved


def test_auto_runs_the_same_steps_in_fewer_host_calls(tmp_path):
    one, one_rows, one_saved = _run(str(tmp_path / "one"), "1")
    auto, auto_rows, auto_saved = _run(str(tmp_path / "auto"), "auto")
    assert auto.weights_sha256 == one.weights_sha256  # bit-identical weights
    assert auto_rows == one_rows  # the same logged rows and evaluations
    assert auto_saved == one_saved  # checkpoints at the same steps (every 5, phase ends)
    calls = [
        (p["host_calls"], q["host_calls"]) for p, q in zip(auto.phases, one.phases, strict=True)
    ]
    assert [q for _, q in calls] == [14, 7]  # one per step
    assert all(p < q for p, q in calls)


def test_auto_loop_times_calls_after_the_traced_one_at_about_a_second_each():
    # The docs' promise (the Defaults page), in its words: "about a second's worth at most".
    with open(os.path.join(REPO, "docs", "defaults.md"), encoding="utf-8") as file:
        assert "about a second's worth at most" in " ".join(file.read().split())
    loop = AutoLoop()
    assert loop.steps() == 1
    loop.observe(1, 5.0)  # the traced call: not a measure of a step
    assert loop.steps() == 1
    loop.observe(1, 0.01)  # 10 ms a step: a second is 100 steps (numbers written out, not
    assert loop.steps() == 100  # computed from the constant under test)
    loop.observe(4, 4 * 0.3)  # 0.3 s a step: 3 steps, 0.9 s
    assert loop.steps() == 3
    loop.observe(2, 2 * 3.0)  # slower than a second a step: one step a call
    assert loop.steps() == 1
    loop.observe(100, 1e-6)  # fast steps: at most 1000 a call
    assert loop.steps() == 1000


def test_steps_per_loop_takes_auto_or_a_count():
    assert from_flags({"workdir": "w"}).steps_per_loop == "auto"
    assert from_flags({"workdir": "w", "steps_per_loop": "8"}).steps_per_loop == 8
    for bad in ("0", "fast", "-2"):
        with flag_error(rf"^--steps_per_loop='{bad}': not auto or a step"):
            from_flags({"workdir": "w", "steps_per_loop": bad})
    with pytest.raises(ValueError, match=r"^steps_per_loop=0: not auto or a step count"):
        trainer.Trainer("w", phases=[trainer.PhaseConfig("head", 1, 1e-3)], steps_per_loop=0)
