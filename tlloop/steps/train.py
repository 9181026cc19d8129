"""One training step as `CompiledSteps` runs it: the body's gradients, the update when every
replica's step is finite, the global step, the logged rows and the non-finite steps."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tlloop.config import NAN_POLICIES
from tlloop.models import TransferModel
from tlloop.steps.body import TrainBody
from tlloop.steps.metrics import check_created_in_scope
from tlloop.steps.update import Update


class StepsResult(NamedTuple):
    """What one call of compiled training steps returns.

    `rows`: one row of the step's `log_columns` per logged step. `nonfinite`: the global steps
    whose loss or gradients held a NaN or Inf; their update was not applied.
    """

    rows: np.ndarray
    nonfinite: np.ndarray


class TrainStep:
    """One training step of `body` (forward, loss, gradients) and `update`, counted on
    `global_step`; a step body for `CompiledSteps`.

    Made for one trainable set (the body's `variables`, captured when it was made): when the
    set changes (a phase unfreezes layers), a new one must be made; `matches(model)` says
    whether this one is still current.

    Under whole-step XLA (one replica) the update, when finite, runs inside the compiled step
    with the augmentation and mixing; the random augmentation layers then draw from XLA's
    random kernels: the same seeds give other (equally distributed) draws than without XLA,
    and the same ones again on a resume. Otherwise XLA compiles the loss and gradients.

    Every `log_every_steps` steps (0: never) it writes scalars to the default summary writer
    and returns a row of `log_columns` (the step, its loss, the task's step metrics, the
    penalty terms, the learning rate and the gradient norm); every `histogram_every_steps`
    steps, histograms of the trainable weights and their gradients (both of the global batch:
    with several replicas, a logged step reduces the gradients once more). The cadence is
    decided in the graph, on the step counter, so nothing retraces.

    A step whose loss or gradients hold a NaN or Inf on any replica applies no update and
    leaves the metrics alone (the decision is reduced over replicas, so all agree); the step
    still counts, since it consumed its batch. With `nan_policy` "stop" the call returns right
    after such a step; with "skip_step" it goes on.
    """

    kind = "train"
    log_prefix = "jit_compile: "
    part_scope = "gradients"
    part_name = "the loss and gradients"
    outside = "augmentation, mixing and the update run outside XLA"
    replicas_cause = (
        "the optimizer's cross-replica all-reduce is a merge_call, which XLA cannot compile"
    )

    def __init__(
        self,
        body: TrainBody,
        update: Update,
        *,
        log_every_steps: int = 0,
        histogram_every_steps: int = 0,
        nan_policy: str = "stop",
    ) -> None:
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy {nan_policy!r}; known: {', '.join(NAN_POLICIES)}")
        self.stop_on_nonfinite = nan_policy == "stop"
        self.body, self.update = body, update
        self.global_step = body.global_step
        self.log_every_steps = log_every_steps
        self.histogram_every_steps = histogram_every_steps
        self.strategy = tf.distribute.get_strategy()
        # What the controller, checkpoints and tests read of a training step.
        self.model, self.variables = body.model, body.variables
        self.optimizer, self.metrics = update.optimizer, update.metrics
        self.averages, self.accumulators = update.averages, update.accumulators
        self.apply_leftover, self.swap_averages = update.apply_leftover, update.swap_averages
        self.log_columns = ("step", *body.value_columns, "learning_rate", "gradient_norm")
        check_created_in_scope(self.strategy, body.model.weights, "model")
        check_created_in_scope(self.strategy, update.optimizer.variables, "optimizer")
        check_created_in_scope(self.strategy, update.metrics.variables, "metric")
        check_created_in_scope(self.strategy, [body.global_step], "step counter")

    def matches(self, model: TransferModel) -> bool:
        """True while `model`'s trainable variables are exactly the ones this step updates."""
        current = model.trainable_variables
        return len(current) == len(self.variables) and all(
            a is b for a, b in zip(current, self.variables, strict=True)
        )

    def part(self, inputs, labels, mixed=None):
        return self.body.gradients(inputs, labels, mixed)

    def replica(self, part, inputs, labels):
        """The gradients (from `part`), the step values and 1.0 for a non-finite step."""
        inputs, mixed = self.body.prepare(inputs)
        grads, losses, outputs, penalties = part(inputs, labels, mixed)
        finite = self.body.finite(grads, losses)
        values = self.body.step_values(labels, losses, outputs, penalties)
        return values, grads, losses, outputs, 1.0 - tf.cast(finite, tf.float32)

    def whole(self, inputs, labels):
        """One replica's whole step (compiled by XLA, one replica only): the gradients, and
        the update only when they and the loss are finite. Returns the step values, what the
        logging needs of the gradients (all of them with histograms, else their global norm
        when rows are logged) and 1.0 for a non-finite step (else 0.0)."""
        inputs, mixed = self.body.prepare(inputs)
        grads, losses, outputs, penalties = self.body.gradients(inputs, labels, mixed)
        finite = self.body.finite(grads, losses)
        if finite:
            self.update.apply(grads, labels, losses, outputs, per_replica=lambda fn, *a: fn(*a))
        if self.histogram_every_steps:
            logged = grads
        else:  # the norm only when rows are logged: 0 otherwise, never read
            logged = tf.linalg.global_norm(grads) if self.log_every_steps else tf.zeros([])
        values = self.body.step_values(labels, losses, outputs, penalties)
        return values, logged, 1.0 - tf.cast(finite, tf.float32)

    def loop_start(self) -> tuple:
        width = len(self.log_columns)
        rows = tf.TensorArray(tf.float32, size=0, dynamic_size=True, element_shape=(width,))
        nonfinite = tf.TensorArray(tf.int64, size=0, dynamic_size=True, element_shape=())
        return rows, nonfinite

    def loop_step(self, batch, carry: tuple, run, whole: bool):
        rows, nonfinite = carry
        # The rate this step's update uses (a schedule reads the optimizer's iterations).
        rate = tf.cast(self.optimizer.learning_rate, tf.float32)
        if whole:  # one replica: the update, when finite, happened inside the XLA step
            values, logged, bad = run(*batch)
            finite = self._all_finite(bad)
            grads = logged if self.histogram_every_steps else None
            norm = None if self.histogram_every_steps else logged
        else:
            values, grads, losses, outputs, bad = run(*batch)
            finite = self._all_finite(bad)
            norm = None
            if finite:
                self.update.apply(grads, batch[1], losses, outputs)
        count = self.global_step.assign_add(1)
        if self.log_every_steps and count % self.log_every_steps == 0:
            row = self._log(count, values, self._norm(norm, grads), rate)
            rows = rows.write(rows.size(), row)
        if self.histogram_every_steps and count % self.histogram_every_steps == 0:
            self._histograms(count, grads)
        if not finite:
            nonfinite = nonfinite.write(nonfinite.size(), count)
        stop = tf.logical_not(finite) if self.stop_on_nonfinite else False
        return (rows, nonfinite), stop

    def loop_end(self, carry: tuple):
        rows, nonfinite = carry
        return rows.stack(), nonfinite.stack()

    def result(self, outputs) -> StepsResult:
        rows, nonfinite = outputs
        return StepsResult(rows.numpy(), nonfinite.numpy())

    def _all_finite(self, bad):
        """Whether no replica's step was non-finite (`bad`: 1.0 per replica that was).
        Decided in cross-replica context on the sum over replicas: every replica takes the same
        branch, and the optimizer's all-reduce (a merge_call) is never inside a replica-context
        cond, which tf.distribute does not support."""
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, bad, axis=None) == 0.0

    def _log(self, count, values, norm, rate):
        """Writes global step `count`'s scalars and returns its row; `norm` is the global norm
        of the global batch's (scaled, under loss scaling) gradients."""
        batch = [self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in values]
        if self.update.loss_scaled:
            norm /= tf.cast(self.optimizer.dynamic_scale, tf.float32)
        row = [*batch, rate, norm]
        with _top_level_name_scope():
            for name, value in zip(self.log_columns[1:], row, strict=True):
                tf.summary.scalar(name, value, step=count)
        return tf.stack([tf.cast(count, tf.float32), *row])

    def _norm(self, norm, grads):
        """`norm` when the whole XLA step computed it, else the global norm of the global
        batch's `grads`."""
        return norm if norm is not None else tf.linalg.global_norm(self._global_gradients(grads))

    def _global_gradients(self, grads) -> list:
        """The gradients of the global batch: the sum of every replica's.

        The optimizer's own all-reduce is internal to Keras, so logged steps reduce once more;
        with one replica this is the identity.
        """
        return [self.strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None) for g in grads]

    def _histograms(self, count, grads) -> None:
        grads = self._global_gradients(grads)
        with _top_level_name_scope():
            for variable, grad in zip(self.variables, grads, strict=True):
                tf.summary.histogram(f"weights/{variable.path}", variable, step=count)
                tf.summary.histogram(f"gradients/{variable.path}", grad, step=count)


def _top_level_name_scope():
    """A name scope at the top of the graph: summary tags take the current scope as a prefix,
    which inside the step's loop and conditions would be "while/cond/"."""
    return tf.compat.v1.get_default_graph().name_scope(None)
