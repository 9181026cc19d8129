"""The workdir: what tlloop wrote (its manifest) and --overwrite, files it did not write, one run
at a time (the lock), the flags compared on resume, an export a kill interrupted."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import time

import keras
import numpy as np
import pytest
from conftest import flag_error, python_command, run_cli, start_cli

import tlloop
from tlloop import workdir as workdir_lib
from tlloop.config import ConfigError

HEADER = "# Resolved flags of this run; re-run with --flagfile=flags.txt\n"


def _flags(**values) -> str:
    return HEADER + "".join(f"--{name}={value}\n" for name, value in values.items())


def _prepare(path, flags_text=None, *, overwrite=False) -> bool:
    """prepare, then the lock given back (a test process runs many 'runs')."""
    try:
        return workdir_lib.prepare(str(path), flags_text, overwrite=overwrite)
    finally:
        workdir_lib.release(str(path))


def _write(path: pathlib.Path, text: str = "x") -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_files_tlloop_did_not_write_where_it_writes_are_refused_even_with_overwrite(tmp_path):
    onnx = _write(tmp_path / "u" / "export" / "m.onnx", "mine")
    results = _write(tmp_path / "u" / "results.json", "{}")
    (tmp_path / "u" / "tensorboard").mkdir()  # an empty directory holds nothing to lose
    with pytest.raises(ConfigError) as error:
        _prepare(tmp_path / "u", _flags(head_epochs=1), overwrite=True)
    line = str(error.value)
    assert "\n" not in line and "holds files tlloop did not write" in line
    assert "export/m.onnx" in line and "results.json" in line and "tensorboard" not in line
    assert onnx.read_text() == "mine" and results.read_text() == "{}"
    assert sorted(os.listdir(tmp_path / "u")) == ["export", "results.json", "tensorboard"]


def test_overwrite_removes_exactly_what_tlloop_wrote(tmp_path):
    run = tmp_path / "run"
    assert _prepare(run, _flags(head_epochs=1)) is False
    assert (run / workdir_lib.MANIFEST).exists()
    tlloops = [
        run / "checkpoints" / "checkpoint",
        run / "checkpoints" / "ckpt-3.index",
        run / "checkpoints" / "ckpt-3.data-00000-of-00001",
        run / "checkpoints" / "best" / "ckpt-2.index",
        run / "tensorboard" / "events.out.tfevents.1.host",
        run / "tensorboard" / "train" / "events.out.tfevents.2.host",
        run / "tensorboard" / "train" / "plugins" / "profile" / "trace.json.gz",
        run / "export" / "model.keras",
        run / "export" / "saved_model" / "saved_model.pb",
        run / "export" / "model_int8.tflite",
        run / "metrics.jsonl",
        run / "results.json",
    ]
    for path in tlloops:
        _write(path)
    # Files the user put beside them, in tlloop's places and outside them.
    mine = [run / "export" / "m.onnx", run / "checkpoints" / "notes.txt", run / "notes.txt"]
    for path in mine:
        _write(path, "mine")
    assert _prepare(run, _flags(head_epochs=2), overwrite=True) is False
    assert [p for p in tlloops if p.exists()] == []
    assert all(p.read_text() == "mine" for p in mine)
    assert not (run / "tensorboard").exists()  # emptied, so removed
    assert (run / "flags.txt").read_text() == _flags(head_epochs=2)


def test_a_workdir_of_a_tlloop_without_manifest_is_adopted(tmp_path):
    run = tmp_path / "old"
    _write(run / "flags.txt", _flags(head_epochs=1))
    model = _write(run / "export" / "model.keras")
    assert _prepare(run, _flags(head_epochs=1)) is True  # resumed, not refused
    assert model.exists() and (run / workdir_lib.MANIFEST).exists()
    assert _prepare(run, _flags(head_epochs=3), overwrite=True) is False
    assert not model.exists()


def test_the_workdir_spelled_otherwise_and_bad_input_policies_may_change_on_resume(tmp_path):
    first = _flags(workdir=tmp_path / "q", bad_images="fail", nan_policy="stop", head_epochs=1)
    assert _prepare(tmp_path / "q", first) is False
    moved = tmp_path / "moved"
    os.rename(tmp_path / "q", moved)
    again = _flags(workdir=f"{moved}/", bad_images="skip", nan_policy="skip_step", head_epochs=1)
    assert _prepare(f"{moved}/", again) is True
    other = _flags(workdir=moved, bad_images="skip", nan_policy="skip_step", head_epochs=2)
    with flag_error(r"other flags \(--head_epochs=1 -> --head_epochs=2\)"):
        _prepare(moved, other)


_HOLD = (
    "import sys, time; from tlloop.workdir import lock; lock(sys.argv[1]); "
    "print('locked', flush=True); time.sleep(120)"
)


def test_a_second_run_is_refused_naming_the_holder_until_it_ends_even_by_sigkill(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        **python_command("-c", _HOLD, str(run)), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        who = f"in use by another tlloop run (pid {holder.pid} on host {socket.gethostname()})"
        with flag_error(f"^--workdir='{run}': {re.escape(who)}.*accepted"):
            _prepare(run, _flags(head_epochs=1))
        # Through the library too, before anything is written.
        inputs = keras.Input((8, 8, 3))
        backbone = keras.Model(inputs, keras.layers.Conv2D(2, 3)(inputs))
        features = keras.Input(backbone.output.shape[1:])
        pooled = keras.layers.GlobalAveragePooling2D()(features)
        model = tlloop.TransferModel(backbone, keras.Model(features, keras.layers.Dense(2)(pooled)))
        trainer = tlloop.Trainer(str(run), phases=[tlloop.Phase("head", 1, 1e-2)])
        data = (np.zeros((4, 8, 8, 3), np.float32), np.array([0, 1, 0, 1]))
        with pytest.raises(ValueError, match=f"workdir='{run}': {re.escape(who)}"):
            trainer.fit(model, data, data)
        assert sorted(os.listdir(run)) == [workdir_lib.STATE_DIR]
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # the OS releases the lock of a killed process
        holder.wait(timeout=30)
    assert _prepare(run, _flags(head_epochs=1)) is False


def test_two_launches_on_one_workdir_the_second_is_refused_the_first_unchanged(tmp_path):
    run = tmp_path / "run"
    # 40 epochs of one step: long enough for the second launch to start up meanwhile.
    args = ["--flagfile=experiments/quickstart.flags", "--head_epochs=25", "--finetune_epochs=15"]
    args += ["--quiet", f"--workdir={run}"]
    first = start_cli(*args, "--nosupervise")
    try:
        lock = run / workdir_lib.LOCK
        while not (lock.exists() and lock.read_text()):
            assert first.poll() is None, first.stderr.read()[-2000:]
            time.sleep(0.05)
        second = run_cli(*args)
        assert first.poll() is None, "the first run ended before the second was refused"
        assert second.returncode == 2
        [line] = [x for x in second.stderr.splitlines() if x.startswith("tlloop: error:")]
        assert f"in use by another tlloop run (pid {first.pid} on host " in line
        assert first.wait(timeout=240) == 0, first.stderr.read()[-2000:]
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
    rows = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(rows) == len(set(rows)) == 40  # one evaluation per epoch, none twice
    assert len(list((run / "checkpoints").glob("ckpt-*.index"))) == 3
    assert len(list((run / "tensorboard" / "train").glob("events.out.tfevents.*"))) == 1


def test_an_export_a_kill_interrupted_is_put_back_and_its_leftovers_removed(tmp_path):
    run = tmp_path / "run"
    _prepare(run, _flags(head_epochs=1))
    export = run / "export"
    # Killed between the two renames: the old SavedModel aside, the new one not yet in place.
    _write(export / ".old-k2j4h1x0" / "saved_model" / "saved_model.pb", "old")
    _write(export / ".tmp-9fz3q1ab" / "saved_model.pb", "half")
    _write(export / ".tmp-a8d7s6f5.keras", "half")
    _write(export / "model.keras", "whole")
    _prepare(run, _flags(head_epochs=1))
    assert (export / "saved_model" / "saved_model.pb").read_text() == "old"
    assert sorted(os.listdir(export)) == ["model.keras", "saved_model"]
    # An older tlloop named what it moved aside "previous"; a whole SavedModel stays.
    _write(export / ".old-x" / "previous" / "saved_model.pb", "older")
    _prepare(run, _flags(head_epochs=1))
    assert (export / "saved_model" / "saved_model.pb").read_text() == "old"
    assert sorted(os.listdir(export)) == ["model.keras", "saved_model"]


# Replaces a SavedModel twice; the second time the process dies (SIGKILL) or raises between
# the two renames (the old one moved aside, the new one not yet in place).
_REPLACE = """
import os, signal, sys
import tensorflow as tf
from tlloop.workdir import replace_directory

def saved_model(value):
    module = tf.Module()
    module.value = tf.Variable(value)
    return lambda path: tf.saved_model.save(module, path)

target = sys.argv[1]
replace_directory(target, saved_model(1.0))
replace = os.replace
def dies(source, destination):
    if os.path.basename(source).startswith(".tmp-"):
        if sys.argv[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise KeyboardInterrupt
    replace(source, destination)
os.replace = dies
try:
    replace_directory(target, saved_model(2.0))
except KeyboardInterrupt:
    print("interrupted")
"""


@pytest.mark.parametrize("how", ["kill", "raise"])
def test_an_export_interrupted_between_its_renames_leaves_a_usable_saved_model(tmp_path, how):
    import tensorflow as tf

    from tlloop.workdir import recover_export as recover

    target = tmp_path / "export" / "saved_model"
    done = subprocess.run(
        **python_command("-c", _REPLACE, str(target), how), capture_output=True, timeout=120
    )
    assert done.returncode == (-signal.SIGKILL if how == "kill" else 0), done.stderr[-2000:]
    if how == "kill":
        assert not target.exists()  # the gap a kill can land in ...
        recover(str(tmp_path / "export"))  # ... which the next start closes
    assert sorted(os.listdir(tmp_path / "export")) == ["saved_model"]
    assert float(tf.saved_model.load(str(target)).value.numpy()) == 1.0
