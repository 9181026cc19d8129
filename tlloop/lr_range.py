"""The learning-rate range test: train one phase briefly with an exponentially rising rate,
record the loss, suggest a rate, and put the model back as it was (`range_test`, from Python on
any TransferModel and data; the command line's `python -m tlloop.lr_find` and its
`learning_rate="auto"` run it through `tlloop.cli.head_lr`)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import keras
import numpy as np
import tensorflow as tf

from tlloop import phases as phase_lib
from tlloop.checkpoints import rng_states
from tlloop.config import RANGE_TEST, PhaseConfig, TrainingConfig
from tlloop.data.examples import as_examples
from tlloop.distribute import distribute_dataset
from tlloop.errors import ConfigError
from tlloop.models import TransferModel
from tlloop.models.walk import declared_input_spec
from tlloop.steps import Metrics, StepOptions, build_train_step
from tlloop.tasks import Classification, Task

# The test's default rates and length (learning_rate="auto"'s; python -m tlloop.lr_find's).
LOW, HIGH, STEPS = RANGE_TEST


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
    model: TransferModel,
    train,
    phase: PhaseConfig,
    *,
    task: Task | None = None,
    batch_size: int = 32,
    low: float = LOW,
    high: float = HIGH,
    steps: int = STEPS,
    diverge: float = 4.0,
    seed: int = 0,
    training: TrainingConfig | None = None,
    strategy: tf.distribute.Strategy | None = None,
    jit_compile: bool = False,
    mixed_float16: bool = False,
) -> RangeResult:
    """The learning-rate range test of `phase` (a `tlloop.Phase`: what unfreezes, its BatchNorm
    mode, its optimizer; its own rate is replaced) on `model`: `steps` steps on `train`
    ((inputs, labels) arrays, a finite tf.data.Dataset of pairs, or Examples; shuffled by
    `seed`, global batches of `batch_size`) with the rate rising geometrically from `low` to
    `high`, through the step a `Trainer` with the same `task` (default: classification),
    `training`, `seed`, `strategy` (default: the current), `jit_compile` and `mixed_float16`
    would run (optimizer kind, weight decay, the task's loss with label smoothing and class
    weights, clipping, accumulation, XLA, loss scaling, layer-wise rates). Stops early once the
    smoothed loss exceeds `diverge` x its minimum. Every weight of the model (and its random
    states) is put back afterwards. Returns the rates, losses and the suggested rate.

    Raises ConfigError naming the argument at fault."""
    if not 0 < low < high:
        raise ConfigError("low", low, f"not below high={high:g} or not positive", "0 < low < high")
    if steps < 2:
        raise ConfigError("steps", steps, "too few to see a curve", ">= 2")
    if batch_size < 1:
        raise ConfigError("batch_size", batch_size, "not positive", ">= 1")
    strategy = strategy or tf.distribute.get_strategy()
    examples = as_examples(train, argument="train", inputs=declared_input_spec(model.backbone))
    if not phase.epochs:
        raise ConfigError(f"{phase.name}.epochs", 0, "the phase does not train", ">= 1")
    [planned] = phase_lib.plan_phases((phase,), model)
    options = StepOptions(
        batch_size=batch_size,
        eval_batch_size=batch_size,
        seed=seed,
        training=training or TrainingConfig(),
        jit_compile=jit_compile,
        mixed_float16=mixed_float16,
        log_every_steps=1,
        histogram_every_steps=0,
        nan_policy="stop",
    )
    task = (task or Classification()).prepared(examples)
    # The random states too: the run after the test draws what it would have drawn without it.
    kept = [*model.weights, *rng_states(model)]
    saved = [np.array(v.numpy()) for v in kept]
    try:
        with strategy.scope():
            phase_lib.apply_trainability(model, planned)
            step = build_train_step(
                model,
                planned,
                task,
                options,
                metrics=Metrics(task=task, evaluation=False),
                global_step=tf.Variable(0, dtype=tf.int64, name="range_test_step"),
                steps_per_epoch=examples.batch_count(batch_size),
                learning_rate=lambda scale: ExponentialRange(low * scale, high * scale, steps),
            )
        batches = iter(distribute_dataset(strategy, examples.training_batches(batch_size, seed)))
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
