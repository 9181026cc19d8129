"""Entry point: `python -m tlloop.evaluate --workdir=WORKDIR [--checkpoint=...] [data flags]`.

Evaluates what a run saved (its export, best or latest checkpoint, or any checkpoint path) on
the run's evaluation data, or on other data given by the data flags (e.g. `--val_dir` with a
held-out test folder: the best checkpoint was chosen on the run's own evaluation split, so only
other data gives an unbiased number). `--tflite=PATH` evaluates a TFLite file of the run
(export/model_FORMAT.tflite, or a copy) on the same data instead. Prints the metrics as JSON;
`--output` also writes them.
Bad input: one line naming the flag or file, exit 2.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

from absl import app, flags

from tlloop.cli import flags as tlloop_flags
from tlloop.config import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The workdir of a tlloop run.")
flags.DEFINE_string(
    "checkpoint",
    "export",
    "What to evaluate: export (export/model.keras), best, latest, or a checkpoint path.",
)
flags.DEFINE_string(
    "tflite",
    "",
    "Evaluate this TFLite file (e.g. WORKDIR/export/model_int8.tflite) with the LiteRT "
    "interpreter instead of --checkpoint.",
)
flags.DEFINE_string("output", "", "Also write the metrics as JSON to this file.")
tlloop_flags.define_flags(FLAGS, only=tlloop_flags.DATA_FLAGS)
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> int:
    try:
        if len(argv) > 1:
            raise ConfigError(f"unexpected arguments {argv[1:]}; accepted: only --name=value flags")
        flags_file = os.path.join(FLAGS.workdir, "flags.txt")
        if not os.path.isfile(flags_file):
            raise ConfigError(
                f"--workdir={FLAGS.workdir!r}: holds no flags.txt; accepted: the workdir of a "
                "tlloop run"
            )
        run_flags = tlloop_flags.run_flags(flags_file, overrides=FLAGS)
        run_flags["workdir"].value = FLAGS.workdir
        # Evaluation exports nothing: the run's TFLite formats need no interpreter here.
        run_flags["export_tflite"].value = []
        config = tlloop_flags.to_config(run_flags)
        if FLAGS.tflite:
            _check_tflite(FLAGS.tflite)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        from tlloop.evaluation import evaluate_saved, evaluate_tflite

        if FLAGS.tflite:
            metrics = evaluate_tflite(FLAGS.workdir, FLAGS.tflite, config)
        else:
            metrics = evaluate_saved(FLAGS.workdir, FLAGS.checkpoint, config)
    except ConfigError as error:
        print(f"tlloop.evaluate: error: {tlloop_flags.flag_line(error)}", file=sys.stderr)
        return 2
    text = json.dumps(metrics, indent=2)
    print(text)
    if FLAGS.output:
        from tlloop.workdir import write_text

        write_text(FLAGS.output, text + "\n")
    return 0


def _check_tflite(path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"--tflite={path!r}: no such file; accepted: a .tflite file")
    with open(path, "rb") as file:
        # A flatbuffer's file identifier (bytes 4-8) is "TFL3" for every TFLite model.
        if file.read(8)[4:8] != b"TFL3":
            raise ConfigError(f"--tflite={path!r}: not a TFLite file; accepted: a .tflite file")
    if importlib.util.find_spec("ai_edge_litert") is None:
        raise ConfigError(
            f"--tflite={path!r}: the LiteRT interpreter is not installed; accepted: "
            'pip install "tlloop[tflite]" (ai-edge-litert)'
        )


if __name__ == "__main__":
    app.run(main)
