"""Supervised runs: a training process that dies is reported in one line and restarted."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest
import tensorflow as tf
from conftest import run_cli, start_cli

from tlloop import supervise

# 25 examples, batch 32: 1 step an epoch; 6 head steps, then 6 fine-tune steps.
ARGS = [
    "--flagfile=experiments/quickstart.flags",
    "--head_epochs=6",
    "--finetune_epochs=6",
    "--deterministic",
    "--checkpoint_every_steps=1",
    "--log_every_steps=1",
    "--quiet",
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("whole") / "run"
    done = run_cli(*ARGS, f"--workdir={workdir}")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((workdir / "results.json").read_text())


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("tlloop:")]


def test_a_crash_is_one_line_with_the_step_the_checkpoint_and_the_remedy(tmp_path):
    workdir = tmp_path / "run"
    done = run_cli(*ARGS, f"--workdir={workdir}", env={supervise.FAULT_ENV: "SIGSEGV@4"})
    assert done.returncode == supervise.DIED
    # A SIGSEGV with oneDNN on: its known remedy is tried once, even with --max_restarts=0.
    restart, line = _lines(done.stderr)
    assert restart.startswith("tlloop: the training process died by SIGSEGV (signal 11)")
    assert "restart once in 1 s from that checkpoint with TF_ENABLE_ONEDNN_OPTS=0" in restart
    assert line.startswith("tlloop: error: the training process died by SIGSEGV (signal 11)")
    assert "again at the same step, without progress after step 3 (head phase)" in line
    assert "TF_ENABLE_ONEDNN_OPTS" not in line  # tried: no remedy left to name
    checkpoint = str(workdir / "checkpoints" / "ckpt-3")
    assert f"the last checkpoint ({checkpoint}) is intact" in line
    assert tf.train.load_variable(checkpoint, "step/.ATTRIBUTES/VARIABLE_VALUE") == 3


def test_a_onednn_crash_is_restarted_once_without_onednn(tmp_path):
    workdir = tmp_path / "run"
    # As oneDNN's known crash: only while its kernels are on.
    done = run_cli(*ARGS, f"--workdir={workdir}", env={supervise.FAULT_ENV: "SIGSEGV@4:onednn"})
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = _lines(done.stderr)
    assert "died by SIGSEGV" in line and "with TF_ENABLE_ONEDNN_OPTS=0" in line
    results = json.loads((workdir / "results.json").read_text())
    assert results["restarts"] == 1 and results["restarted_without_onednn"] is True


def test_restarts_resume_and_end_bit_identical(tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    # Dies once, in fine-tune (SIGABRT: a SIGSEGV would be restarted without oneDNN, whose
    # kernels round differently).
    fault = f"SIGABRT@8:once={tmp_path / 'fired'}"
    done = run_cli(
        *ARGS, f"--workdir={workdir}", "--max_restarts=2", env={supervise.FAULT_ENV: fault}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = _lines(done.stderr)
    assert "died by SIGABRT" in line and "restart 1 of 2 in 1 s" in line
    results = json.loads((workdir / "results.json").read_text())
    assert results["restarts"] == 1
    assert results["weights_sha256"] == uninterrupted["weights_sha256"]


def test_a_crash_at_the_same_step_again_stops_the_restarts(tmp_path):
    done = run_cli(
        *ARGS,
        f"--workdir={tmp_path / 'run'}",
        "--max_restarts=3",
        env={supervise.FAULT_ENV: "SIGSEGV@3"},
    )
    assert done.returncode == supervise.DIED
    restart, verdict = _lines(done.stderr)
    assert "restart 1 of 3" in restart
    assert "again at the same step, without progress after step 2" in verdict


def _child_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as file:
            children = [int(c) for c in file.read().split()]
    except OSError:
        return None
    return children[0] if children else None


def _logged_step(workdir) -> int:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]
    return max((row["step"] for row in rows), default=0)


def test_a_child_killed_twice_is_restarted_and_ends_bit_identical(tmp_path, uninterrupted):
    seed = int(os.environ.get("TLLOOP_KILL_SEED", random.randrange(10**6)))
    print(f"kill points from seed {seed} (replay: TLLOOP_KILL_SEED={seed})")
    points = sorted(random.Random(seed).sample(range(2, 11), 2))
    workdir = tmp_path / "run"
    parent = start_cli(*ARGS, f"--workdir={workdir}", "--max_restarts=2")
    try:
        for point in points:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and _logged_step(workdir) < point:
                assert parent.poll() is None, parent.stderr.read()[-2000:]
                time.sleep(0.01)
            child = _child_of(parent.pid)
            assert child is not None, "no training process to kill"
            os.kill(child, signal.SIGKILL)
            while _child_of(parent.pid) == child:  # until the parent has seen it die
                time.sleep(0.01)
        _, stderr = parent.communicate(timeout=180)
    finally:
        if parent.poll() is None:
            os.kill(parent.pid, signal.SIGKILL)
            parent.wait()
    assert parent.returncode == 0, stderr[-3000:]
    assert [
        ("died by SIGKILL" in x, f"restart {i + 1} of 2" in x) for i, x in enumerate(_lines(stderr))
    ] == [(True, True), (True, True)]
    results = json.loads((workdir / "results.json").read_text())
    assert results["restarts"] == 2
    assert results["weights_sha256"] == uninterrupted["weights_sha256"]


def test_sigterm_to_the_supervisor_stops_the_child_cleanly(tmp_path):
    workdir = tmp_path / "run"
    parent = start_cli(*ARGS, f"--workdir={workdir}")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _logged_step(workdir) < 3:
            time.sleep(0.01)
        os.kill(parent.pid, signal.SIGTERM)
        _, stderr = parent.communicate(timeout=120)
    finally:
        if parent.poll() is None:
            os.kill(parent.pid, signal.SIGKILL)
            parent.wait()
    assert parent.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr and "died" not in stderr
    assert tf.train.latest_checkpoint(str(workdir / "checkpoints"))


def test_the_supervisor_reads_a_checkpoint_without_tensorflow(tmp_path):
    assert supervise.position(str(tmp_path)) == ("", 0, "")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-12"\nall_model_checkpoint_paths: "ckpt-12"\n'
    )
    rows = [{"kind": "train", "step": 11, "phase": "head"}, {"step": 12, "phase": "finetune"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert supervise.position(str(tmp_path)) == (
        "finetune phase",
        12,
        str(tmp_path / "checkpoints" / "ckpt-12"),
    )
    assert supervise.describe_death(-9, 0) == "died by SIGKILL (signal 9)"
    assert supervise.remedy(-9, 1.0) == ""  # far from the memory limit: no OOM guess
    limit = supervise.memory_limit_mb()
    assert "OOM killer" in supervise.remedy(-9, 0.9 * limit)
