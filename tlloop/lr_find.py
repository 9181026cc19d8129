"""Entry point: `python -m tlloop.lr_find --flagfile=experiments/NAME.flags [--phase=head]`.

The learning-rate range test (Smith 2017; fastai's lr_find) for one phase of an experiment:
--find_steps steps with the rate rising geometrically from --lr_min to --lr_max, on the
experiment's own data, model, strategy and train step (optimizer, weight decay, loss,
clipping, accumulation, XLA, loss scaling, layer-wise rates). Prints a suggested rate, writes
loss against rate to TensorBoard under WORKDIR/lr_find/tensorboard (scalars per step, a plot,
the suggestion as text), and leaves the model as it was built. Writes nothing else.
Wiring only: the test is the library's `tlloop.lr_range.range_test`, given the experiment's
arguments by `tlloop.cli.head_lr`.
"""

from __future__ import annotations

import os

from absl import app, flags

from tlloop.cli import flags as tlloop_flags
from tlloop.cli.entry import fail
from tlloop.config import RANGE_TEST
from tlloop.errors import ConfigError

FLAGS = flags.FLAGS
tlloop_flags.define_flags(FLAGS)
flags.mark_flag_as_required("workdir")
flags.DEFINE_enum("phase", "head", ["head", "finetune"], "The phase to test.")
flags.DEFINE_float("lr_min", RANGE_TEST[0], "The first rate.")
flags.DEFINE_float("lr_max", RANGE_TEST[1], "The last rate.")
flags.DEFINE_integer("find_steps", RANGE_TEST[2], "Steps of the test.")


def main(argv: list[str]) -> int:
    try:
        if len(argv) > 1:
            raise ConfigError(f"unexpected arguments {argv[1:]}; accepted: only --name=value flags")
        if not 0 < FLAGS.lr_min < FLAGS.lr_max:
            raise ConfigError(
                f"$lr_min={FLAGS.lr_min:g} / $lr_max={FLAGS.lr_max:g}: not a rising range; "
                "accepted: 0 < lr_min < lr_max"
            )
        if FLAGS.find_steps < 5:
            raise ConfigError("find_steps", FLAGS.find_steps, "too few", ">= 5")
        config = tlloop_flags.to_config(FLAGS)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        from tlloop.cli.experiment import build_experiment
        from tlloop.cli.strategy import make_strategy

        experiment = build_experiment(config, make_strategy(config.distribute), find_rates=False)
        names = [phase.name for phase in experiment.phases]
        if FLAGS.phase not in names:
            raise ConfigError(
                "phase", FLAGS.phase, "that phase has 0 epochs in this experiment", ", ".join(names)
            )
    except ConfigError as error:
        return fail("tlloop.lr_find", error, FLAGS)
    from tlloop import lr_range
    from tlloop.cli.head_lr import experiment_range_test
    from tlloop.summaries import Summaries

    result = experiment_range_test(
        experiment, names.index(FLAGS.phase), FLAGS.lr_min, FLAGS.lr_max, FLAGS.find_steps
    )
    summaries = Summaries(os.path.join(config.workdir, "lr_find"))
    for i, (rate, loss, smoothed) in enumerate(
        zip(result.rates, result.losses, result.smoothed, strict=True)
    ):
        summaries.scalars(
            "train", {"loss": loss, "smoothed_loss": smoothed, "learning_rate": rate}, i + 1
        )
    summaries.image("train", "loss_vs_learning_rate", lr_range.plot(result), 0)
    message = (
        f"suggested --{FLAGS.phase}_lr={result.suggestion:.2g} (a tenth of the rate at the "
        f"smoothed loss's minimum; {len(result.rates)} steps"
        f"{', stopped when the loss diverged' if result.stopped_early else ''})"
    )
    summaries.text("suggestion", message, 0)
    summaries.close()
    print(message)
    return 0


if __name__ == "__main__":
    app.run(main)
