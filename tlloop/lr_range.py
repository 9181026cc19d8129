"""The learning-rate range test: train one phase briefly with an exponentially rising rate,
record the loss, suggest a rate, and put the model back as it was. `find_rate` runs it for
--head_lr=auto (or reads the rate a resumed run's first process found)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from tlloop import phases as phase_lib
from tlloop.checkpoints import rng_states
from tlloop.config import RANGE_TEST, ConfigError
from tlloop.distribute import distribute_dataset
from tlloop.steps import Metrics, build_train_step
from tlloop.workdir import FOUND_RATE_FILE

LOW, HIGH, STEPS = RANGE_TEST  # --head_lr=auto's test (python -m tlloop.lr_find's defaults)


@keras.saving.register_keras_serializable(package="tlloop")
class ExponentialRange(keras.optimizers.schedules.LearningRateSchedule):
    """`low` at step 0 rising geometrically to `high` at step `steps` - 1."""

    def __init__(self, low: float, high: float, steps: int) -> None:
        self.low, self.high, self.steps = low, high, steps

    def __call__(self, step):
        fraction = keras.ops.cast(step, "float32") / float(max(self.steps - 1, 1))
        return self.low * (self.high / self.low) ** fraction

    def get_config(self) -> dict:
        return {"low": self.low, "high": self.high, "steps": self.steps}


@dataclasses.dataclass(frozen=True)
class RangeResult:
    """Per step: the rate used and the loss of its batch; the smoothed loss; the suggestion."""

    rates: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    stopped_early: bool


def smooth(losses: list[float], beta: float = 0.9) -> list[float]:
    """Exponentially weighted average of `losses`, bias-corrected (as fastai's LR finder)."""
    average, smoothed = 0.0, []
    for i, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta**i))
    return smoothed


def suggest(rates: list[float], smoothed: list[float]) -> float:
    """A tenth of the rate at the smoothed loss's minimum: high enough to learn fast, below the
    rates where the loss turns up."""
    return rates[int(np.argmin(smoothed))] / 10.0


def range_test(
    experiment, phase_index: int, low: float, high: float, steps: int, diverge: float = 4.0
) -> RangeResult:
    """Runs the test for phase `phase_index` on `experiment`'s training stream with the run's
    own step (its optimizer kind, weight decay, task loss with label smoothing and class
    weights, clipping, accumulation, XLA, loss scaling, layer-wise rates, strategy), the
    rate rising from `low` to `high` over `steps` steps, then restores every weight of the
    model (and its RNG states). Stops early once the smoothed loss exceeds `diverge` x its
    minimum."""
    model, phase = experiment.model, experiment.phases[phase_index]
    # The random states too: the run after the test draws what it would have drawn without it.
    kept = [*model.weights, *rng_states(model)]
    saved = [np.array(v.numpy()) for v in kept]
    strategy, data = experiment.strategy, experiment.data
    trainer = experiment.trainer()
    options = dataclasses.replace(
        trainer.step_options(data.batch_size, data.eval_batch_size),
        log_every_steps=1,
        histogram_every_steps=0,
        nan_policy="stop",
    )
    task = trainer.task.prepared(data.train_examples)
    try:
        with strategy.scope():
            phase_lib.apply_trainability(model, phase)
            step = build_train_step(
                model,
                phase,
                task,
                options,
                metrics=Metrics(task=task, evaluation=False),
                global_step=tf.Variable(0, dtype=tf.int64, name="range_test_step"),
                steps_per_epoch=data.steps_per_epoch,
                learning_rate=lambda scale: ExponentialRange(low * scale, high * scale, steps),
            )
        batches = iter(distribute_dataset(strategy, data.train))
        columns = step.log_columns
        rates, losses, stopped = [], [], False
        while len(losses) < steps:
            chunk = min(10, steps - len(losses))
            result = step(batches, chunk)
            for row in result.rows:
                values = dict(zip(columns, row, strict=True))
                rates.append(float(values["learning_rate"]))
                losses.append(float(values["loss"]))
            smoothed = smooth(losses)
            if len(result.nonfinite) or smoothed[-1] > diverge * min(smoothed):
                stopped = True
                break
    finally:
        for variable, value in zip(kept, saved, strict=True):
            variable.assign(value)
    finite = [i for i, loss in enumerate(losses) if math.isfinite(loss)]
    rates, losses = [rates[i] for i in finite], [losses[i] for i in finite]
    smoothed = smooth(losses)
    return RangeResult(rates, losses, smoothed, suggest(rates, smoothed), stopped)


def plot(result: RangeResult, width: int = 320, height: int = 200) -> np.ndarray:
    """Smoothed loss (y) against log10 of the rate (x) as an RGB image in [0, 1]."""
    image = np.ones((height, width, 3), np.float32)
    x = np.log10(np.asarray(result.rates))
    y = np.asarray(result.smoothed)
    low, high = np.min(y), min(np.max(y), 4 * np.min(y) + 1e-12)
    span = max(float(np.ptp(x)), 1e-12)
    columns = ((x - x.min()) / span * (width - 1)).astype(int)
    scaled = (np.clip(y, low, high) - low) / max(high - low, 1e-12)
    rows = ((1 - scaled) * (height - 1)).astype(int)
    points = list(zip(columns, rows, strict=True))
    for (c0, r0), (c1, r1) in itertools.pairwise(points):
        for t in np.linspace(0, 1, max(abs(c1 - c0), abs(r1 - r0), 1) + 1):
            image[round(r0 + t * (r1 - r0)), round(c0 + t * (c1 - c0))] = (0.1, 0.2, 0.6)
    suggested = int((math.log10(result.suggestion) - x.min()) / span * (width - 1))
    if 0 <= suggested < width:
        image[:, suggested] = (0.8, 0.2, 0.2)
    return image


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
            f"loss's minimum in a range test of {self.steps} steps ({LOW:g} to {HIGH:g}"
            f"{', stopped when the loss diverged' if self.stopped_early else ''}) that took "
            f"{self.seconds:.1f} s"
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
    result = range_test(experiment, phase_index, LOW, HIGH, STEPS)
    return FoundRate(
        name,
        result.suggestion,
        len(result.rates),
        round(time.perf_counter() - started, 2),
        result.stopped_early,
    )
