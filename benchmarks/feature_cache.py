"""What the feature cache buys: a frozen head phase with cached backbone features vs the
backbone recomputed every epoch, same model, data and steps.

    python -m benchmarks.feature_cache [--epochs=10] [--backbone=MobileNetV2] [--image_size=96]
        [--per_class=32] [--output=FILE.json]

Each setting is one real run through `cli_experiment.train` (digits, all ten classes, a few-shot
training set, the full evaluation set, head phase only, weights=None: compute-bound). The time
compared is the phase's: training and the per-epoch evaluations, plus, with the cache, the one
pass that computes the features. Runs alternate (off, auto, off, auto) and the medians are
compared.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging

from tlloop import config as config_lib
from tlloop.cli import config as cli_config
from tlloop.cli import experiment as cli_experiment


def phase_seconds(feature_cache: str, epochs: int, backbone: str, size: int, per_class: int):
    """Seconds of one frozen phase (with the feature computation, when cached), and its
    evaluation accuracy."""
    with tempfile.TemporaryDirectory() as workdir:
        config = cli_config.RunConfig(
            workdir=workdir,
            data=cli_config.DataConfig(
                image_size=size, batch_size=32, train_examples_per_class=per_class
            ),
            model=cli_config.ModelConfig(backbone=backbone, weights="none", image_size=size),
            phases=(
                config_lib.PhaseConfig("head", epochs, 1e-3, config_lib.Unfreeze("none")),
                config_lib.PhaseConfig("finetune", 0, 1e-5, config_lib.Unfreeze("all")),
            ),
            logging=config_lib.LoggingConfig(quiet=True, summaries=False),
            feature_cache=feature_cache,
            recipe="guide",  # no augmentation: the frozen phase is what the cache is for
        )
        results = cli_experiment.train(cli_experiment.build_experiment(config), workdir)
    phase = results["phases"][0]
    computed = re.search(r"computed in ([0-9.]+) s", phase["feature_cache"])
    seconds = phase["seconds"] + (float(computed.group(1)) if computed else 0.0)
    return seconds, phase["eval"]["accuracy"], phase["feature_cache"]


def measure(epochs: int, backbone: str, size: int, per_class: int, repeats: int) -> dict:
    """Median phase seconds of each setting over `repeats` alternating runs, and the speed-up."""
    seconds = {"off": [], "auto": []}
    accuracy = {}
    for _ in range(repeats):
        for setting in ("off", "auto"):
            took, accuracy[setting], reason = phase_seconds(
                setting, epochs, backbone, size, per_class
            )
            seconds[setting].append(took)
            logging.info("feature cache %s: %.2f s (%s)", setting, took, reason)
    off, auto = statistics.median(seconds["off"]), statistics.median(seconds["auto"])
    return {
        "workload": f"{backbone} weights=None {size}px, {per_class * 10} train examples, "
        f"{epochs} frozen epochs, batch 32",
        "recompute_seconds": round(off, 2),
        "cached_seconds": round(auto, 2),
        "speedup": round(off / auto, 2),
        "eval_accuracy": accuracy,
        "runs": seconds,
    }


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    result = measure(f.epochs, f.backbone, f.image_size, f.per_class, f.repeats)
    text = json.dumps(result, indent=2)
    print(text)
    if f.output:
        with open(f.output, "w") as file:
            file.write(text + "\n")


if __name__ == "__main__":
    # Defined here, not at import: benchmarks.run imports `measure` and has flags of its own.
    flags.DEFINE_integer("epochs", 10, "Frozen epochs.")
    flags.DEFINE_string("backbone", "MobileNetV2", "A keras.applications class name.")
    flags.DEFINE_integer("image_size", 96, "Image size.")
    flags.DEFINE_integer("per_class", 32, "Training examples per class.")
    flags.DEFINE_integer("repeats", 2, "Runs of each setting, alternating.")
    flags.DEFINE_string("output", "", "Also write the results as JSON here.")
    app.run(main)
