"""What logging costs: train-loop examples/s with the default logging vs with none.

    python -m benchmarks.logging_overhead [--rounds=8] [--output=FILE.json]

The demo CNN on all ten digits (32 px, batch 32, every layer training: host-bound, so logging
shows as much as it can), trained by `Trainer.fit` in alternating rounds: one with the default
`log_every_steps=10` writing to real TensorBoard writers and metrics.jsonl, one with step
logging off and no writers. Each round is a fresh two-epoch run; the second epoch's training
loop (timed by the controller: host calls, input waits and the actions between them,
evaluation aside) is the measure, the first one traces. Whole-run timings drift by +-35%
between runs on this 2-core machine; alternating rounds leave the drift to both settings
alike. The overhead is 1 - median(on) / median(off).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf
from absl import app, flags, logging

from tlloop import config as config_lib
from tlloop.cli import config as cli_config
from tlloop.cli.data import load_data
from tlloop.cli.model import build_model
from tlloop.tasks import Classification
from tlloop.trainer import Trainer

_ROUNDS = flags.DEFINE_integer("rounds", 8, "Alternating rounds of each setting.")
_OUTPUT = flags.DEFINE_string("output", "", "Write the results as JSON here.")

SETTINGS = {
    "off": config_lib.LoggingConfig(log_every_steps=0, quiet=True, summaries=False),
    "default": config_lib.LoggingConfig(log_every_steps=10, quiet=True, summaries=True),
}


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    data = load_data(cli_config.DataConfig(image_size=32, batch_size=32))
    keras.utils.set_random_seed(0)
    model = build_model(cli_config.ModelConfig(backbone="small_cnn", image_size=32), 10)
    phase = config_lib.PhaseConfig("finetune", 2, 1e-3, config_lib.Unfreeze("all"))
    examples = data.train_size - data.train_size % 32
    speed = {name: [] for name in SETTINGS}
    for _ in range(_ROUNDS.value):
        for name, settings in SETTINGS.items():
            trainer = Trainer(
                tempfile.mkdtemp(prefix="tlloop-bench-"),
                phases=[phase],
                task=Classification(class_names=data.class_names),
                checkpoint=config_lib.CheckpointConfig(every_secs=0),
                logging=settings,
            )
            results = trainer.fit(
                model, data.train_examples, data.eval_examples, batch_size=32, export=False
            )
            speed[name].append(examples / results.phases[0]["epoch_seconds"][1])
    medians = {name: statistics.median(values) for name, values in speed.items()}
    overhead = 1.0 - medians["default"] / medians["off"]
    result = {
        "benchmark": "logging_overhead",
        "workload": "small_cnn 32px, digits 0-9 (1,258 train), batch 32, all layers training",
        "rounds": _ROUNDS.value,
        "examples_per_second": speed,
        "median": medians,
        "overhead": overhead,
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
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    app.run(main)
