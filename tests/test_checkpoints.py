"""Kill and resume: checkpoints, the input position, RNG states, flags of a resumed run."""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf
from conftest import REPO, make_config, run_cli, start_cli
from tensorboard.backend.event_processing import plugin_event_accumulator

from tlloop.checkpoints import Checkpoints, latest
from tlloop.cli import experiment as cli_experiment
from tlloop.config import CheckpointConfig

# 65 examples, batch 32: 3 steps per epoch; head steps 1-60, fine-tune steps 61-90. Dropout
# and augmentation are on, so a resumed run also needs the RNG states to end bit-identical.
ARGS = [
    "--flagfile=experiments/quickstart.flags",
    "--train_examples_per_class=13",
    "--head_epochs=20",
    "--finetune_epochs=10",
    "--deterministic",
    "--checkpoint_every_steps=1",
    "--log_every_steps=1",
    "--quiet",
]
HEAD_STEPS, TOTAL_STEPS = 60, 90


def _start(workdir: pathlib.Path, *extra: str) -> subprocess.Popen:
    return start_cli(*ARGS, *extra, f"--workdir={workdir}")


def _train_steps(workdir: pathlib.Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [row["step"] for row in rows if row["kind"] == "train"]


def _run_until(workdir: pathlib.Path, step: int, sig: int, *extra: str) -> subprocess.Popen:
    """Starts the run and sends `sig` once it has logged `step`; the process is reaped."""
    process = _start(workdir, *extra)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and max(_train_steps(workdir), default=0) < step:
            assert process.poll() is None, process.stderr.read()[-2000:]
            time.sleep(0.01)
        os.kill(process.pid, sig)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    return process


def _latest_step(workdir: pathlib.Path) -> int:
    path = tf.train.latest_checkpoint(str(workdir / "checkpoints"))
    return int(path.rsplit("-", 1)[1])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_cli(*ARGS, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return {**json.loads((workdir / "results.json").read_text()), "rows": _train_rows(workdir)}


def _train_rows(workdir: pathlib.Path) -> dict[int, dict]:
    """Train rows of metrics.jsonl by step: loss and accuracy of that step's batch."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: (row["loss"], row["accuracy"]) for row in rows if row["kind"] == "train"}


def test_killed_twice_and_resumed_ends_bit_identical(tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    # Kill points are drawn at random; the seed is printed (shown with a failure) and
    # TLLOOP_KILL_SEED=<seed> replays them.
    seed = int(os.environ.get("TLLOOP_KILL_SEED") or random.randrange(2**32))
    print(f"kill points seed: {seed} (replay with TLLOOP_KILL_SEED={seed})")
    rng = random.Random(seed)
    first = rng.randint(5, HEAD_STEPS - 20)
    _run_until(workdir, first, signal.SIGKILL)
    killed_at = _latest_step(workdir)
    assert 0 < killed_at < HEAD_STEPS, f"first kill should land in the head phase: {killed_at}"

    second = rng.randint(HEAD_STEPS + 3, TOTAL_STEPS - 12)
    _run_until(workdir, second, signal.SIGKILL)
    # The resumed run's first step saw the batch the uninterrupted run saw at that step: the
    # same loss and accuracy, bit for bit, on the same weights.
    resumed_first = killed_at + 1
    assert _train_rows(workdir)[resumed_first] == uninterrupted["rows"][resumed_first]
    killed_at = _latest_step(workdir)
    assert HEAD_STEPS < killed_at < TOTAL_STEPS, (
        f"second kill should land in fine-tune: {killed_at}"
    )

    result = run_cli(*ARGS, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    assert _train_rows(workdir)[killed_at + 1] == uninterrupted["rows"][killed_at + 1]
    results = json.loads((workdir / "results.json").read_text())
    assert results["weights_sha256"] == uninterrupted["weights_sha256"]
    assert results["best"] == uninterrupted["best"]  # the best so far survives the kills
    assert results["phases"] == uninterrupted["phases"] or [
        (p["name"], p["last_step"], p["eval"]) for p in results["phases"]
    ] == [(p["name"], p["last_step"], p["eval"]) for p in uninterrupted["phases"]]

    # Every step logged once, in order, in metrics.jsonl and as TensorBoard reads it.
    assert _train_steps(workdir) == list(range(1, TOTAL_STEPS + 1))
    # TensorBoard's own reader (the one its server uses) drops what the killed runs wrote
    # past their checkpoints.
    events = plugin_event_accumulator.EventAccumulator(
        str(workdir / "tensorboard/train"), size_guidance={"tensors": 0}
    )
    events.Reload()
    assert [e.step for e in events.Tensors("loss")] == list(range(1, TOTAL_STEPS + 1))


def test_sigterm_saves_a_checkpoint_at_the_current_step(tmp_path):
    workdir = tmp_path / "run"
    no_periodic = ["--checkpoint_every_steps=0", "--checkpoint_every_secs=0"]
    process = _run_until(workdir, 10, signal.SIGTERM, *no_periodic)
    assert process.returncode == 143
    last = max(_train_steps(workdir))
    assert last >= 10 and _latest_step(workdir) == last

    # The same command resumes at the next step; other flags are refused with the difference.
    changed = run_cli(*ARGS, *no_periodic, "--head_epochs=21", f"--workdir={workdir}")
    assert changed.returncode == 2
    error = changed.stderr.strip().splitlines()[-1]
    assert "holds a run with other flags (--head_epochs=20 -> --head_epochs=21)" in error
    resumed = run_cli(*ARGS, *no_periodic, f"--workdir={workdir}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _train_steps(workdir) == list(range(1, TOTAL_STEPS + 1))


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    workdir = tmp_path / "run"
    small = ["--head_epochs=1", "--finetune_epochs=0", "--checkpoint_every_steps=0"]
    assert run_cli(*ARGS, *small, f"--workdir={workdir}").returncode == 0
    # Same flags file, but the model behind the checkpoint changes: a different backbone.
    flags_txt = (workdir / "flags.txt").read_text()
    (workdir / "flags.txt").write_text(
        flags_txt.replace(
            "--backbone=experiments/pretrained/small_cnn_digits0-4.keras", "--backbone=small_cnn"
        ).replace("--weights=\n", "--weights=none\n")
    )
    result = run_cli(
        *ARGS, *small, "--backbone=small_cnn", "--weights=none", f"--workdir={workdir}"
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("tlloop: error:")]
    assert len(errors) == 1 and "does not fit this model" in errors[0]
    assert errors[0].startswith("tlloop: error: checkpoint ")
    assert "Traceback" not in result.stderr


def _checkpoint_numbers(directory: pathlib.Path) -> list[int]:
    """The checkpoints on disk (by their index files) and in the `checkpoint` file."""
    on_disk = sorted(int(p.name[5:-6]) for p in directory.glob("ckpt-*.index"))
    state = tf.train.get_checkpoint_state(str(directory))
    listed = sorted(int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths)
    assert on_disk == listed
    return on_disk


def test_checkpoints_by_time_and_only_the_last_keep_checkpoints_kept(tmp_path):
    # 3 steps per epoch, 2 head epochs: saves at the phase start (0) and end (6). By time
    # (every 1 microsecond) each host call saves too; --keep_checkpoints=2 keeps the last two.
    workdir = tmp_path / "run"
    checkpoint = CheckpointConfig(every_steps=0, every_secs=1e-6, keep=2)
    config = make_config(str(workdir), head_epochs=2, finetune_epochs=0, checkpoint=checkpoint)
    cli_experiment.train(cli_experiment.build_experiment(config), str(workdir))
    # Step 5 is no phase boundary: only a save by time wrote it.
    assert _checkpoint_numbers(workdir / "checkpoints") == [5, 6]

    # The default (every 600 s) saves no step in between, and keeps 3.
    other = tmp_path / "default"
    config = make_config(str(other), head_epochs=2, finetune_epochs=0)
    assert config.checkpoint.every_secs == 600 and config.checkpoint.keep == 3
    cli_experiment.train(cli_experiment.build_experiment(config), str(other))
    assert _checkpoint_numbers(other / "checkpoints") == [0, 6]


# Saves tlloop Checkpoints of one large variable (64 MB) filled with the checkpoint's number,
# forever, announcing each save before and after it.
_SAVER = """
import sys
import tensorflow as tf
from tlloop.checkpoints import Checkpoints, latest
directory = sys.argv[1]
values = tf.Variable(tf.zeros([16 * 1024 * 1024]))
checkpoints = Checkpoints(directory, keep=2, chief=True)
checkpoints.track(values=values)
previous = latest(directory)
number = int(previous.rsplit("-", 1)[1]) + 1 if previous else 1
while True:
    values.assign(tf.fill(values.shape, float(number)))
    print("saving", number, flush=True)
    checkpoints.save(number)
    print("saved", number, flush=True)
    number += 1
"""


def _saves_until_killed(directory: pathlib.Path, fraction: float) -> tuple[int, bool]:
    """Starts the saver, times one whole save, then SIGKILLs it (by its pid) `fraction` of a
    save's duration into the next one. Returns (the number being saved, whether that save had
    not finished when the process died)."""
    process = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(directory)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        lines, started = [], {}
        while time.monotonic() < deadline:
            line = process.stdout.readline().split()
            assert line, "the saver died on its own"
            lines.append(line)
            if line[0] == "saving":
                started[line[1]] = time.monotonic()
            elif len(started) == 1:  # the first save finished: time it, kill in the second
                duration = time.monotonic() - started[line[1]]
                assert process.stdout.readline().split()[0] == "saving"
                time.sleep(fraction * duration)
                os.kill(process.pid, signal.SIGKILL)
                break
        else:
            raise AssertionError("no save finished in 60 s")
        process.wait(timeout=30)
        rest = process.stdout.read().split()
        number = int(line[1]) + 1
        return number, "saved" not in rest
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_the_latest_and_readable(tmp_path):
    seed = int(os.environ.get("TLLOOP_KILL_SEED") or random.randrange(2**32))
    print(f"kill points seed: {seed} (replay with TLLOOP_KILL_SEED={seed})")
    rng = random.Random(seed)
    directory = tmp_path / "checkpoints"
    mid_save = 0
    for _ in range(3):
        # In the first half of a save: its second part records the files' sums, after
        # TensorFlow has already made the new checkpoint the latest.
        number, interrupted = _saves_until_killed(directory, rng.uniform(0.05, 0.5))
        path = latest(str(directory))
        newest = int(path.rsplit("-", 1)[1])
        print(f"killed saving {number}: finished={not interrupted}, latest {path}")
        # The save under way is the latest once TensorFlow has pointed the `checkpoint` file
        # at it (a kill can still land after that, while old checkpoints are deleted);
        # before that, the previous one is.
        assert newest in ((number - 1, number) if interrupted else (number,)), path
        mid_save += newest == number - 1
        restored = tf.Variable(tf.zeros([16 * 1024 * 1024]))
        checkpoint = Checkpoints(str(directory), keep=2, chief=True)
        checkpoint.track(values=restored)
        checkpoint.restore(path)
        assert float(tf.reduce_min(restored)) == float(tf.reduce_max(restored)) == newest
    assert mid_save >= 1, "no kill landed inside a save: the saves are too quick to hit here"
