"""What the benchmarks share: tlloop's own epoch loop, run outside a full training run.

No flags here (the benchmark entry points define their own).
"""

from __future__ import annotations

import keras

from tlloop import trainer


def run_trainer_loop(step, batches, steps: int, config, phase, summaries, workdir: str) -> None:
    """`steps` steps of `step` through the trainer's own epoch loop: host calls of up to
    --steps_per_loop, the rows written to `summaries`, a silent progress bar, no profiler and no
    checkpoints (`config` should set checkpoint every_secs=0)."""
    with summaries.default("train"):
        trainer._run_epoch(
            step,
            batches,
            steps,
            config,
            phase,
            trainer._Profiler((), workdir),
            summaries,
            keras.utils.Progbar(steps, verbose=0),
            trainer._Saver(None, config, step.global_step, single_host=True),
            None,
        )
