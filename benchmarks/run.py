"""tlloop against Keras `Model.fit` and a minimal hand-written loop, side by side.

    python -m benchmarks.run [--quick] [--output=benchmarks/results] [--only=overhead ...]

Writes RESULTS.md (a Markdown table) and RESULTS.json under --output. Every row runs its
contenders in one process, on the same model, data (a cached, shuffled, repeated tf.data
pipeline of in-memory images), batch 32, float32 and XLA setting: each is warmed up (traces,
caches), then rounds alternate between them and the median examples/s of the rounds is
reported, with the ratio. The contenders:

- tlloop: its `CompiledSteps` of training (a fresh optimizer per phase, the trainable set captured),
  called as the trainer calls it with its defaults: `--steps_per_loop=auto` ends host calls
  at the logging cadence (every `--log_every_steps`, 10) or after about a second, so the
  throughput rows run AUTO_K steps per call (the steps_per_loop rows compare K=10 with K=1).
- fit: the Keras transfer-learning guide's recipe, `inputs -> backbone(training=False) -> head`,
  `compile(Adam, from_logits loss, jit_compile)`, then `fit` on the same dataset.
- hand: the 30-line loop a careful user writes: a `tf.function` GradientTape step called per
  batch from Python.

Rows: the head phase (backbone frozen) and the fine-tune phase (all trainable), XLA off and
on; --steps_per_loop=10 vs 1; the feature cache vs recomputing the backbone every epoch; the
overhead of the full tlloop loop (pipeline, metrics, logging, progress bar) over its compiled
step alone on one resident batch; and peak memory (resident set, each contender in a fresh
process). Workloads: the demo CNN at 32 px (host-bound), MobileNetV2 and ResNet50 with
weights=None at 96 px (compute-bound; ResNet50 only without --quick).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from tlloop import config as config_lib
from tlloop import phases as phase_lib
from tlloop.cli import config as cli_config
from tlloop.cli.model import build_model
from tlloop.models import ModeTable
from tlloop.optim import make_optimizer
from tlloop.steps import Metrics, StepOptions, compile_train
from tlloop.trainer import Trainer

_QUICK = flags.DEFINE_bool("quick", False, "Fewer rounds and workloads: under 5 minutes here.")
_OUTPUT = flags.DEFINE_string("output", "benchmarks/results", "Directory for RESULTS.md/json.")
_MEMORY_CHILD = flags.DEFINE_string("memory_child", "", "Internal: run one memory contender.")
ROW_GROUPS = ("throughput", "steps_per_loop", "feature_cache", "overhead", "memory")
_ONLY = flags.DEFINE_multi_enum(
    "only",
    [],
    ROW_GROUPS,
    "Run only these groups of rows (repeat the flag); the results go to "
    "RESULTS-only-GROUPS.md/json, the full table is left alone.",
)

BATCH = 32
CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    backbone: str
    size: int
    examples: int
    steps: int  # per round


def workloads(quick: bool) -> list[Workload]:
    chosen = [
        Workload("demo CNN 32px", "small_cnn", 32, 1024, 30 if quick else 40),
        Workload("MobileNetV2 96px", "MobileNetV2", 96, 256, 6 if quick else 16),
    ]
    if not quick:
        chosen.append(Workload("ResNet50 96px", "ResNet50", 96, 256, 6))
    return chosen


def dataset(workload: Workload, seed: int = 0) -> tf.data.Dataset:
    """In-memory synthetic images and labels, cached, shuffled, repeated, batched."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (workload.examples, workload.size, workload.size, 3))
    labels = rng.integers(0, CLASSES, workload.examples).astype(np.int32)
    return (
        tf.data.Dataset.from_tensor_slices((images.astype(np.float32), labels))
        .cache()
        .shuffle(workload.examples, seed=seed)
        .repeat()
        .batch(BATCH, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def tlloop_model(workload: Workload):
    keras.utils.set_random_seed(0)
    config = cli_config.ModelConfig(
        backbone=workload.backbone, weights="none", image_size=workload.size
    )
    return build_model(config, CLASSES)


def phase_of(finetune: bool) -> phase_lib.PlannedPhase:
    unfreeze = config_lib.Unfreeze("all" if finetune else "none")
    config = config_lib.PhaseConfig("finetune" if finetune else "head", 1, 1e-4, unfreeze)
    return phase_lib.PlannedPhase(0, config, ModeTable())


# The steps per host call of the trainer's default (--steps_per_loop=auto with the default
# --log_every_steps): every call ends at a logged step.
AUTO_K = config_lib.LoggingConfig().log_every_steps


class Tlloop:
    """tlloop's compiled step, K steps per host call."""

    def __init__(self, workload, finetune, jit, steps_per_loop=1):
        self.model = tlloop_model(workload)
        phase = phase_of(finetune)
        phase_lib.apply_trainability(self.model, phase)
        optimizer = make_optimizer(phase.config, self.model.trainable_variables)
        options = StepOptions(
            batch_size=BATCH, eval_batch_size=BATCH, jit_compile=jit, log_every_steps=0
        )
        self.step = compile_train(
            self.model, optimizer, phase.modes, Metrics(), tf.Variable(0, dtype=tf.int64), options
        )
        self.batches = iter(dataset(workload))
        self.k = steps_per_loop

    def run(self, steps: int) -> None:
        done = 0
        while done < steps:
            chunk = min(self.k, steps - done)
            self.step(self.batches, chunk)
            done += chunk


def guide_model(workload: Workload, finetune: bool) -> keras.Model:
    """The Keras guide's recipe on tlloop's own backbone and head (same weights, same ops)."""
    parts = tlloop_model(workload)
    inputs = keras.Input((workload.size, workload.size, 3))
    features = parts.backbone(inputs, training=False)
    outputs = parts.head(features)
    parts.backbone.trainable = finetune
    return keras.Model(inputs, outputs)


class Fit:
    """`model.fit`, one epoch of `steps` steps per round; timed from epoch begin to end."""

    def __init__(self, workload, finetune, jit):
        self.model = guide_model(workload, finetune)
        self.model.compile(
            optimizer=keras.optimizers.Adam(1e-4),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit,
        )
        self.data = dataset(workload)
        self.seconds = 0.0
        outer = self

        class Timer(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.started = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                outer.seconds = time.perf_counter() - self.started

        self.timer = Timer()

    def run(self, steps: int) -> float:
        self.model.fit(
            self.data, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[self.timer]
        )
        return self.seconds


class Hand:
    """A minimal tf.function GradientTape step, called per batch from Python."""

    def __init__(self, workload, finetune, jit):
        self.model = guide_model(workload, finetune)
        self.optimizer = keras.optimizers.Adam(1e-4)
        variables = self.model.trainable_variables
        self.optimizer.build(variables)
        model, optimizer = self.model, self.optimizer

        @tf.function(jit_compile=jit)
        def step(images, labels):
            with tf.GradientTape() as tape:
                logits = model(images, training=True)
                loss = tf.reduce_mean(
                    keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
                )
            optimizer.apply(tape.gradient(loss, variables), variables)

        self.step = step
        self.batches = iter(dataset(workload))

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step(*next(self.batches))


def race(contenders: dict, steps: int, rounds: int) -> dict:
    """Median examples/s of each contender over `rounds` alternating rounds, after warm-up."""
    for runner in contenders.values():
        runner.run(max(2, steps // 4))  # traces and caches
    speeds = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, runner in contenders.items():
            started = time.perf_counter()
            measured = runner.run(steps)
            seconds = measured if isinstance(measured, float) else time.perf_counter() - started
            speeds[name].append(steps * BATCH / seconds)
    return {name: statistics.median(values) for name, values in speeds.items()}


def overhead(workload: Workload, rounds: int) -> dict:
    """The full tlloop loop vs its compiled step alone, same model, fine-tune phase.

    "full loop": epochs 2 to 4 of a real `Trainer.fit` (the first traces), each timed by the
    controller from the epoch's first host call to its last action: input pipeline, metrics,
    in-graph and host logging to real TensorBoard writers and metrics.jsonl, checkpoint and
    stop checks, the progress bar; evaluation aside. "compiled step alone": the same compiled
    step on one resident batch, as many steps. Rounds alternate between the two."""
    runner = Tlloop(workload, finetune=True, jit=False)
    resident = next(iter(dataset(workload)))
    tight = iter(tf.data.Dataset.from_tensors(resident).repeat())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (workload.examples, workload.size, workload.size, 3))
    labels = rng.integers(0, CLASSES, workload.examples).astype(np.int32)
    steps = workload.examples // BATCH
    phase = config_lib.PhaseConfig("finetune", 4, 1e-4, config_lib.Unfreeze("all"))
    speeds = {"full loop": [], "compiled step alone": []}
    for _ in range(rounds):
        trainer = Trainer(
            tempfile.mkdtemp(prefix="tlloop-bench-"),
            phases=[phase],
            checkpoint=config_lib.CheckpointConfig(every_secs=0),
            logging=config_lib.LoggingConfig(quiet=True),
            feature_cache="off",
        )
        results = trainer.fit(
            runner.model,
            (images.astype(np.float32), labels),
            (images[:BATCH].astype(np.float32), labels[:BATCH]),
            batch_size=BATCH,
            export=False,
        )
        for seconds in results.phases[0]["epoch_seconds"][1:]:
            speeds["full loop"].append(steps * BATCH / seconds)
            started = time.perf_counter()
            runner.step(tight, steps)
            speeds["compiled step alone"].append(steps * BATCH / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in speeds.items()}


def memory_child(spec: str) -> None:
    """Runs one contender for a while in this (fresh) process and prints its peak resident set
    (VmHWM: per address space, so the parent's memory, inherited at fork, does not count)."""
    name, contender = spec.split(":")
    workload = next(w for w in workloads(False) if w.name == name)
    runner = {"tlloop": Tlloop, "fit": Fit}[contender](workload, finetune=True, jit=False)
    runner.run(workload.steps * 2)
    with open("/proc/self/status") as status:
        peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(f"peak_kb={peak_kb}")


def peak_memory_mb(workload: Workload) -> dict:
    """Peak resident set of a fresh process per contender (fine-tune phase, same steps)."""
    peaks = {}
    for contender in ("tlloop", "fit"):
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.run", f"--memory_child={workload.name}:{contender}"],
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        found = [line for line in child.stdout.splitlines() if line.startswith("peak_kb=")]
        if child.returncode or not found:
            raise RuntimeError(f"memory run {workload.name}:{contender}: {child.stderr[-500:]}")
        peaks[contender] = int(found[0].split("=")[1]) / 1024
    return peaks


def main(argv: list[str]) -> None:
    del argv
    if _MEMORY_CHILD.value:
        memory_child(_MEMORY_CHILD.value)
        return
    logging.set_verbosity(logging.WARNING)
    quick = _QUICK.value
    rounds = 3 if quick else 7
    started = time.perf_counter()
    rows = []

    def add(row, workload, speeds, a="tlloop", b="fit", note=""):
        ratio = speeds[a] / speeds[b]
        rows.append(
            {
                "row": row,
                "workload": workload,
                "median examples/s": speeds,
                "ratio": ratio,
                "compared": f"{a} / {b}",
                "note": note,
            }
        )
        print(
            f"{row} | {workload} | "
            + ", ".join(f"{k} {v:.0f}" for k, v in speeds.items())
            + f" | {a}/{b} {ratio:.2f}",
            flush=True,
        )

    only = _ONLY.value or ROW_GROUPS

    for workload in workloads(quick) if "throughput" in only else ():
        for finetune in (False, True):
            for jit in (False, True) if workload.backbone == "small_cnn" or not quick else (False,):
                contenders = {
                    "tlloop": Tlloop(workload, finetune, jit, steps_per_loop=AUTO_K),
                    "fit": Fit(workload, finetune, jit),
                    "hand": Hand(workload, finetune, jit),
                }
                speeds = race(contenders, workload.steps, rounds)
                label = f"{'fine-tune' if finetune else 'head'}, XLA {'on' if jit else 'off'}"
                add(label, workload.name, speeds)
                add(label, workload.name, speeds, "tlloop", "hand")
    demo = workloads(quick)[0]
    for finetune in (False, True) if "steps_per_loop" in only else ():
        speeds = race(
            {
                "K=10": Tlloop(demo, finetune, False, steps_per_loop=10),
                "K=1": Tlloop(demo, finetune, False, steps_per_loop=1),
            },
            demo.steps,
            rounds,
        )
        add(
            f"steps_per_loop, {'fine-tune' if finetune else 'head'}",
            demo.name,
            speeds,
            "K=10",
            "K=1",
        )

    from benchmarks.feature_cache import measure

    if "feature_cache" in only:
        cache = measure(10 if not quick else 5, "MobileNetV2", 96, 16 if quick else 32, 1)
        rows.append(
            {
                "row": "feature cache",
                "workload": cache["workload"],
                "seconds": {
                    "cached": cache["cached_seconds"],
                    "recomputed": cache["recompute_seconds"],
                },
                "ratio": cache["speedup"],
                "compared": "recomputed / cached seconds",
            }
        )
        print(f"feature cache | {cache['workload']} | x{cache['speedup']:.2f}", flush=True)

    for workload in workloads(quick)[:2] if "overhead" in only else ():
        speeds = overhead(workload, rounds)
        share = 1 - speeds["full loop"] / speeds["compiled step alone"]
        rows.append(
            {
                "row": "framework overhead",
                "workload": workload.name,
                "median examples/s": speeds,
                "ratio": speeds["full loop"] / speeds["compiled step alone"],
                "overhead": share,
                "compared": "full loop / compiled step alone",
            }
        )
        print(f"overhead | {workload.name} | {100 * share:.1f}%", flush=True)

    for workload in workloads(quick)[:2] if "memory" in only else ():
        peaks = peak_memory_mb(workload)
        rows.append(
            {
                "row": "peak memory (MB, fine-tune)",
                "workload": workload.name,
                "peak MB": peaks,
                "ratio": peaks["tlloop"] / peaks["fit"],
                "compared": "tlloop / fit",
            }
        )
        print(f"memory | {workload.name} | {peaks}", flush=True)

    machine = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "quick": quick,
        "rounds": rounds,
        "seconds": round(time.perf_counter() - started, 1),
    }
    os.makedirs(_OUTPUT.value, exist_ok=True)
    name = "RESULTS" + ("-only-" + "-".join(_ONLY.value) if _ONLY.value else "")
    with open(os.path.join(_OUTPUT.value, name + ".json"), "w") as file:
        json.dump({"machine": machine, "rows": rows}, file, indent=2)
    with open(os.path.join(_OUTPUT.value, name + ".md"), "w") as file:
        file.write(markdown(rows, machine))
    print(markdown(rows, machine))


def markdown(rows: list[dict], machine: dict) -> str:
    lines = [
        f"Machine: {machine['cpus']} CPUs, Python {machine['python']}, TensorFlow "
        f"{machine['tensorflow']}, Keras {machine['keras']}; {machine['rounds']} alternating "
        f"rounds per row{' (--quick)' if machine['quick'] else ''}; {machine['seconds']} s.",
        "",
        "| row | workload | measured (median) | ratio |",
        "|---|---|---|---|",
    ]
    for row in rows:
        measured = row.get("median examples/s") or row.get("seconds") or row.get("peak MB")
        unit = " ex/s" if "median examples/s" in row else (" s" if "seconds" in row else " MB")
        text = ", ".join(f"{k} {v:,.1f}{unit}" for k, v in measured.items())
        if "overhead" in row:
            text += f" (overhead {100 * row['overhead']:.1f}%)"
        lines.append(
            f"| {row['row']} | {row['workload']} | {text} | {row['compared']}: {row['ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
