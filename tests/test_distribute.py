"""MirroredStrategy on 2 logical CPUs and MultiWorkerMirroredStrategy on 127.0.0.1.

Multi-replica runs go through the command line in subprocesses: logical devices can only be
made before TensorFlow initialises, which the test process has long done.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from conftest import PRETRAINED, REPO, flag_error, python_command, run_cli, start_cli

import tlloop
import tlloop.models  # registers tlloop's Keras classes
from tlloop import distribute
from tlloop.cli import experiment as cli_experiment
from tlloop.cli import flags as tlloop_flags
from tlloop.cli import strategy as cli_strategy
from tlloop.cli.config import DistributeConfig, ModelConfig
from tlloop.cli.model import build_model
from tlloop.models import ModeTable
from tlloop.steps import Metrics, StepOptions, compile_train

# Both phases, several steps each, no randomness that differs per replica (dropout, augment),
# and an evaluation batch (7) that neither 269 examples nor 2 replicas divide.
SMALL = [
    "--flagfile=experiments/quickstart.flags",
    "--train_examples_per_class=13",
    "--head_epochs=2",
    "--finetune_epochs=2",
    "--dropout=0",
    "--augment=",
    "--eval_batch_size=7",
    "--log_every_steps=1",
    "--export=last",  # compare the final weights, whichever evaluation was best
]
MIRRORED = ["--strategy=mirrored", "--logical_devices=2"]


def _run(workdir: pathlib.Path, *args: str) -> dict:
    result = run_cli(*SMALL, *args, f"--workdir={workdir}")  # after the flagfile: it wins
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((workdir / "results.json").read_text())


def _by_submodule(model) -> dict[str, np.ndarray]:
    """Every weight (RNG states excluded) keyed "submodule/variable path"."""
    return {
        f"{name}/{v.path}": v.numpy()
        for name in ("augment", "backbone", "head")
        for v in getattr(model, name).weights
        if "seed_generator" not in v.path
    }


def _weights(path) -> dict[str, np.ndarray]:
    return _by_submodule(keras.saving.load_model(path))


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.fixture(scope="module")
def single_device(tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("single") / "run"
    results = _run(workdir, "--strategy=default")
    assert results["replicas"] == 1
    assert all(phase["eval"]["examples"] == 269 for phase in results["phases"])
    return workdir


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory) -> pathlib.Path:
    """The plain 2-replica run (no XLA), shared with the multi-worker test."""
    workdir = tmp_path_factory.mktemp("mirrored") / "run"
    _run(workdir, *MIRRORED)
    return workdir


@pytest.mark.parametrize("jit", [False, True], ids=["plain", "jit_compile"])
def test_mirrored_matches_one_device(request, tmp_path, single_device, jit):
    extra = ["--jit_compile"] if jit else []
    if jit:
        run = tmp_path / "run"
        results = _run(run, *MIRRORED, *extra)
    else:
        run = request.getfixturevalue("mirrored")
        results = json.loads((run / "results.json").read_text())
    assert results["replicas"] == 2
    # Every evaluation counted each of the 269 examples exactly once across both replicas.
    assert [phase["eval"]["examples"] for phase in results["phases"]] == [269, 269]

    mirrored = _weights(run / "export/model.keras")
    single = _weights(single_device / "export/model.keras")
    # The all-reduce adds two half-batch gradients where one device reduces the whole batch:
    # float32 noise (benchmarks/results/FIGURES.md has the measured differences). XLA also
    # reorders float32 sums, which can flip the sign of a gradient that is ~0; Adam then moves
    # that weight by up to its learning rate the other way. So with XLA: 99% of weights within
    # 1e-5 and none further than Adam can move a weight in the fine-tune steps (6 x 3e-4).
    differences = np.concatenate([np.abs(mirrored[k] - single[k]).ravel() for k in single])
    if jit:
        assert np.mean(differences > 1e-5) < 0.01
        assert differences.max() <= 6 * 3e-4
    else:
        assert differences.max() < 1e-5

    pretrained = {v.path: v.numpy() for v in keras.saving.load_model(PRETRAINED).weights}
    statistics = [p for p in pretrained if "moving" in p]
    assert statistics
    for path in statistics:  # backbone/bn1/moving_mean in the model, bn1/moving_mean alone
        assert np.array_equal(mirrored[f"backbone/{path}"], pretrained[path])
    # Logged per-step values are those of the global batch, whatever the replica count.
    logged = [_train_rows(run), _train_rows(single_device)]
    assert [row["step"] for row in logged[0]] == [row["step"] for row in logged[1]]
    # A per-replica value would be tens of percent off. With XLA the few weights that move
    # apart (below) shift the last steps' gradient norm by up to 1.4e-3 (measured).
    tolerance = 1e-2 if jit else 1e-4
    for mirrored_row, single_row in zip(*logged, strict=True):
        for key in ("loss", "accuracy", "gradient_norm"):
            assert mirrored_row[key] == pytest.approx(single_row[key], rel=tolerance, abs=1e-6)

    initial = _initial_weights(*SMALL, *MIRRORED, *extra)
    for path in (p for p in initial if p.startswith("head/")):
        assert not np.array_equal(mirrored[path], initial[path])
    assert results["phases"][0]["eval"]["accuracy"] > 0.3  # chance is 0.2


def _train_rows(workdir: pathlib.Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["kind"] == "train"]


def _initial_weights(*args: str) -> dict[str, np.ndarray]:
    """The weights a run with `args` starts from, rebuilt in this process from the same flags."""
    values = flags.FlagValues()
    tlloop_flags.define_flags(values)
    cwd = os.getcwd()
    os.chdir(REPO)  # the flagfile's paths are relative to the repository
    try:
        values(["tlloop", "--workdir=unused", *args])
        experiment = cli_experiment.build_experiment(tlloop_flags.to_config(values))
    finally:
        os.chdir(cwd)
    return _by_submodule(experiment.model)


def test_mirrored_batchnorm_in_training_mode_is_synchronized(tmp_path):
    args = ["--head_epochs=1", "--finetune_epochs=3", "--bn_mode=train"]
    _run(tmp_path / "single", *args, "--strategy=default")
    _run(tmp_path / "mirrored", *args, *MIRRORED)
    single = _weights(tmp_path / "single/export/model.keras")
    mirrored = _weights(tmp_path / "mirrored/export/model.keras")
    # Synchronized batch statistics come from an all-reduced sum and sum of squares, not
    # one pass over the batch: 5e-4 apart after 9 steps. Unsynchronized replicas, each with
    # its half batch, end 3e-2 apart (measured by switching synchronization off).
    assert _max_difference(mirrored, single) < 2e-3
    moved = [p for p in single if "moving_mean" in p]
    pretrained = {v.path: v.numpy() for v in keras.saving.load_model(PRETRAINED).weights}
    assert all(not np.array_equal(mirrored[p], pretrained[p.split("/", 1)[1]]) for p in moved)
    assert moved


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_worker(index: int, ports: list[int], workdir, *args: str) -> subprocess.Popen:
    tf_config = {
        "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
        "task": {"type": "worker", "index": index},
    }
    return start_cli(
        *args,
        "--strategy=multi_worker",
        f"--workdir={workdir}",
        env={"TF_CONFIG": json.dumps(tf_config)},
    )


def _finish(processes: list[subprocess.Popen], timeout: float) -> list[str]:
    """Each process's stderr; any still running after `timeout` is SIGKILLed by its pid."""
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for process in processes:
            remaining = max(deadline - time.monotonic(), 0.1)
            try:
                outputs.append(process.communicate(timeout=remaining)[1])
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)  # they ignore SIGTERM while in collectives
                outputs.append(process.communicate()[1])
    finally:
        for process in processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
    return outputs


def test_two_worker_cluster_on_localhost(tmp_path, single_device, mirrored):
    workdir = tmp_path / "run"
    ports = _free_ports(2)
    workers = [_start_worker(i, ports, workdir, *SMALL) for i in range(2)]
    logs = _finish(workers, timeout=240)
    assert [w.returncode for w in workers] == [0, 0], logs[0][-2000:] + logs[1][-2000:]

    digests = [
        line.rsplit(" ", 1)[-1]
        for log in logs
        for line in log.splitlines()
        if "final weights sha256" in line
    ]
    assert len(digests) == 2 and digests[0] == digests[1]  # the same weights on both workers
    results = json.loads((workdir / "results.json").read_text())
    assert results["replicas"] == 2 and results["weights_sha256"] == digests[0]
    # Two workers of one replica each take the same steps as one process with two replicas.
    mirrored_digest = json.loads((mirrored / "results.json").read_text())["weights_sha256"]
    multi = _weights(workdir / "export/model.keras")
    assert results["weights_sha256"] == mirrored_digest, _max_difference(
        multi, _weights(mirrored / "export/model.keras")
    )
    assert [phase["eval"]["examples"] for phase in results["phases"]] == [269, 269]

    # Only the chief wrote: one export, one event file per writer, all from one process.
    assert sorted(p.name for p in (workdir / "export").iterdir()) == [
        "backbone.keras",
        "model.keras",
        "saved_model",
    ]
    events = sorted((workdir / "tensorboard").glob("*/events.out.tfevents.*"))
    assert [p.parent.name for p in events] == ["eval", "train"]
    assert len({p.name.split(".")[4] for p in events}) == 1  # one writer process (its pid)
    assert _max_difference(multi, _weights(single_device / "export/model.keras")) < 1e-5


def test_a_worker_whose_peer_never_starts_exits_with_a_clear_error(tmp_path):
    workdir = tmp_path / "run"
    started = time.monotonic()
    (worker,) = [_start_worker(0, _free_ports(2), workdir, "--cluster_timeout_secs=3")]
    (log,) = _finish([worker], timeout=90)
    # The watchdog ends the training process with SIGKILL (TensorFlow ignores SIGTERM there);
    # its supervisor, seeing the line it left, exits as a shell reports that: 137.
    assert worker.returncode == 128 + signal.SIGKILL
    assert time.monotonic() - started < 60
    error = [line for line in log.splitlines() if line.startswith("tlloop: error:")]
    assert len(error) == 1 and "--cluster_timeout_secs=3" in error[0]
    assert "did not come up" in error[0] and "waiting for 127.0.0.1:" in error[0]
    assert not workdir.exists()


def test_the_library_strategy_takes_arguments_and_names_them(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(tlloop.ConfigError) as caught:
        distribute.make_strategy("mirrored", ("/gpu:7",), 300.0)
    assert str(caught.value).startswith("devices='/gpu:7': no such devices ['/gpu:7']")
    with pytest.raises(tlloop.ConfigError) as caught:
        distribute.make_strategy("multi_worker", (), 300.0)
    assert str(caught.value).startswith("strategy=multi_worker: TF_CONFIG is not set")
    assert isinstance(
        distribute.make_strategy("one_device", ("/cpu:0",), 300.0), tf.distribute.OneDeviceStrategy
    )


def test_distribution_config_errors_name_the_flag(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with flag_error(r"^--strategy=multi_worker: TF_CONFIG is not set"):
        cli_strategy.make_strategy(DistributeConfig(strategy="multi_worker"))
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1"]}, "task": {"index": 3}}')
    with flag_error(r"TF_CONFIG is not a cluster with this task"):
        cli_strategy.make_strategy(DistributeConfig(strategy="multi_worker"))
    with flag_error(r"^--devices='/gpu:7': no such devices"):
        cli_strategy.make_strategy(DistributeConfig(strategy="mirrored", devices=("/gpu:7",)))
    with flag_error(r"^--devices=.*does not apply to --strategy=default"):
        DistributeConfig(strategy="default", devices=("/cpu:0",))


_BATCH_4 = StepOptions(batch_size=4, eval_batch_size=4, log_every_steps=0)


def test_state_created_outside_the_scope_is_refused():
    strategy = tf.distribute.MirroredStrategy(devices=["/cpu:0"])
    model = build_model(ModelConfig(image_size=16), 3)  # all of this outside the scope
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)
    metrics, step = Metrics(), tf.Variable(0, dtype=tf.int64)
    with strategy.scope(), pytest.raises(ValueError, match=r"model variable .* outside the scope"):
        compile_train(model, optimizer, ModeTable(), metrics, step, _BATCH_4)
    with strategy.scope():
        inside = build_model(ModelConfig(image_size=16), 3)
    outside_step = tf.Variable(0, dtype=tf.int64)
    with strategy.scope():
        optimizer = keras.optimizers.Adam()
        optimizer.build(inside.trainable_variables)
        with pytest.raises(ValueError, match=r"step counter variable"):
            compile_train(inside, optimizer, ModeTable(), Metrics(), outside_step, _BATCH_4)


def test_is_chief_and_describe_on_one_host():
    strategy = tf.distribute.get_strategy()
    assert distribute.is_chief(strategy)
    assert distribute.describe(strategy).endswith("with 1 replica(s)")


def test_auto_and_one_device_strategies_on_this_machine():
    # No GPU here: auto is the default strategy; one_device places every variable on its device.
    auto = cli_strategy.make_strategy(DistributeConfig(strategy="auto"))
    assert auto is tf.distribute.get_strategy()
    one = cli_strategy.make_strategy(DistributeConfig(strategy="one_device", devices=("/cpu:0",)))
    assert isinstance(one, tf.distribute.OneDeviceStrategy)
    with one.scope():
        model = build_model(ModelConfig(image_size=16), 3)
    assert {v.value.device for v in model.weights} == {
        "/job:localhost/replica:0/task:0/device:CPU:0"
    }


# One replica's half of the global batch holds a NaN pixel, the other's does not.
_ONE_REPLICA_NAN = """
import json, sys
import numpy as np, tensorflow as tf, keras
sys.path.insert(0, "tests")
from tlloop import distribute
from tlloop.cli.config import ModelConfig
from tlloop.models import ModeTable
from tlloop.cli.model import build_model
from tlloop.steps import Metrics, StepOptions, compile_train

distribute.configure_logical_devices(2, 1024)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = build_model(ModelConfig(image_size=16), 3)
    optimizer = keras.optimizers.Adam(1e-2)
    optimizer.build(model.trainable_variables)
    counter = tf.Variable(0, dtype=tf.int64)
    options = StepOptions(batch_size=8, eval_batch_size=8, nan_policy="skip_step",
                          log_every_steps=0)
    step = compile_train(model, optimizer, ModeTable(), Metrics(), counter, options)
rng = np.random.default_rng(0)
images = rng.uniform(0, 255, (3, 8, 16, 16, 3)).astype(np.float32)
images[1, 6, 0, 0, 0] = np.nan  # batch 2, example 7: the second replica's half
labels = rng.integers(0, 3, (3, 8)).astype(np.int32)
batches = iter(strategy.experimental_distribute_dataset(
    tf.data.Dataset.from_tensor_slices((images, labels))))
step(batches, 1)
before = [np.array(v.numpy()) for v in model.trainable_variables]
skipped = step(batches, 1).nonfinite.tolist()
unchanged = all(np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))
replicas_equal = all(
    np.array_equal(*[np.asarray(t) for t in strategy.experimental_local_results(v.value)])
    for v in model.trainable_variables)
moved = step(batches, 1).nonfinite.tolist() == [] and not all(
    np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))
print(json.dumps({"skipped": skipped, "unchanged": unchanged, "moved": moved,
                  "iterations": int(optimizer.iterations.numpy()),
                  "replicas_equal": replicas_equal}))
"""


def test_a_nan_on_one_replica_skips_the_update_on_every_replica():
    result = subprocess.run(
        [sys.executable, "-c", _ONE_REPLICA_NAN],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {
        "skipped": [2],
        "unchanged": True,
        "moved": True,
        "iterations": 2,
        "replicas_equal": True,
    }


# A worker of a 2-worker cluster reads 3 training batches through the real pipeline
# (distribute_batches -> IndexedExamples.training_batches) and prints every batch of indices
# its reader was asked for: one line of JSON on stdout.
_COUNT_READS = """
import json
import numpy as np, tensorflow as tf
from tlloop import distribute
from tlloop.data.examples import InMemoryExamples

reads = []

def record(indices):
    reads.append(indices.numpy().tolist())
    return indices

class Counted(InMemoryExamples):
    def read(self, indices):
        indices = tf.py_function(record, [indices], tf.int64)
        indices.set_shape([None])
        return super().read(indices)

strategy = tf.distribute.MultiWorkerMirroredStrategy()
examples = Counted(np.arange(40, dtype=np.float32), np.zeros(40, np.int32))
batches = distribute.distribute_batches(
    strategy, lambda part: examples.training_batches(8, 0, part=part), positionable=True,
    batch_size=8)
iterator = iter(batches)
seen = [strategy.experimental_local_results(next(iterator))[0][0].numpy().tolist()
        for _ in range(3)]
print(json.dumps({"reads": reads, "seen": seen}))
"""


def test_each_worker_reads_only_its_part_of_every_global_batch():
    ports = _free_ports(2)
    workers = []
    for index in range(2):
        tf_config = {
            "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
            "task": {"type": "worker", "index": index},
        }
        command = python_command("-c", _COUNT_READS, env={"TF_CONFIG": json.dumps(tf_config)})
        workers.append(subprocess.Popen(**command, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        outputs = [worker.communicate(timeout=180) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.kill(worker.pid, signal.SIGKILL)  # a cluster ignores SIGTERM in collectives
                worker.wait()
    assert [w.returncode for w in workers] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    found = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    # The global batches of one reader: positions [8t, 8t + 8) of the seeded order.
    whole = tlloop.InMemoryExamples(np.arange(40, dtype=np.float32), np.zeros(40, np.int32))
    order = [b[0].numpy().astype(int).tolist() for b in whole.training_batches(8, 0).take(30)]
    for index, worker in enumerate(found):
        parts = [batch[4 * index : 4 * index + 4] for batch in order]
        assert worker["seen"] == parts[:3]  # its half of each global batch, in order
        # Every read it made (prefetching reads ahead) was of its own half of a global batch:
        # 4 examples, never the whole batch of 8 and never the other worker's half.
        assert len(worker["reads"]) >= 3
        assert all(read in parts for read in worker["reads"]), worker["reads"]
