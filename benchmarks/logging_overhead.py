"""What logging costs: train-loop examples/s with the default logging vs with none.

    python -m benchmarks.logging_overhead [--rounds=30] [--steps=40] [--output=FILE.json]

One process, one model (the demo CNN on all ten digits, 32 px, batch 32, every layer training:
host-bound, so logging shows as much as it can). Two train steps are compiled on it: one with
the default `--log_every_steps=10` writing to real TensorBoard writers and metrics.jsonl, one
with logging off and no writers. Both run through the trainer's own epoch loop, one host call
per step as by default, in alternating rounds of `--steps` steps after a warm-up. Whole-run
timings drift by +-35% between runs on this 2-core machine; alternating rounds on one warm
model leaves the drift to both settings alike. The overhead is 1 - median(on) / median(off).

Per-epoch work (evaluation, its scalars and images) is the same with or without step logging
and is not part of this ratio; it is timed separately, per epoch.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf
from absl import app, flags, logging

from tlloop import config as config_lib
from tlloop import phases as phase_lib
from tlloop import trainer
from tlloop.optim import make_optimizer
from tlloop.steps import Metrics, TrainStep
from tlloop.summaries import Summaries

_ROUNDS = flags.DEFINE_integer("rounds", 30, "Alternating rounds of each setting.")
_STEPS = flags.DEFINE_integer("steps", 40, "Train steps per round.")
_OUTPUT = flags.DEFINE_string("output", "", "Write the results as JSON here.")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    workdir = tempfile.mkdtemp(prefix="tlloop-bench-")
    config = config_lib.RunConfig(
        workdir=workdir,
        data=config_lib.DataConfig(image_size=32, batch_size=32),
        model=config_lib.ModelConfig(backbone="small_cnn", image_size=32),
        phases=(config_lib.PhaseConfig("finetune", 1, 1e-3, config_lib.Unfreeze("all")),),
        checkpoint=config_lib.CheckpointConfig(every_secs=0),
    )
    experiment = trainer.build_experiment(config)
    model, data, (phase,) = experiment.model, experiment.data, experiment.phases
    phase_lib.apply_trainability(model, phase)
    global_step = tf.Variable(0, dtype=tf.int64)
    optimizer = make_optimizer(phase.config, model.trainable_variables)
    batches = iter(data.train)
    settings = {
        "off": (0, Summaries(workdir, enabled=False)),
        "default": (10, Summaries(workdir, enabled=True)),
    }
    steps = {}
    for name, (every, _) in settings.items():
        steps[name] = TrainStep(
            model,
            optimizer,
            phase.modes,
            Metrics(),
            global_step,
            global_batch_size=32,
            log_every_steps=every,
        )

    def round_seconds(name: str, count: int) -> float:
        summaries = settings[name][1]
        progress = keras.utils.Progbar(count, verbose=0)
        profiler = trainer._Profiler((), workdir)
        with summaries.default("train"):
            started = time.perf_counter()
            saver = trainer._Saver(None, config, global_step, single_host=True)
            trainer._run_epoch(
                steps[name],
                batches,
                count,
                config,
                phase,
                profiler,
                summaries,
                progress,
                saver,
                None,
            )
            return time.perf_counter() - started

    for name in settings:  # warm-up: traces, data cache
        round_seconds(name, 20)
    seconds = {name: [] for name in settings}
    for _ in range(_ROUNDS.value):
        for name in settings:
            seconds[name].append(round_seconds(name, _STEPS.value))
    speed = {name: [_STEPS.value * 32 / s for s in values] for name, values in seconds.items()}
    medians = {name: statistics.median(values) for name, values in speed.items()}
    overhead = 1.0 - medians["default"] / medians["off"]

    eval_step = trainer.EvalStep(model, phase.modes, Metrics(data.num_classes))
    eval_metrics = eval_step.metrics
    started = time.perf_counter()
    eval_result = trainer.evaluate(eval_step, eval_metrics, data.eval, data.eval_steps)
    eval_seconds = time.perf_counter() - started
    started = time.perf_counter()
    trainer._write_epoch(settings["default"][1], phase, 0, 1, eval_result, eval_result, data)
    epoch_write_seconds = time.perf_counter() - started
    for _, summaries in settings.values():
        summaries.close()

    result = {
        "benchmark": "logging_overhead",
        "workload": "small_cnn 32px, digits 0-9 (1,258 train), batch 32, all layers training",
        "rounds": _ROUNDS.value,
        "steps_per_round": _STEPS.value,
        "examples_per_second": speed,
        "median": medians,
        "overhead": overhead,
        "per_epoch_seconds": {"evaluation": eval_seconds, "epoch_summaries": epoch_write_seconds},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
        },
    }
    print("| step logging | train examples/s (median of rounds) | spread (min-max) |")
    print("|---|---|---|")
    for name, values in speed.items():
        print(f"| {name} | {medians[name]:.0f} | {min(values):.0f}-{max(values):.0f} |")
    print(f"\ndefault logging costs {100 * overhead:.1f}% of train examples/s")
    print(
        f"per epoch, outside the train loop: evaluation {eval_seconds * 1000:.0f} ms, "
        f"epoch summaries (scalars, confusion image and text, jsonl) "
        f"{epoch_write_seconds * 1000:.0f} ms"
    )
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    app.run(main)
