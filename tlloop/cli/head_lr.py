"""The command line's range test: `--head_lr=auto` (the rate found before a run trains, kept
in WORKDIR/found_rate.json so a resumed run reuses it) and `python -m tlloop.lr_find`'s test,
both on an Experiment's own data, model, strategy and step, through the library's
`tlloop.lr_range.range_test`."""

from __future__ import annotations

import dataclasses
import json
import os
import time

from tlloop import lr_range
from tlloop.errors import ConfigError
from tlloop.workdir import FOUND_RATE_FILE


def experiment_range_test(
    experiment, phase_index: int, low: float, high: float, steps: int
) -> lr_range.RangeResult:
    """`lr_range.range_test` of phase `phase_index` of `experiment` (a built Experiment) on its
    training examples, with the step its Trainer would run (task, training settings, seed,
    strategy, XLA, loss scaling) and the global batch size of its data."""
    trainer = experiment.trainer()
    return lr_range.range_test(
        experiment.model,
        experiment.data.train_examples,
        experiment.phases[phase_index].config,
        task=trainer.task,
        batch_size=experiment.data.batch_size,
        low=low,
        high=high,
        steps=steps,
        seed=trainer.seed,
        training=trainer.training,
        strategy=experiment.strategy,
        jit_compile=trainer.options["jit_compile"],
        mixed_float16=trainer.options["mixed_float16"],
    )


@dataclasses.dataclass(frozen=True)
class FoundRate:
    """--head_lr=auto's outcome: the phase, the suggested `rate` it trains with, the test's
    `steps` and `seconds` (its cost), whether it stopped early on a diverging loss, and whether
    it was `reused` (read from the workdir of the run being resumed, not measured again)."""

    phase: str
    rate: float
    steps: int
    seconds: float
    stopped_early: bool
    reused: bool = False

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def line(self) -> str:
        """What the run logs at its start."""
        if self.reused:
            return (
                f"--{self.phase}_lr=auto: {self.rate:.3g}, the rate this run's first start "
                f"found ({FOUND_RATE_FILE}); no range test"
            )
        return (
            f"--{self.phase}_lr=auto: {self.rate:.3g}, a tenth of the rate at the smoothed "
            f"loss's minimum in a range test of {self.steps} steps ({lr_range.LOW:g} to "
            f"{lr_range.HIGH:g}{', stopped when the loss diverged' if self.stopped_early else ''})"
            f" that took {self.seconds:.1f} s"
        )


def find_rate(experiment, phase_index: int, workdir: str, reuse: bool = True) -> FoundRate:
    """The rate for phase `phase_index` (learning rate "auto"): with `reuse`, the one recorded
    in `workdir` by the run being resumed (so a restart trains on at the same rate); else a
    range test of STEPS steps from LOW to HIGH on `experiment` (the model is left as built).
    Raises ConfigError naming the file when the record is unreadable."""
    name = experiment.phases[phase_index].config.name
    path = os.path.join(workdir, FOUND_RATE_FILE)
    if reuse and os.path.exists(path):
        try:
            with open(path) as file:
                record = json.load(file)
            return dataclasses.replace(FoundRate(**record), reused=True)
        except (OSError, ValueError, TypeError) as error:
            raise ConfigError(
                f"{path!r}: not the rate record --{name}_lr=auto writes ({error}); accepted: the "
                "file as a run wrote it, or --overwrite to start the run afresh"
            ) from None
    started = time.perf_counter()
    result = experiment_range_test(
        experiment, phase_index, lr_range.LOW, lr_range.HIGH, lr_range.STEPS
    )
    return FoundRate(
        name,
        result.suggestion,
        len(result.rates),
        round(time.perf_counter() - started, 2),
        result.stopped_early,
    )
