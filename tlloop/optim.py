"""Optimizers: one fresh optimizer per phase, built on exactly the variables it will update.

Fresh per phase because a shared Keras Adam counts iterations globally: weights unfrozen after
many head steps would get bias-corrected first updates about 2.5x too large. Built eagerly on
the variables because a Keras 3 optimizer refuses variables it was not built with, and under a
distribution strategy must be built inside the scope before the first step.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from tlloop.config import PhaseConfig, TrainingConfig


@keras.saving.register_keras_serializable(package="tlloop")
class PhaseSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The learning rate of one phase at optimizer step t (0-based).

    Linear warmup from 0 to `peak` over `warmup` steps, then `kind` over the remaining steps:
    constant, cosine (to 0), linear (to 0), step (x0.1 at 50% and again at 75%).
    """

    def __init__(self, peak: float, kind: str, total: int, warmup: int = 0) -> None:
        self.peak, self.kind, self.total, self.warmup = peak, kind, max(total, 1), warmup

    def __call__(self, step):
        t = keras.ops.cast(step, "float32")
        warmup = float(self.warmup)
        span = float(max(self.total - self.warmup, 1))
        # Progress after warmup, in [0, 1].
        progress = keras.ops.clip((t - warmup) / span, 0.0, 1.0)
        if self.kind == "cosine":
            rate = 0.5 * self.peak * (1.0 + keras.ops.cos(math.pi * progress))
        elif self.kind == "linear":
            rate = self.peak * (1.0 - progress)
        elif self.kind == "step":
            rate = self.peak * keras.ops.where(
                progress >= 0.75, 0.01, keras.ops.where(progress >= 0.5, 0.1, 1.0)
            )
        else:
            rate = self.peak + 0.0 * t
        if self.warmup:
            rate = rate * keras.ops.minimum(1.0, (t + 1.0) / warmup)
        return rate

    def get_config(self) -> dict:
        return {"peak": self.peak, "kind": self.kind, "total": self.total, "warmup": self.warmup}


class GroupedOptimizer(tf.Module):
    """One Keras optimizer per group of variables, each at its own learning rate: what
    discriminative (layer-wise) learning rates need, since Keras 3 has no MultiOptimizer and
    scaling an Adam gradient does not scale its update. `apply` takes all gradients in the
    order of `variables`; `learning_rate` and `iterations` are the first group's (the head's).
    """

    def __init__(self, optimizers: list, groups: list[list[int]]) -> None:
        super().__init__(name="grouped_optimizer")
        self.optimizers = optimizers
        self.groups = groups

    def apply(self, grads, variables) -> None:
        for optimizer, indices in zip(self.optimizers, self.groups, strict=True):
            optimizer.apply([grads[i] for i in indices], [variables[i] for i in indices])

    @property
    def variables(self) -> list:
        return [v for optimizer in self.optimizers for v in optimizer.variables]

    @property
    def learning_rate(self):
        return self.optimizers[0].learning_rate

    @property
    def iterations(self):
        return self.optimizers[0].iterations


def make_optimizer(
    phase: PhaseConfig,
    variables: list,
    training: TrainingConfig | None = None,
    *,
    steps: int = 1,
    warmup_steps: int = 0,
    no_decay: tuple = (),
    multipliers: dict[int, float] | None = None,
    loss_scale: bool = False,
    learning_rate=None,
):
    """The phase's optimizer, built on `variables`.

    `steps` is the phase's number of optimizer steps (what the schedule spans), `warmup_steps`
    its warmup, `no_decay` the variables weight decay must not touch (biases, BatchNorm).
    `multipliers` (by `id` of a variable; missing: 1) scale the learning rate per variable; with
    more than one distinct value the result is a GroupedOptimizer, one optimizer per value.
    `loss_scale` (float16) wraps the optimizer in Keras' dynamic LossScaleOptimizer.
    `learning_rate`, if given, replaces the phase's schedule: a function of a group's rate
    multiplier (1 without groups) returning its rate or schedule.
    """
    training = training or TrainingConfig()
    scales = [(multipliers or {}).get(id(v), 1.0) for v in variables]
    distinct = sorted(set(scales), reverse=True)  # 1.0 (the head) first
    if len(distinct) == 1:
        optimizer = _one_optimizer(
            phase, variables, training, steps, warmup_steps, no_decay, 1.0, learning_rate
        )
        if loss_scale:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(variables)
        return optimizer
    if loss_scale:
        raise ValueError("loss scaling takes a single optimizer, not layer-wise groups")
    groups = [[i for i, s in enumerate(scales) if s == scale] for scale in distinct]
    optimizers = [
        _one_optimizer(
            phase,
            [variables[i] for i in group],
            training,
            steps,
            warmup_steps,
            no_decay,
            scale,
            learning_rate,
        )
        for scale, group in zip(distinct, groups, strict=True)
    ]
    return GroupedOptimizer(optimizers, groups)


def _one_optimizer(phase, variables, training, steps, warmup_steps, no_decay, scale, override=None):
    if override is not None:  # the phase's own rate is not read (it may be "auto")
        rate = override(scale)
    else:
        rate = phase.learning_rate * scale
        if training.lr_schedule != "constant" or warmup_steps:
            rate = PhaseSchedule(rate, training.lr_schedule, steps, warmup_steps)
    decay = training.weight_decay or None
    if training.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(rate, momentum=0.9, weight_decay=decay)
    elif training.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(rate, weight_decay=training.weight_decay)
    elif training.optimizer == "lamb":
        optimizer = keras.optimizers.Lamb(rate, weight_decay=decay)
    else:
        optimizer = keras.optimizers.Adam(rate, weight_decay=decay)
    exclude = [v for v in no_decay if any(v is w for w in variables)]
    if exclude:
        optimizer.exclude_from_weight_decay(var_list=exclude)
    optimizer.build(variables)
    return optimizer
