"""Entry point: `python -m tlloop.predict --workdir=WORKDIR [--top_k=3] IMAGE [IMAGE ...]`.

Prints the top-k classes of each image file with their probabilities, one line per image:
`PATH<TAB>CLASS PROB<TAB>CLASS PROB...`; for a multi-label model the labels over its threshold
first (`labels=A;B`), then the top-k labels; for a regression model each target's value
(`NAME VALUE`, in the targets' units; --top_k is refused). The model is the run's exported
SavedModel (or any tlloop SavedModel, `--saved_model=DIR`), called through its
`serving_uint8` signature, so this is exactly what a server would answer. Images of any size
are resized inside the model. Bad input: one line naming the flag or file, exit 2
(`--bad_images=skip` reports an unreadable file on stderr and goes on); a text model's export
(strings in) is refused in one line.
Wiring only: the SavedModel's client is the library's `tlloop.serving`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from tlloop.cli.entry import fail
from tlloop.cli.flags import flag_line
from tlloop.config import BAD_IMAGES
from tlloop.errors import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "", "The workdir of a finished tlloop run (uses its export).")
flags.DEFINE_string("saved_model", "", "A tlloop SavedModel directory, instead of --workdir.")
flags.DEFINE_integer("top_k", 3, "Classes to print per image, most probable first.")
flags.DEFINE_enum("bad_images", "fail", list(BAD_IMAGES), "An unreadable image: fail or skip.")


def main(argv: list[str]) -> int:
    try:
        paths = argv[1:]
        if not paths:
            raise ConfigError("no image files given; accepted: one or more image file paths")
        if bool(FLAGS.workdir) == bool(FLAGS.saved_model):
            raise ConfigError(
                "$workdir / $saved_model: give exactly one; accepted: $workdir=RUN or "
                "$saved_model=DIR"
            )
        given = "saved_model" if FLAGS.saved_model else "workdir"
        directory = FLAGS.saved_model or os.path.join(FLAGS.workdir, "export", "saved_model")
        if not os.path.isfile(os.path.join(directory, "saved_model.pb")):
            raise ConfigError(
                given,
                problem=f"no SavedModel at {directory!r}",
                accepted="a finished tlloop run or its export/saved_model",
            )
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        from tlloop.serving import Predictor, served_inputs

        signatures = served_inputs(directory)
        if "serving_uint8" not in signatures:  # before loading: a text model's ops need more
            inputs = ", ".join(signatures.get("serving_default", [])) or "no images"
            raise ConfigError(
                given,
                problem=f"the SavedModel at {directory!r} takes {inputs}, not images (a text "
                "model; loading it needs `import tensorflow_text` first)",
                accepted="the run of an image model, or in Python: import tensorflow_text; "
                "tf.saved_model.load(DIR).signatures['serving_default'](text=...)",
            )

        predictor = Predictor(directory)
        if predictor.kind == "regression" and FLAGS["top_k"].present:
            raise ConfigError(
                "top_k",
                FLAGS.top_k,
                "a regression model has no classes to rank",
                "no $top_k (each target's value is printed)",
            )
        if predictor.kind != "regression" and not 1 <= FLAGS.top_k <= predictor.num_classes:
            raise ConfigError(
                "top_k",
                FLAGS.top_k,
                f"the model has {predictor.num_classes} classes",
                f"1 to {predictor.num_classes}",
            )
        for path in paths:
            try:
                fields = predictor.describe(path, FLAGS.top_k)
            except ConfigError as error:
                if FLAGS.bad_images == "fail":
                    raise
                print(f"tlloop.predict: skipped: {flag_line(error, FLAGS)}", file=sys.stderr)
                continue
            print("\t".join([path, *fields]), flush=True)
    except ConfigError as error:
        return fail("tlloop.predict", error, FLAGS)
    return 0


if __name__ == "__main__":
    app.run(main)
