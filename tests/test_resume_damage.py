"""Resume from the newest intact checkpoint: each checkpoint file missing, truncated or
bit-flipped, the `checkpoint` state file missing or emptied, rotation after a fallback, none
intact, a full disk at the best checkpoint, and a partial last line in metrics.jsonl."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import resource

import numpy as np
import pytest
import tensorflow as tf
from conftest import StopAfter, make_config

from tlloop import checkpoints as checkpoint_lib
from tlloop import trainer
from tlloop.checkpoints import Checkpoints
from tlloop.cli import experiment as cli_experiment
from tlloop.cli.flags import flag_line
from tlloop.config import CheckpointConfig, ConfigError
from tlloop.errors import RunFailed
from tlloop.summaries import Summaries


def _flip(path: pathlib.Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# Damage to checkpoint number n of `directory`; the value: the checkpoint resume must pick.
DAMAGES = {
    "index missing": (lambda d, n: (d / f"ckpt-{n}.index").unlink(), -1),
    "index truncated": (lambda d, n: _truncate(d / f"ckpt-{n}.index"), -1),
    "index bit-flipped": (lambda d, n: _flip(d / f"ckpt-{n}.index"), -1),
    "shard missing": (lambda d, n: (d / f"ckpt-{n}.data-00000-of-00001").unlink(), -1),
    "shard truncated": (lambda d, n: _truncate(d / f"ckpt-{n}.data-00000-of-00001"), -1),
    "shard bit-flipped": (lambda d, n: _flip(d / f"ckpt-{n}.data-00000-of-00001"), -1),
    "state file missing": (lambda d, n: (d / "checkpoint").unlink(), 0),
    "state file emptied": (lambda d, n: (d / "checkpoint").write_text(""), 0),
}


def _saved(directory: pathlib.Path, numbers, keep: int = 3) -> Checkpoints:
    checkpoints = Checkpoints(str(directory), keep=keep, chief=True)
    values = tf.Variable(tf.zeros([4096]))
    checkpoints.track(values=values)
    for number in numbers:
        values.assign(tf.fill(values.shape, float(number)))
        checkpoints.save(number)
    return checkpoints


def _on_disk(directory: pathlib.Path) -> list[int]:
    return sorted(int(p.name[5:-6]) for p in directory.glob("ckpt-*.index"))


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_picks_the_newest_intact_checkpoint_and_rotation_keeps_it(tmp_path, damage, caplog):
    directory = tmp_path / "checkpoints"
    checkpoints = _saved(directory, [1, 2, 3])  # keep 3: ckpt-1, 2, 3
    spoil, offset = DAMAGES[damage]
    spoil(directory, 3)
    with caplog.at_level(logging.WARNING, logger="absl"):
        chosen = checkpoint_lib.resume_point(str(directory))
    assert chosen == str(directory / f"ckpt-{3 + offset}")
    # Said which and why.
    said = caplog.text
    assert f"using ckpt-{3 + offset}" in said and damage.split()[0] in said
    # The resumed run saves on: rotation (keep 3) never deletes the checkpoint resumed from
    # (nor any intact one newer), and the state file lists what is on disk.
    checkpoints.save(3 + offset + 1)
    assert 3 + offset in _on_disk(directory)
    assert tf.train.latest_checkpoint(str(directory)).endswith(f"ckpt-{3 + offset + 1}")
    listed = tf.train.get_checkpoint_state(str(directory)).all_model_checkpoint_paths
    assert sorted(int(p.rsplit("-", 1)[1]) for p in listed) == _on_disk(directory)
    checkpoints.save(3 + offset + 2)
    assert _on_disk(directory) == [3 + offset, 3 + offset + 1, 3 + offset + 2]


def test_a_checkpoint_without_recorded_sums_is_checked_by_reading_it(tmp_path):
    # A checkpoint of an older tlloop (or one whose sums a kill prevented): TensorFlow's own
    # per-value CRC32C finds the flipped bytes.
    directory = tmp_path / "checkpoints"
    _saved(directory, [1, 2])
    (directory / f"ckpt-2{checkpoint_lib.SUMS}").unlink()
    assert checkpoint_lib.resume_point(str(directory)) == str(directory / "ckpt-2")
    _flip(directory / "ckpt-2.data-00000-of-00001")
    assert checkpoint_lib.resume_point(str(directory)) == str(directory / "ckpt-1")


def test_checkpoints_none_intact_refuse_in_one_line(workdir):
    directory = pathlib.Path(workdir) / "checkpoints"
    _saved(directory, [1, 2], keep=2)
    _truncate(directory / "ckpt-2.data-00000-of-00001")
    (directory / "ckpt-1.index").unlink()
    before = sorted(os.listdir(directory))
    config = make_config(workdir, finetune_epochs=0)
    with pytest.raises(ConfigError) as error:
        cli_experiment.train(cli_experiment.build_experiment(config), workdir)
    line = flag_line(error.value)
    assert "\n" not in line and "none is intact" in line
    assert "ckpt-2: data shard ckpt-2.data-00000-of-00001 truncated" in line
    assert "ckpt-1: index file missing" in line and "--overwrite" in line
    assert sorted(os.listdir(directory)) == before  # no silent restart from step 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> trainer.Results:
    workdir = str(tmp_path_factory.mktemp("whole") / "run")
    return cli_experiment.train(cli_experiment.build_experiment(_deterministic(workdir)), workdir)


def _deterministic(workdir: str):
    # 40 examples, batch 16: 3 steps an epoch, 6 in all; a checkpoint every step, keep 3.
    every = CheckpointConfig(every_steps=1, every_secs=0.0, export="last")
    return make_config(workdir, deterministic=True, log_every_steps=1, checkpoint=every)


@pytest.mark.parametrize(
    ("damage", "resumed_at"), [("shard bit-flipped", 3), ("state file missing", 4)]
)
def test_a_damaged_run_resumes_from_the_newest_intact_checkpoint_bit_identical(
    workdir, uninterrupted, caplog, damage, resumed_at
):
    config = _deterministic(workdir)
    with pytest.raises(trainer.Stopped):  # in the fine-tune phase's first epoch, at step 4
        cli_experiment.train(cli_experiment.build_experiment(config), workdir, stop=StopAfter(4))
    directory = pathlib.Path(workdir) / "checkpoints"
    assert _on_disk(directory) == [2, 3, 4]
    DAMAGES[damage][0](directory, 4)
    with caplog.at_level(logging.INFO, logger="absl"):
        resumed = cli_experiment.train(cli_experiment.build_experiment(config), workdir)
    assert f"ckpt-{resumed_at}: phase 2 of 2, step {resumed_at}" in caplog.text
    assert resumed.weights_sha256 == uninterrupted.weights_sha256
    assert resumed.phases[-1]["eval"] == uninterrupted.phases[-1]["eval"]
    lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_a_partial_last_line_in_metrics_jsonl_is_dropped_on_resume(tmp_path):
    summaries = Summaries(str(tmp_path))
    for step in (1, 2, 3):
        summaries.record("train", step, {"loss": 0.5})
    summaries.close()
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"kind": "train", "step": 4, "lo')  # killed mid-write
    resumed = Summaries(str(tmp_path))
    resumed.start_session(2)
    resumed.record("train", 3, {"loss": 0.25})
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 0.5), (2, 0.5), (3, 0.25)]


def test_a_full_disk_at_the_best_checkpoint_names_the_runs_intact_checkpoint(tmp_path):
    _saved(tmp_path / "checkpoints", [0])  # the run's checkpoint at its phase start
    best = Checkpoints(str(tmp_path / "checkpoints" / "best"), keep=1, chief=True)
    best.track(values=tf.Variable(tf.ones([200_000])))  # 800 KB: over the limit below
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, limit[1]))  # a full disk, as EFBIG
    try:
        with pytest.raises(RunFailed) as error:
            best.save(5)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    line = str(error.value)
    assert "no earlier checkpoint exists" not in line
    assert f"the run's last checkpoint '{tmp_path}/checkpoints/ckpt-0' is intact" in line
    assert np.isfinite(
        tf.train.load_variable(
            str(tmp_path / "checkpoints/ckpt-0"), "values/.ATTRIBUTES/VARIABLE_VALUE"
        )
    ).all()
