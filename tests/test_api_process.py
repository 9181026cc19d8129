"""The API in processes of its own: two replicas, and SIGKILL + re-running the same script."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf
from conftest import REPO, python_command, run_python

from tlloop.supervise import FAULT_ENV

SCRIPT = os.path.join(REPO, "tests", "api_script.py")
TOTAL_STEPS = 36  # 6 steps an epoch, 3 + 3 epochs


def _run(workdir, *extra: str) -> dict:
    done = run_python(SCRIPT, str(workdir), *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_replicas_count_every_evaluation_example_once(tmp_path):
    for stream in ((), ("--stream",)):
        result = _run(tmp_path / f"run{len(stream)}", "--replicas=2", *stream)
        assert result["replicas"] == 2
        # 13 examples in batches of 4 split over 2 replicas: the last batch padded, none twice.
        assert result["eval_examples"] == [13, 13] and result["evaluate_examples"] == 13


def _latest_step(workdir) -> int:
    path = tf.train.latest_checkpoint(str(workdir / "checkpoints"))
    return int(path.rsplit("-", 1)[1]) if path else 0


def _kill_after(workdir, step: int) -> None:
    """Starts the script and SIGKILLs it (by its own pid) once it has checkpointed `step`."""
    process = subprocess.Popen(
        **python_command(SCRIPT, str(workdir)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _latest_step(workdir) < step:
            assert process.poll() is None, "the script ended before it was killed"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    return _run(tmp_path_factory.mktemp("whole") / "run")


def test_sigkill_and_rerun_of_an_api_script_ends_bit_identical(tmp_path, uninterrupted):
    seed = int(os.environ.get("TLLOOP_KILL_SEED", random.randrange(10**6)))
    print(f"kill points from seed {seed} (replay: TLLOOP_KILL_SEED={seed})")
    rng = random.Random(seed)
    workdir = tmp_path / "killed"
    for low, high in ((3, 15), (21, 33)):  # once in each phase
        _kill_after(workdir, rng.randint(low, high))
        assert low <= _latest_step(workdir) < TOTAL_STEPS
    resumed = _run(workdir)
    assert resumed["weights_sha256"] == uninterrupted["weights_sha256"]


def test_the_supervise_command_restarts_an_api_script_that_crashed(tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    fault = f"SIGABRT@20:once={tmp_path / 'fired'}"  # once, in the fine-tune phase
    done = run_python(
        "-m",
        "tlloop.supervise",
        f"--workdir={workdir}",
        "--max_restarts=1",
        "--",
        sys.executable,
        SCRIPT,
        str(workdir),
        env={FAULT_ENV: fault},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "died by SIGABRT (signal 6)" in done.stderr and "restart 1 of 1" in done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["weights_sha256"] == uninterrupted["weights_sha256"]
