"""Entry point: `python -m tlloop.run --flagfile=experiments/NAME.flags [--flag=value ...]`.

Wiring only: flags -> config -> devices and strategy -> experiment (data, model, plan) ->
workdir (the chief's) -> train. Any bad
input is reported as one line naming the flag or file, with exit code 2, before the workdir
is touched.
"""

from __future__ import annotations

import os
import signal
import sys

from absl import app, flags

from tlloop import flags as tlloop_flags
from tlloop.config import ConfigError

FLAGS = flags.FLAGS
tlloop_flags.define_flags(FLAGS)
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> int:
    try:
        if len(argv) > 1:
            raise ConfigError(f"unexpected arguments {argv[1:]}; accepted: only --name=value flags")
        config = tlloop_flags.to_config(FLAGS)
        # TensorFlow loads only once the flags are known good: a typo fails in a fraction of
        # a second instead of after TensorFlow's start-up.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        from tlloop import distribute, trainer, workdir

        distribute.configure_logical_devices(
            config.distribute.logical_devices, config.distribute.logical_device_memory_mb
        )
        strategy = distribute.make_strategy(config.distribute)
        experiment = trainer.build_experiment(config, strategy)
        if distribute.is_chief(strategy):
            workdir.prepare(config.workdir, overwrite=config.overwrite)
            workdir.write_text(
                os.path.join(config.workdir, "flags.txt"), tlloop_flags.flags_text(FLAGS)
            )
    except ConfigError as error:
        print(f"tlloop: error: {error}", file=sys.stderr)
        return 2
    # SIGTERM (a scheduler's preemption) unwinds like an exception, so every writer is flushed
    # and closed on the way out; exit code 128 + 15 as for a process the signal ended.
    signal.signal(signal.SIGTERM, _terminate)
    trainer.train(experiment, config.workdir, tlloop_flags.flags_text(FLAGS))
    return 0


def _terminate(signum, frame) -> None:
    print("tlloop: stopped by SIGTERM", file=sys.stderr)
    raise SystemExit(128 + signal.SIGTERM)


if __name__ == "__main__":
    app.run(main)
