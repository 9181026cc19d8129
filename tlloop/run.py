"""Entry point: `python -m tlloop.run --flagfile=experiments/NAME.flags [--flag=value ...]`.

Wiring only: flags -> config -> (unless --nosupervise, a supervisor that runs the rest in a
child process: see tlloop.supervise) -> devices and strategy -> experiment (data, model,
plan) -> workdir (the chief's) -> train. Any bad
input is reported as one line naming the flag or file, with exit code 2, before the workdir
is touched. A run that fails later (NaN loss, a write that fails) exits 1 with one line too;
its last checkpoint is intact.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from absl import app, flags

from tlloop import supervise
from tlloop.cli import flags as tlloop_flags
from tlloop.cli.entry import fail
from tlloop.config import ConfigError
from tlloop.errors import RunFailed

FLAGS = flags.FLAGS
tlloop_flags.define_flags(FLAGS)
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> int:
    try:
        if len(argv) > 1:
            raise ConfigError(f"unexpected arguments {argv[1:]}; accepted: only --name=value flags")
        config = tlloop_flags.to_config(FLAGS)
    except ConfigError as error:
        return fail("tlloop", error)
    if config.supervise and not os.environ.get(supervise.CHILD_ENV):
        # This process only watches: the training runs in a child, the same command.
        command = [sys.executable, "-m", "tlloop.run", *sys.argv[1:]]
        return supervise.supervise(
            command,
            config.workdir,
            max_restarts=config.max_restarts,
            restart_command=[*command, "--nooverwrite"],  # a restart resumes, never replaces
        )
    try:
        # TensorFlow loads only once the flags are known good: a typo fails in a fraction of
        # a second instead of after TensorFlow's start-up.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        from tlloop import distribute, workdir
        from tlloop.actions import Stopped
        from tlloop.cli.experiment import build_experiment, train
        from tlloop.cli.strategy import make_strategy

        strategy = make_strategy(config.distribute)
        experiment = build_experiment(config, strategy)
        # The resolved flags: the values --recipe chose are written out, so flags.txt re-runs
        # the same experiment.
        flags_text = tlloop_flags.flags_text(experiment.config)
        if distribute.is_chief(strategy):
            workdir.prepare(config.workdir, flags_text, overwrite=config.overwrite)
    except ConfigError as error:
        return fail("tlloop", error)
    # SIGTERM (a scheduler's preemption) asks the trainer to stop after the step under way:
    # it saves a checkpoint, flushes and closes its writers; exit code 128 + 15, as for a
    # process the signal ended.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        restarts = int(os.environ.get(supervise.RESTARTS_ENV, "0"))
        train(experiment, config.workdir, flags_text, stop=stop, restarts=restarts)
    except ConfigError as error:  # a checkpoint in the workdir that does not fit
        return fail("tlloop", error)
    except RunFailed as error:
        return fail("tlloop", error, code=1)
    except Stopped:
        print("tlloop: stopped by SIGTERM; the same command resumes the run", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    app.run(main)
