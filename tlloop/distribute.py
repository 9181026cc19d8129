"""Distribution: a tf.distribute strategy by name, logical devices, and a cluster-start deadline.

tlloop writes no distribution code of its own: it picks one of TensorFlow's strategies, creates
all state under its scope (trainer.py) and lets `strategy.run` and the Keras optimizer do the
all-reduce. This module only chooses and checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence

import tensorflow as tf

from tlloop.config import ConfigError
from tlloop.data.examples import Part
from tlloop.errors import Problem

# Runs in a separate process: a thread cannot end a process whose main thread is blocked in
# TensorFlow's cluster start (that call holds the GIL, measured), and the process ignores
# SIGTERM, so the watchdog prints the error and sends SIGKILL. It checks that its parent is
# still the process it guards, so it never kills a recycled pid.
_WATCHDOG = """
import os, signal, sys, time
pid, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
time.sleep(seconds)
if os.getppid() == pid:
    sys.stderr.write(message + "\\n")
    sys.stderr.flush()
    os.kill(pid, signal.SIGKILL)
"""


def configure_logical_devices(count: int, gpu_memory_mb: int) -> None:
    """Splits the first GPU (or, without one, the CPU) into `count` logical devices.

    Each logical GPU gets `gpu_memory_mb` of memory. Must run before TensorFlow initialises its
    devices; `count` 0 leaves the devices as they are.
    """
    if count == 0:
        return
    gpus = tf.config.list_physical_devices("GPU")
    device = gpus[0] if gpus else tf.config.list_physical_devices("CPU")[0]
    memory = gpu_memory_mb if gpus else None
    logical = [tf.config.LogicalDeviceConfiguration(memory_limit=memory) for _ in range(count)]
    tf.config.set_logical_device_configuration(device, logical)


def make_strategy(
    strategy: str,
    devices: Sequence[str],
    cluster_timeout_secs: float,
    *,
    line: Callable[[Problem], str] = str,
) -> tf.distribute.Strategy:
    """The `strategy` named (auto, default, one_device, mirrored, multi_worker) on `devices`
    (empty: every GPU, else the CPU); multi_worker ends the process with one line on stderr
    (`line(error)`, "tlloop: error: " before it) if its cluster does not come up within
    `cluster_timeout_secs`. Raises ConfigError for devices or a cluster that can't be."""
    kind = strategy
    if kind == "multi_worker":
        # First, before anything initialises the runtime: collectives are configured at start.
        _check_tf_config()
        message = f"tlloop: error: {line(_cluster_error(cluster_timeout_secs))}"
        with cluster_start_deadline(cluster_timeout_secs, message):
            return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "auto":
        kind = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "default"
    if kind == "default":
        return tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    available = [d.name for d in tf.config.list_logical_devices()]
    given = list(devices)
    devices = given or [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    unknown = [d for d in devices if _canonical(d) not in map(_canonical, available)]
    if unknown:
        raise ConfigError(
            "devices", repr(",".join(given)), f"no such devices {unknown}", ", ".join(available)
        )
    if kind == "one_device":
        return tf.distribute.OneDeviceStrategy(devices[0])
    return tf.distribute.MirroredStrategy(devices=devices)


def distribute_dataset(strategy: tf.distribute.Strategy, dataset: tf.data.Dataset):
    """`dataset` as the strategy's distributed dataset. Every task builds the same dataset from
    the same seed; DATA sharding splits each global batch between the tasks, so a cluster sees
    the same global batches as one device."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def distribute_batches(
    strategy: tf.distribute.Strategy,
    batches: Callable[[Part | None], tf.data.Dataset],
    *,
    positionable: bool,
    batch_size: int,
):
    """The strategy's distributed dataset of `batches(part)` (global batches of `batch_size`).

    Positionable examples are read per input pipeline (one per worker): each reads only its
    part of every global batch, as per-replica batches, so no worker reads another's examples
    and the global batch is the same for any number of workers. Other data (a user's stream),
    or a batch the replicas cannot share evenly, is read whole by every task and split by
    DATA sharding (`distribute_dataset`)."""
    replicas = strategy.num_replicas_in_sync
    if replicas == 1 or not positionable or batch_size % replicas:
        return distribute_dataset(strategy, batches(None))

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        count = context.num_input_pipelines
        return batches(Part(context.input_pipeline_id, count, replicas // count))

    return strategy.distribute_datasets_from_function(dataset_fn)


def cluster_task(strategy: tf.distribute.Strategy) -> tuple[str, int] | None:
    """(task type, task index) of this process in a multi-worker cluster; None on one host."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return None
    return resolver.task_type, resolver.task_id


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the one task that writes logs, exports and results (every single-host run)."""
    task = cluster_task(strategy)
    if task is None or task[0] == "chief":
        return True
    has_chief = "chief" in strategy.cluster_resolver.cluster_spec().as_dict()
    return task == ("worker", 0) and not has_chief


def describe(strategy: tf.distribute.Strategy) -> str:
    """One line: the strategy's class, replica count and, for a cluster, this task."""
    text = f"{type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s)"
    task = cluster_task(strategy)
    return text + (f", task {task[0]}:{task[1]}" if task else "")


@contextlib.contextmanager
def cluster_start_deadline(seconds: float, message: str):
    """Ends this process with `message` on stderr if the block does not finish in `seconds`."""
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(seconds), message],
        stdin=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        watchdog.kill()
        watchdog.wait()


def _check_tf_config() -> None:
    accepted = (
        'TF_CONFIG as JSON, e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
        '"task": {"type": "worker", "index": 0}}'
    )
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        raise ConfigError("strategy", "multi_worker", "TF_CONFIG is not set", accepted)
    try:
        tf_config = json.loads(raw)
        task, cluster = tf_config["task"], tf_config["cluster"]
        members = cluster[task["type"]]
        ok = isinstance(members, list) and 0 <= int(task["index"]) < len(members)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ConfigError(
            "strategy", "multi_worker", "TF_CONFIG is not a cluster with this task in it", accepted
        )


def _cluster_error(timeout_secs: float) -> ConfigError:
    tf_config = json.loads(os.environ["TF_CONFIG"])
    task = tf_config["task"]
    peers = [
        address
        for kind, addresses in tf_config["cluster"].items()
        for i, address in enumerate(addresses)
        if (kind, i) != (task["type"], int(task["index"]))
    ]
    return ConfigError(
        "strategy",
        "multi_worker",
        f"the cluster in TF_CONFIG did not come up within $cluster_timeout_secs={timeout_secs:g} "
        f"(this task: {task['type']}:{task['index']}; waiting for {', '.join(peers)})",
        "start every task of TF_CONFIG, or a longer $cluster_timeout_secs",
    )


def _canonical(name: str) -> str:
    """'/job:localhost/replica:0/task:0/device:CPU:1' and '/cpu:1' both become 'cpu:1'."""
    return name.lower().rsplit("device:", 1)[-1].lstrip("/")
