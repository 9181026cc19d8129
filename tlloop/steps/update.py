"""The update of a finite training step: clipping, gradient accumulation, the optimizer, the
moving averages of the weights, and the training metrics of the batches it applies."""

from __future__ import annotations

import contextlib
import functools

import keras
import tensorflow as tf

from tlloop.steps.metrics import Metrics


class Update:
    """Applies gradients of `variables` (a trainable set) with `optimizer`.

    With `grad_accum_steps` k > 1 the gradients of k consecutive batches are summed in
    per-replica accumulators and their mean is applied once (`accumulators` must be
    checkpointed with the optimizer); `apply_leftover` applies the mean of the fewer batches
    left at an epoch's end. `clip_grad_norm` > 0 clips the gradient of the global batch (summed
    over replicas first: each replica's own norm would clip the wrong thing). With `ema_decay`
    > 0 it keeps `averages`, exponential moving averages of the weights (checkpoint them with
    the optimizer; `swap_averages` puts them in the model). `metrics` take every batch whose
    gradients are applied or accumulated.
    """

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer,
        variables: list,
        metrics: Metrics,
        *,
        clip_grad_norm: float = 0.0,
        grad_accum_steps: int = 1,
        ema_decay: float = 0.0,
    ) -> None:
        self.optimizer = optimizer
        self.variables = variables
        self.metrics = metrics
        self.clip_grad_norm = clip_grad_norm
        self.grad_accum_steps = grad_accum_steps
        self.strategy = tf.distribute.get_strategy()
        self.loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        # Exponential moving averages of the trainable weights, updated after every update:
        # a_t = decay * a_(t-1) + (1 - decay) * w_t, from a_0 = the weights at construction.
        self.ema_decay = ema_decay
        self.averages = (
            [
                tf.Variable(v, trainable=False, name="ema_" + v.name.replace("/", "_"))
                for v in variables
            ]
            if ema_decay
            else []
        )
        # Per-replica sums of the gradients of the batches since the last update, and their
        # count: state to checkpoint (a resumed run goes on with a half-full accumulation).
        self.accumulators = _accumulators(variables) if grad_accum_steps > 1 else []
        if self.accumulators:
            self.accumulated = self.accumulators[0]

    def apply(self, grads, labels, losses, outputs, per_replica=None) -> None:
        """The update of a finite step: applied, or accumulated (and applied every
        grad_accum_steps), then the moving averages. `per_replica(fn, *args)` runs a replica
        function: `strategy.run` in cross-replica context (default), a plain call inside the
        one-replica XLA step."""
        run = per_replica or (lambda fn, *args: self.strategy.run(fn, args=args))
        if self.grad_accum_steps == 1:
            run(self._replica_apply, grads, labels, losses, outputs)
            self._update_averages()
        else:
            run(self._replica_accumulate, grads, labels, losses, outputs)
            count = self.accumulated.assign_add(1)
            if count % self.grad_accum_steps == 0:
                run(self._replica_apply_accumulated, tf.constant(self.grad_accum_steps, tf.float32))
                self._update_averages()

    def _replica_apply(self, grads, labels, losses, outputs) -> None:
        self.metrics.update(losses, labels, outputs)
        self._optimize(grads)

    def _optimize(self, grads) -> None:
        if self.clip_grad_norm:
            context = tf.distribute.get_replica_context()
            total = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            scale = self.optimizer.dynamic_scale if self.loss_scaled else 1.0
            clipped, _ = tf.clip_by_global_norm(total, self.clip_grad_norm * scale)
            # The optimizer sums over replicas again: each contributes its share.
            grads = [g / context.num_replicas_in_sync for g in clipped]
        # In replica context the Keras optimizer all-reduces (sums) the gradients itself.
        self.optimizer.apply(grads, self.variables)

    def _update_averages(self) -> None:
        # Cross-replica context: one assignment updates the average on every replica.
        if not self.averages:
            return
        for average, variable in zip(self.averages, self.variables, strict=True):
            average.assign(self.ema_decay * average + (1.0 - self.ema_decay) * variable)

    def swap_averages(self) -> None:
        """Exchanges the trainable weights and their moving averages (its own inverse): call it
        around an evaluation or export that should see the averaged weights."""
        for average, variable in zip(self.averages, self.variables, strict=True):
            saved = tf.identity(variable)
            variable.assign(average)
            average.assign(saved)

    def _replica_accumulate(self, grads, labels, losses, outputs) -> None:
        self.metrics.update(losses, labels, outputs)
        for accumulator, grad in zip(self.accumulators[1:], grads, strict=True):
            accumulator.assign_add(grad)

    def _replica_apply_accumulated(self, count) -> None:
        """Applies the mean of the `count` batches' gradients accumulated, and empties the sums."""
        sums = self.accumulators[1:]
        self._optimize([tf.identity(a) / tf.cast(count, a.dtype) for a in sums])
        for accumulator in sums:
            accumulator.assign(tf.zeros_like(accumulator))

    def apply_leftover(self) -> int:
        """With gradient accumulation, applies the gradients of the batches accumulated since
        the last update (fewer than `grad_accum_steps`), averaged over those batches, then the
        moving averages; returns how many batches that was (0: nothing was pending). The
        controller calls it at every epoch's end, so no batch's gradient is ever dropped and
        an evaluation sees weights every batch before it updated."""
        if self.grad_accum_steps == 1:
            return 0
        left = int(self.accumulated.numpy()) % self.grad_accum_steps
        if left:
            self._leftover(tf.constant(left, tf.float32))
        return left

    @functools.cached_property
    def _leftover(self):
        def leftover(count):
            self.strategy.run(self._replica_apply_accumulated, args=(count,))
            self._update_averages()
            self.accumulated.assign(0)  # the next accumulation starts afresh

        return tf.function(leftover)


def _accumulators(variables: list) -> list[tf.Variable]:
    """The count of batches accumulated, then one per-replica gradient sum per variable."""
    count = tf.Variable(
        0,
        dtype=tf.int64,
        trainable=False,
        name="accumulated_batches",
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )
    return [count] + [
        tf.Variable(
            tf.zeros(v.shape, v.dtype),
            trainable=False,
            name="accumulated_gradient",
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.SUM,
        )
        for v in variables
    ]


@contextlib.contextmanager
def averaged(steps):
    """The model holds the moving averages of `steps` (compiled training steps, an `Update`,
    or None) inside, its trained weights again after."""
    if steps is None or not steps.averages:
        yield
        return
    steps.swap_averages()
    try:
        yield
    finally:
        steps.swap_averages()
