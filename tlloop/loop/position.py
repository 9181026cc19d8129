"""The run's position: what a checkpoint says of it and where a global step falls.

A run is one sequence of global steps, one batch each. Its phases run `epochs` epochs of
`steps_per_epoch` steps each, but a phase may end early, so the step a phase began at is
stored (the run state's `phase_start`), never summed from the plan. Everything a resume
derives from the position is computed here, from the stored phase, step, phase start and the
step last evaluated: the epoch and the steps of it already done, the gradual-unfreeze stage,
the epochs finished across phases (Keras' epoch numbers). Here too: how the steps of an epoch
are cut into host calls (`chunk`, `AutoLoop`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import NamedTuple

import tensorflow as tf

from tlloop.errors import ConfigError

_PHASE = "state/phase/.ATTRIBUTES/VARIABLE_VALUE"
_STEP = "step/.ATTRIBUTES/VARIABLE_VALUE"
_PHASE_START = "state/phase_start/.ATTRIBUTES/VARIABLE_VALUE"


class Stored(NamedTuple):
    """What a checkpoint stores of the run's position."""

    phase: int  # the index of the phase under way; the plan's length for a finished run
    step: int  # the global step


def stored(path: str) -> Stored:
    """(phase index, global step) stored in checkpoint `path`; ConfigError naming the file if
    it holds none (not a tlloop checkpoint)."""
    try:
        phase = tf.train.load_variable(path, _PHASE)
        step = tf.train.load_variable(path, _STEP)
    except (tf.errors.OpError, ValueError) as error:
        raise ConfigError(
            f"checkpoint {path!r}: unreadable or not a tlloop checkpoint "
            f"({error.__class__.__name__}); accepted: the checkpoints a tlloop run wrote, or "
            "$overwrite to start afresh"
        ) from None
    return Stored(int(phase), int(step))


def phase_start(path: str) -> int:
    """The global step at which the phase under way in checkpoint `path` began."""
    return int(tf.train.load_variable(path, _PHASE_START))


@dataclasses.dataclass(frozen=True)
class Epochs:
    """The epoch arithmetic of a plan: `per_phase` epochs of `steps_per_epoch` steps."""

    steps_per_epoch: int
    per_phase: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.per_phase)

    def before(self, phase: int, step: int = 0, begun_at: int = 0) -> int:
        """Epochs finished before global step `step` of phase `phase` (begun at step
        `begun_at`), counted across phases; a finished run (`phase` past the plan) counts
        every epoch of the plan."""
        earlier = sum(self.per_phase[:phase])
        if phase >= len(self.per_phase):
            return earlier
        return earlier + (step - begun_at) // self.steps_per_epoch

    def stage(self, step: int, begun_at: int) -> int:
        """The gradual-unfreeze stage (the epoch of its phase) global step `step` trained in,
        for a phase begun at `begun_at`: a step that ends an epoch belongs to that epoch."""
        return max(step - begun_at - 1, 0) // self.steps_per_epoch

    def resume(self, step: int, begun_at: int, evaluated_step: int) -> tuple[int, int]:
        """(first epoch, steps of it already done) of a phase begun at `begun_at`, at global
        step `step`, whose last evaluation was at `evaluated_step`."""
        done = step - begun_at
        first_epoch, offset = divmod(done, self.steps_per_epoch)
        if done and not offset and evaluated_step != step:
            # Resumed after an epoch's last step but before its evaluation: evaluate it.
            first_epoch, offset = first_epoch - 1, self.steps_per_epoch
        return first_epoch, offset


def chunk(
    current: int,
    remaining: int,
    *,
    steps_per_loop: int | str,
    log_every_steps: int,
    auto_loop: AutoLoop,
    limits: Iterable[Callable[[int, int], int]] = (),
) -> int:
    """The steps of the next host call from global step `current`: `remaining` (the epoch's,
    so an evaluation ends a call) cut by `steps_per_loop` (with "auto": `auto_loop`'s count,
    and the next logged step) and by each of `limits` (an action's `limit`)."""
    if steps_per_loop == "auto":
        steps = min(remaining, auto_loop.steps())
        if log_every_steps:  # a logged row reaches the host (console, callbacks) as it is made
            steps = min(steps, log_every_steps - current % log_every_steps)
    else:
        steps = min(remaining, steps_per_loop)
    for limit in limits:
        steps = limit(current, steps)
    return steps


class AutoLoop:
    """How many steps the next host call of a compiled step may run under steps_per_loop
    "auto": one while the step is new (its first call traces, its second is timed), then as
    many as take about `seconds` at the last call's speed, at most `max_steps`. The bound
    keeps a call short enough for the console, a SIGTERM and the checkpoint clock, which
    are served between calls; the results do not depend on it (every step is the same)."""

    seconds = 1.0
    max_steps = 1000

    def __init__(self) -> None:
        self.calls = 0
        self.step_seconds = 0.0

    def steps(self) -> int:
        if self.calls < 2 or self.step_seconds <= 0:
            return 1
        return max(1, min(self.max_steps, int(self.seconds / self.step_seconds)))

    def observe(self, steps: int, seconds: float) -> None:
        """Records a host call of `steps` steps that took `seconds`."""
        self.calls += 1
        if self.calls >= 2:  # the first call's time is mostly tracing
            self.step_seconds = seconds / steps
