"""Entry point: `python -m tlloop.evaluate --workdir=WORKDIR [--checkpoint=...] [data flags]`.

Evaluates what a run saved (its export, best or latest checkpoint, or any checkpoint path) on
the run's evaluation data, or on other data given by the data flags (e.g. `--val_dir` with a
held-out test folder: the best checkpoint was chosen on the run's own evaluation split, so only
other data gives an unbiased number). `--tflite=PATH` evaluates a TFLite file of the run
(export/model_FORMAT.tflite, or a copy) on the same data instead. Prints the metrics as JSON;
`--output` also writes them.
Bad input: one line naming the flag or file, exit 2.
Wiring only: the saved run is read by `tlloop.cli.saved_run`, evaluated by the library's
`tlloop.evaluation`.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from tlloop.cli import flags as tlloop_flags
from tlloop.cli.entry import fail
from tlloop.errors import ConfigError

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
        from tlloop.cli import saved_run

        config = saved_run.saved_run_config(FLAGS.workdir, FLAGS)
        if FLAGS.tflite:
            saved_run.check_tflite(FLAGS.tflite)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        if FLAGS.tflite:
            metrics = saved_run.evaluate_tflite(FLAGS.workdir, FLAGS.tflite, config)
        else:
            metrics = saved_run.evaluate_saved(FLAGS.workdir, FLAGS.checkpoint, config)
    except ConfigError as error:
        return fail("tlloop.evaluate", error, FLAGS)
    text = json.dumps(metrics, indent=2)
    print(text)
    if FLAGS.output:
        from tlloop.workdir import write_text

        write_text(FLAGS.output, text + "\n")
    return 0


if __name__ == "__main__":
    app.run(main)
