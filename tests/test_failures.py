"""Runs that fail after a good start: NaN losses, a full disk, bad image files, a workdir that
cannot be written. Each gives one error line and a non-zero exit, and leaves the last good
checkpoint restorable."""

from __future__ import annotations

import json
import os
import pathlib
import resource
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY_FOLDER_RUN, run_cli
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from tlloop.cli import experiment as cli_experiment

# 25 examples, batch 32: one step per epoch.
SMALL = [
    "--flagfile=experiments/quickstart.flags",
    "--head_epochs=3",
    "--finetune_epochs=2",
    "--quiet",
    "--checkpoint_every_secs=0",
]


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("tlloop: error:")]


def _checkpoint_values(path: str) -> dict[str, np.ndarray]:
    """Every float array of the model in the checkpoint at `path`, by key."""
    reader = tf.train.load_checkpoint(path)
    values = {key: np.asarray(reader.get_tensor(key)) for key in reader.get_variable_to_shape_map()}
    return {
        key: value
        for key, value in values.items()
        if key.startswith("model/") and value.dtype.kind == "f"
    }


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    # Adam's first step moves every head weight by about the learning rate: 1e38 overflows.
    result = run_cli(*SMALL, "--head_lr=1e38", f"--workdir={workdir}")
    assert result.returncode == 1, result.stderr[-2000:]
    [line] = _error_lines(result)
    assert "--nan_policy=stop: the loss or a gradient is NaN or Inf at step 2 (head phase)" in line
    assert "--nan_policy=skip_step" in line and "Traceback" not in result.stderr
    latest = tf.train.latest_checkpoint(str(workdir / "checkpoints"))
    assert latest.endswith("ckpt-0")  # the phase start's; nothing saved after the bad step
    values = _checkpoint_values(latest)
    assert all(np.all(np.isfinite(v)) for v in values.values())
    assert not (workdir / "results.json").exists()


def test_nan_steps_are_skipped_and_counted_with_skip_step(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli(*SMALL, "--head_lr=1e38", "--nan_policy=skip_step", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((workdir / "results.json").read_text())
    # Step 1 applied its update (huge, finite); every later head step is NaN and skipped.
    assert results["nonfinite_steps_skipped"] >= 2
    assert "nan_policy=skip_step: NaN/Inf at step(s) 2" in result.stderr
    # TensorBoard's `nonfinite_steps`: the running count of skipped steps, from step 2 on,
    # one more at each skipped step (one step per call here), ending at the results' count.
    events = event_accumulator.EventAccumulator(
        str(workdir / "tensorboard/train"), size_guidance={"tensors": 0}
    )
    events.Reload()
    counts = {
        e.step: float(tensor_util.make_ndarray(e.tensor_proto))
        for e in events.Tensors("nonfinite_steps")
    }
    skipped = results["nonfinite_steps_skipped"]
    assert min(counts) == 2 and counts[2] == 1.0
    assert sorted(counts.values()) == [float(k) for k in range(1, skipped + 1)]
    assert counts[max(counts)] == skipped
    values = _checkpoint_values(tf.train.latest_checkpoint(str(workdir / "checkpoints")))
    assert all(np.all(np.isfinite(v)) for v in values.values())


def _file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    # Head-phase checkpoints hold the backbone's w0 and the head's Adam slots (~0.77 MB);
    # fine-tune ones hold the backbone's slots too (~1.5 MB). A 1.1 MB file size limit makes
    # the first fine-tune save fail the way a full disk does (EFBIG instead of ENOSPC), as root.
    args = [*SMALL, "--checkpoint_every_steps=1", f"--workdir={workdir}"]
    full = run_cli(*args, preexec_fn=_file_size_limit(1_100_000))
    assert full.returncode == 1, full.stderr[-2000:]
    [line] = _error_lines(full)
    assert "checkpoint at step 3 could not be written" in line and "File too large" in line
    assert "ckpt-3' is intact" in line
    checkpoints = workdir / "checkpoints"
    assert tf.train.latest_checkpoint(str(checkpoints)).endswith("ckpt-3")
    assert not [p for p in os.listdir(checkpoints) if "_temp" in p]  # partial files removed
    assert _checkpoint_values(str(checkpoints / "ckpt-3"))  # readable

    # With space again, the same command resumes from it and finishes.
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "step 3" in resumed.stderr
    assert json.loads((workdir / "results.json").read_text())["phases"][1]["last_step"] == 5


@pytest.fixture
def unwritable(tmp_path):
    """A directory this process cannot write to: immutable for root, read-only otherwise."""
    path = tmp_path / "locked"
    path.mkdir()
    if os.geteuid() == 0:
        if not shutil.which("chattr"):
            pytest.skip("root and no chattr: cannot make a directory unwritable here")
        made = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
        if made.returncode:
            pytest.skip(f"chattr +i not supported here: {made.stderr.decode().strip()}")
        yield path
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o500)
        yield path
        path.chmod(0o700)


def test_a_workdir_that_cannot_be_written_is_refused(unwritable):
    result = run_cli(*SMALL, f"--workdir={unwritable}")
    assert result.returncode == 2
    [line] = _error_lines(result)
    assert f"--workdir='{unwritable}': not writable" in line and "accepted" in line
    assert os.listdir(unwritable) == []


def _image_folder(root: pathlib.Path, corrupt: str | None) -> pathlib.Path:
    rng = np.random.default_rng(1)
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            (root / name / f"{i}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    if corrupt:
        (root / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def test_a_corrupt_image_fails_naming_it_or_is_skipped(tmp_path):
    data = _image_folder(tmp_path / "images", corrupt="b/3.png")
    args = [*TINY_FOLDER_RUN, f"--data_dir={data}"]
    failed = run_cli(*args, f"--workdir={tmp_path / 'fail'}")
    assert failed.returncode == 2
    [line] = _error_lines(failed)
    assert f"image file '{data}/b/3.png': cannot be read or decoded" in line
    assert "--bad_images=skip" in line
    assert not (tmp_path / "fail").exists()

    skipped = run_cli(*args, "--bad_images=skip", f"--workdir={tmp_path / 'skip'}")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "skipped 1 unreadable image file(s)" in skipped.stderr
    results = json.loads((tmp_path / "skip" / "results.json").read_text())
    assert results["skipped_images"] == [f"{data}/b/3.png"]
    assert results["train_size"] + results["eval_size"] == 17


def test_an_export_that_cannot_be_written_fails_with_the_checkpoints_intact(tmp_path):
    from conftest import make_config

    from tlloop.errors import RunFailed

    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "export").write_text("a file where the export directory goes")
    experiment = cli_experiment.build_experiment(make_config(str(workdir), finetune_epochs=0))
    missing = "model.keras, backbone.keras, saved_model not written"
    with pytest.raises(RunFailed, match=rf"^export to '.*' failed: {missing} \(.+\); results"):
        cli_experiment.train(experiment, str(workdir))
    latest = tf.train.latest_checkpoint(str(workdir / "checkpoints"))
    assert latest.endswith("ckpt-3") and _checkpoint_values(latest)
    # The run's results are kept, with what was not exported.
    results = json.loads((workdir / "results.json").read_text())
    assert results["export"]["not_exported"] == ["model.keras", "backbone.keras", "saved_model"]


def test_a_streamed_image_failing_says_what_is_true_and_skip_may_follow(tmp_path):
    data = _image_folder(tmp_path / "images", corrupt="b/3.png")  # starts like a PNG
    workdir = tmp_path / "run"
    args = [
        *TINY_FOLDER_RUN,
        f"--data_dir={data}",
        "--data_memory=0",  # streamed: the image fails when first read
        f"--workdir={workdir}",
    ]
    failed = run_cli(*args)
    assert failed.returncode == 2
    [line] = _error_lines(failed)
    assert f"image file '{data}/b/3.png': cannot be read or decoded" in line
    # It fails in the first batch, before any checkpoint: the line says so, not "intact".
    assert not (workdir / "checkpoints").exists()
    assert line.endswith("no checkpoint was written yet: the same command starts afresh")
    # The remedy it names is accepted on that workdir: not "a run with other flags".
    skipped = run_cli(*args, "--bad_images=skip")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["skipped_images"] == [f"{data}/b/3.png"]
