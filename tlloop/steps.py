"""Compiled train and eval steps.

A `TrainStep` is made for one trainable set: it captures `model.trainable_variables` when it is
made, takes gradients with `tf.GradientTape` against exactly those variables and applies them to
exactly those. When the set changes (a phase unfreezes layers), a new `TrainStep` must be made;
`matches(model)` says whether this one is still current. Each call runs `num_steps` steps in one
`tf.while_loop` (one host call), reading batches from an iterator.

Steps know nothing of flags: they get a model, an optimizer, a mode table and metrics. They run
under the `tf.distribute` strategy current when they are made, and refuse state (variables of the
model, optimizer, metrics, step counter) that was created outside that strategy's scope: such
state fails or hangs later, far from its cause.
"""

from __future__ import annotations

import contextlib
import functools
import re
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tlloop.anchors import Penalty
from tlloop.mixing import Mixing, mixed_loss
from tlloop.models import ModeTable, TransferModel
from tlloop.tasks import Classification, ConfusionMatrix, Task


class Metrics:
    """The loss (weighted mean), the task's metrics and the example count of a run of steps;
    made under the strategy's scope.

    Without a `task`, the built-in classification metrics: accuracy, and with `num_classes` > 0
    a confusion matrix (rows: labels). Keras 3 metric variables are sync-on-read: `update`
    runs in replica context, `result` must be read outside `strategy.run`.
    """

    def __init__(
        self, num_classes: int = 0, *, task: Task | None = None, evaluation: bool | None = None
    ) -> None:
        task = task or Classification(num_classes or None)
        evaluation = bool(num_classes) if evaluation is None else evaluation
        self.loss = keras.metrics.Mean(name="loss")
        self.examples = keras.metrics.Sum(name="examples")
        self.task_metrics = task.make_metrics(evaluation=evaluation)
        self._all = [self.loss, *self.task_metrics, self.examples]

    def update(self, per_example_loss, labels, outputs, weights=None) -> None:
        if weights is None:
            weights = tf.ones_like(per_example_loss)
        self.loss.update_state(per_example_loss, sample_weight=weights)
        for metric in self.task_metrics:
            metric.update_state(labels, outputs, sample_weight=weights)
        self.examples.update_state(weights)

    def result(self) -> dict:
        """{"loss", each task metric by name, "examples"}: floats, a whole example count, and
        nested lists for metrics that are not scalars (a confusion matrix: integers)."""
        values = {"loss": float(self.loss.result())}
        for metric in self.task_metrics:
            values[metric.name] = _value(metric)
        values["examples"] = round(float(self.examples.result()))
        return values

    @property
    def variables(self) -> list:
        return [v for metric in self._all for v in metric.variables]

    def reset(self) -> None:
        for metric in self._all:
            metric.reset_state()


def _value(metric: keras.metrics.Metric):
    value = np.asarray(metric.result())
    if value.ndim == 0:
        return float(value)
    if isinstance(metric, ConfusionMatrix):
        return np.rint(value).astype(int).tolist()
    return value.astype(float).tolist()


def check_created_in_scope(strategy: tf.distribute.Strategy, variables, what: str) -> None:
    """Raises ValueError naming the first of `variables` not created under `strategy.scope()`."""
    for variable in variables:
        # A Keras variable wraps the tf.Variable the strategy made (`.value`); a tf.Variable is one.
        tf_variable = variable if isinstance(variable, tf.Variable) else variable.value
        if not strategy.extended.variable_created_in_scope(tf_variable):
            name = getattr(variable, "path", None) or variable.name
            raise ValueError(
                f"{what} variable {name!r} was created outside the scope of "
                f"{type(strategy).__name__}; create models, optimizers, metrics and step "
                "counters inside `with strategy.scope():`"
            )


NAN_POLICIES = ("stop", "skip_step")


class StepsResult(NamedTuple):
    """What one call of a TrainStep returns.

    `rows`: one row of the step's `log_columns` per logged step. `nonfinite`: the global steps
    whose loss or gradients held a NaN or Inf; their update was not applied.
    """

    rows: np.ndarray
    nonfinite: np.ndarray


class TrainStep:
    """One compiled training step for the model's trainable set at construction time.

    Forward: augment, backbone and head each called with the `train` row of `modes`. The loss
    is the per-example loss averaged over the global batch (`tf.nn.compute_average_loss`), plus
    the model's regularisation losses, so gradients do not depend on the replica count. With
    `features_in`, batches hold backbone features (the feature cache of a frozen phase) and
    only the head runs.

    With `jit_compile` on one replica, XLA compiles the whole step as one function:
    augmentation, mixing, forward, loss, gradients, the finiteness decision and, only when
    finite, the update (clipping, the optimizer, gradient accumulation, the moving averages,
    the training metrics); summaries and the logged rows stay outside. It falls back to
    compiling only the loss and gradients (augmentation, mixing and the update then run
    outside, where every op can) with several replicas (the optimizer's all-reduce is a
    merge_call XLA cannot hold) and when the whole step does not compile (an op with no XLA
    kernel: the image transform of RandomRotation, RandomTranslation and RandomZoom, MixUp's
    and CutMix's Beta draw); string inputs (a text backbone's tokenizer) get no XLA at all. The
    choice is made before any batch is read, by lowering the step to HLO for the iterator's
    `element_spec` (`choose_xla`; the first call makes it otherwise), and logged in one line;
    `xla_scope` ("step", "gradients", or None: no XLA) and `xla_reason` say which and why.
    Under whole-step XLA the random augmentation layers draw from XLA's random kernels: the
    same seeds give other (equally distributed) draws than without XLA, and the same ones
    again on a resume.

    Every `log_every_steps` steps (0: never) it writes scalars to the default summary writer
    and returns a row of `log_columns` (the step, its loss, the task's step metrics, the learning
    rate and the gradient norm); every `histogram_every_steps` steps, histograms of the
    trainable weights and their gradients (both of the global batch: with several replicas, a
    logged step reduces the gradients once more). The cadence is decided in the graph, on the
    step counter, so nothing retraces.

    The loss and metrics are the `task`'s (default: `Classification()`); its training loss may
    differ from the evaluation loss (label smoothing, class weights). With `grad_accum_steps`
    k > 1 the gradients of k consecutive batches are summed in per-replica accumulators and
    their mean is applied once (`accumulators` must be checkpointed with the optimizer);
    `apply_leftover` applies the mean of the fewer batches left at an epoch's end.
    `clip_grad_norm` > 0 clips the gradient of the global batch (summed over replicas first:
    each replica's own norm would clip the wrong thing).

    With `mixing` (MixUp/CutMix, see `tlloop.mixing`), each replica mixes its own batch after
    augmentation, drawn from (seed, global step, replica), and the loss is the mixed loss of
    the two labels; the training metrics compare the outputs with each example's own label.

    With a `penalty` (L2-SP, see `tlloop.anchors`), its terms of the weights the step starts
    from are added to the loss once per global step (each replica adds 1/replicas of them) and
    logged as columns of their own ("l2sp", "l2sp_head"); the "loss" column stays the task's.

    With `ema_decay` > 0 it keeps `averages`, exponential moving averages of the trainable
    weights (checkpoint them with the optimizer; `swap_averages` puts them in the model).

    A step whose loss or gradients hold a NaN or Inf on any replica applies no update and
    leaves the metrics alone (the decision is reduced over replicas, so all agree); the step
    still counts, since it consumed its batch. With `nan_policy` "stop" the call returns right
    after such a step; with "skip_step" it goes on.
    """

    def __init__(
        self,
        model: TransferModel,
        optimizer: keras.optimizers.Optimizer,
        modes: ModeTable,
        metrics: Metrics,
        global_step: tf.Variable,
        *,
        global_batch_size: int,
        jit_compile: bool = False,
        log_every_steps: int = 0,
        histogram_every_steps: int = 0,
        nan_policy: str = "stop",
        task: Task | None = None,
        clip_grad_norm: float = 0.0,
        grad_accum_steps: int = 1,
        features_in: bool = False,
        ema_decay: float = 0.0,
        mixing: Mixing | None = None,
        penalty: Penalty | None = None,
    ) -> None:
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy {nan_policy!r}; known: {', '.join(NAN_POLICIES)}")
        self.stop_on_nonfinite = nan_policy == "stop"
        self.model = model
        self.optimizer = optimizer
        self.modes = modes.row("train")
        self.metrics = metrics
        self.global_step = global_step
        self.global_batch_size = global_batch_size
        self.log_every_steps = log_every_steps
        self.histogram_every_steps = histogram_every_steps
        self.variables = list(model.trainable_variables)
        self.strategy = tf.distribute.get_strategy()
        if not self.variables:
            raise ValueError("nothing to train: the model has no trainable variables")
        self.task = task or Classification()
        self.penalty = penalty if penalty is not None and penalty.enabled else None
        if self.penalty is None:
            self.penalty = Penalty(model, [], None)  # no terms, no columns
        self.log_columns = (
            "step",
            "loss",
            *self.task.step_metrics,
            *self.penalty.columns,
            "learning_rate",
            "gradient_norm",
        )
        self.clip_grad_norm = clip_grad_norm
        self.grad_accum_steps = grad_accum_steps
        self.features_in = features_in
        self.mixing = mixing if mixing is not None and mixing.enabled else None
        if self.mixing and features_in:
            raise ValueError(
                "mixing: MixUp/CutMix mix images, not cached backbone features; accepted: "
                "features_in=False with mixing"
            )
        # float16: the loss is scaled up before the gradient and the optimizer scales back,
        # skipping (and lowering the scale) when the scaled gradients overflow.
        self.loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        # Exponential moving averages of the trainable weights, updated after every update:
        # a_t = decay * a_(t-1) + (1 - decay) * w_t, from a_0 = the weights at construction.
        self.ema_decay = ema_decay
        self.averages = (
            [
                tf.Variable(v, trainable=False, name="ema_" + v.name.replace("/", "_"))
                for v in self.variables
            ]
            if ema_decay
            else []
        )
        # Per-replica sums of the gradients of the batches since the last update, and their
        # count: state to checkpoint (a resumed run goes on with a half-full accumulation).
        self.accumulators = []
        if grad_accum_steps > 1:
            self.accumulated = tf.Variable(
                0,
                dtype=tf.int64,
                trainable=False,
                name="accumulated_batches",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
            self.accumulators = [self.accumulated] + [
                tf.Variable(
                    tf.zeros(v.shape, v.dtype),
                    trainable=False,
                    name="accumulated_gradient",
                    synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.SUM,
                )
                for v in self.variables
            ]
        check_created_in_scope(self.strategy, model.weights, "model")
        check_created_in_scope(self.strategy, optimizer.variables, "optimizer")
        check_created_in_scope(self.strategy, metrics.variables, "metric")
        check_created_in_scope(self.strategy, [global_step], "step counter")
        grads = self._loss_and_grads
        self._grads = tf.function(grads, jit_compile=True) if jit_compile else grads
        self._whole = tf.function(self._whole_step, jit_compile=True) if jit_compile else None
        self._decided = not jit_compile
        self._scope = None
        self._reason = _UNDECIDED if jit_compile else "jit_compile is off"
        self._loop = tf.function(self._run_loop)

    @property
    def xla_scope(self) -> str | None:
        """What XLA compiles: "step" (the whole step), "gradients" (the loss and gradients
        only) or None (nothing: jit_compile off, string inputs, or not decided yet; see
        `xla_reason`)."""
        return self._scope

    @property
    def xla_reason(self) -> str:
        """Why `xla_scope` is what it is, in one line (empty for the whole step)."""
        return self._reason

    def choose_xla(self, element_spec) -> str | None:
        """Decides, once and before any batch is read, what XLA compiles for batches of
        `element_spec` (an iterator's: (inputs, labels)): the whole step when one replica
        runs it and it lowers to HLO (nothing runs, no variable changes), else the loss and
        gradients; nothing for string inputs. Logs the choice in one line and returns
        `xla_scope`; later calls return it unchanged."""
        if self._decided:
            return self._scope
        self._decided = True
        replicas = self.strategy.num_replicas_in_sync
        if _holds_strings(element_spec):
            self._grads = self._loss_and_grads  # neither XLA function can take strings
            self._scope, self._reason = None, _STRINGS_REASON
            logging.warning("jit_compile: no XLA in the train step: %s", _STRINGS_REASON)
            return None
        if replicas > 1:
            self._fall_back(_REPLICAS_REASON.format(replicas=replicas))
            return self._scope
        inputs_spec, labels_spec = element_spec
        try:
            self.strategy.run(
                lambda: self._whole.experimental_get_compiler_ir(inputs_spec, labels_spec)(
                    stage="hlo"
                )
            )
        except Exception as error:  # any failure to trace or lower: the step that always works
            self._fall_back(_compile_failure(error), warn=True)
        else:
            self._scope, self._reason = "step", ""
            logging.info("jit_compile: XLA compiles the whole train step")
        return self._scope

    def _fall_back(self, reason: str, *, warn: bool = False) -> None:
        """XLA compiles the loss and gradients only; the reason logged in one line (a warning
        with `warn`: the whole step was meant to compile)."""
        self._scope, self._reason = "gradients", reason
        log = logging.warning if warn else logging.info
        log("jit_compile: XLA compiles only the loss and gradients: %s", reason)

    @property
    def traces(self) -> dict[str, int]:
        """How often the compiled parts were traced: "loop" (the whole call) and, with XLA,
        "xla" (the XLA function in use: the whole step, or the loss and gradients). One each
        per step object, whatever the step counts."""
        traces = {"loop": self._loop.experimental_get_tracing_count()}
        if self._scope == "step":
            traces["xla"] = self._whole.experimental_get_tracing_count()
        elif self._scope == "gradients":
            traces["xla"] = self._grads.experimental_get_tracing_count()
        return traces

    def matches(self, model: TransferModel) -> bool:
        """True while `model`'s trainable variables are exactly the ones this step updates."""
        current = model.trainable_variables
        return len(current) == len(self.variables) and all(
            a is b for a, b in zip(current, self.variables, strict=True)
        )

    def __call__(self, iterator, num_steps: int) -> StepsResult:
        """Runs `num_steps` steps on batches from `iterator`; the global step advances by that
        (by fewer only when nan_policy "stop" ended the call at a non-finite step)."""
        if not self._decided:
            self.choose_xla(iterator.element_spec)
        rows, nonfinite = self._loop(iterator, tf.constant(num_steps, tf.int32))
        return StepsResult(rows.numpy(), nonfinite.numpy())

    def _loss_and_grads(self, inputs, labels, mixed=None):
        with tf.GradientTape() as tape:
            if self.features_in:  # backbone features computed once (a frozen backbone)
                features = inputs
            else:
                features = self.model.backbone(inputs, training=self.modes.backbone)
            outputs = self.model.head(features, training=self.modes.head)
            if mixed is None:
                losses = self.task.train_loss(labels, outputs)
            else:
                losses = mixed_loss(self.task.train_loss, labels, outputs, mixed)
            loss = tf.nn.compute_average_loss(losses, global_batch_size=self.global_batch_size)
            if self.model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
            # L2-SP: once per global step, so each replica adds its 1/replicas share.
            penalties = self.penalty.terms()
            if penalties:
                loss += tf.nn.scale_regularization_loss(tf.add_n(penalties))
            if self.loss_scaled:
                loss = self.optimizer.scale_loss(loss)
        return tape.gradient(loss, self.variables), losses, outputs, penalties

    def _prepare(self, inputs):
        """Augments and mixes one replica's batch: (the inputs to train on, the mixing)."""
        if not self.features_in:
            inputs = self.model.augment(inputs, training=self.modes.augment)
        mixed = None
        if self.mixing is not None:
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            mixed = self.mixing.draw(inputs, self.global_step, replica)
            inputs = mixed.inputs
        return inputs, mixed

    def _finite(self, grads, losses):
        finite = tf.reduce_all(tf.math.is_finite(losses))
        if not self.loss_scaled:  # overflowing scaled gradients are the optimizer's to handle
            finite = tf.logical_and(
                finite, tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
            )
        return finite

    def _step_values(self, labels, losses, outputs, penalties) -> list:
        """This replica's shares of the global batch's mean loss and step metrics, and of the
        penalty terms (each the same on every replica)."""
        share = 1.0 / self.global_batch_size
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        return (
            [tf.reduce_sum(losses) * share]
            + [tf.reduce_sum(v) * share for v in self.task.step_values(labels, outputs).values()]
            + [term / replicas for term in penalties]
        )

    def _replica_gradients(self, inputs, labels):
        inputs, mixed = self._prepare(inputs)
        grads, losses, outputs, penalties = self._grads(inputs, labels, mixed)
        finite = self._finite(grads, losses)
        values = self._step_values(labels, losses, outputs, penalties)
        return values, grads, losses, outputs, 1.0 - tf.cast(finite, tf.float32)

    def _whole_step(self, inputs, labels):
        """One replica's whole step (compiled by XLA, one replica only): the gradients, and
        the update only when they and the loss are finite. Returns the step values, what the
        logging needs of the gradients (all of them with histograms, else their global norm
        when rows are logged) and 1.0 for a non-finite step (else 0.0)."""
        inputs, mixed = self._prepare(inputs)
        grads, losses, outputs, penalties = self._loss_and_grads(inputs, labels, mixed)
        finite = self._finite(grads, losses)
        if finite:
            self._apply(grads, labels, losses, outputs, per_replica=lambda fn, *args: fn(*args))
        if self.histogram_every_steps:
            logged = grads
        else:  # the norm only when rows are logged: 0 otherwise, never read
            logged = tf.linalg.global_norm(grads) if self.log_every_steps else tf.zeros([])
        values = self._step_values(labels, losses, outputs, penalties)
        return values, logged, 1.0 - tf.cast(finite, tf.float32)

    def _replica_apply(self, grads, labels, losses, outputs) -> None:
        self.metrics.update(losses, labels, outputs)
        self._update(grads)

    def _update(self, grads) -> None:
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
        self._update([tf.identity(a) / tf.cast(count, a.dtype) for a in sums])
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

    def _run_loop(self, iterator, num_steps):
        width = len(self.log_columns)
        rows = tf.TensorArray(tf.float32, size=0, dynamic_size=True, element_shape=(width,))
        nonfinite = tf.TensorArray(tf.int64, size=0, dynamic_size=True, element_shape=())
        whole = self._scope == "step"
        for _ in tf.range(num_steps):
            inputs, labels = next(iterator)
            # The rate this step's update uses (a schedule reads the optimizer's iterations).
            rate = tf.cast(self.optimizer.learning_rate, tf.float32)
            if whole:  # one replica: the update, when finite, happens inside the XLA step
                values, logged, bad = self.strategy.run(self._whole, args=(inputs, labels))
                finite = self._all_finite(bad)
                grads = logged if self.histogram_every_steps else None
                norm = None if self.histogram_every_steps else logged
            else:
                values, grads, losses, outputs, bad = self.strategy.run(
                    self._replica_gradients, args=(inputs, labels)
                )
                finite = self._all_finite(bad)
                norm = None
                if finite:
                    self._apply(grads, labels, losses, outputs)
            step = self.global_step.assign_add(1)
            if self.log_every_steps and step % self.log_every_steps == 0:
                row = self._log(step, values, self._norm(norm, grads), rate)
                rows = rows.write(rows.size(), row)
            if self.histogram_every_steps and step % self.histogram_every_steps == 0:
                self._histograms(step, grads)
            if not finite:
                nonfinite = nonfinite.write(nonfinite.size(), step)
                if self.stop_on_nonfinite:
                    break
        return rows.stack(), nonfinite.stack()

    def _all_finite(self, bad):
        """Whether no replica's step was non-finite (`bad`: 1.0 per replica that was).
        Decided in cross-replica context on the sum over replicas: every replica takes the same
        branch, and the optimizer's all-reduce (a merge_call) is never inside a replica-context
        cond, which tf.distribute does not support."""
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, bad, axis=None) == 0.0

    def _apply(self, grads, labels, losses, outputs, per_replica=None) -> None:
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

    def _log(self, step, values, norm, rate):
        """Writes the step's scalars and returns its row; `norm` is the global norm of the
        global batch's (scaled, under loss scaling) gradients."""
        batch = [self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in values]
        if self.loss_scaled:
            norm /= tf.cast(self.optimizer.dynamic_scale, tf.float32)
        row = [*batch, rate, norm]
        with _top_level_name_scope():
            for name, value in zip(self.log_columns[1:], row, strict=True):
                tf.summary.scalar(name, value, step=step)
        return tf.stack([tf.cast(step, tf.float32), *row])

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

    def _histograms(self, step, grads) -> None:
        grads = self._global_gradients(grads)
        with _top_level_name_scope():
            for variable, grad in zip(self.variables, grads, strict=True):
                tf.summary.histogram(f"weights/{variable.path}", variable, step=step)
                tf.summary.histogram(f"gradients/{variable.path}", grad, step=step)


@contextlib.contextmanager
def averaged(step: TrainStep | None):
    """The model holds `step`'s moving averages inside, its trained weights again after."""
    if step is None or not step.averages:
        yield
        return
    step.swap_averages()
    try:
        yield
    finally:
        step.swap_averages()


def _holds_strings(element_spec) -> bool:
    specs = tf.nest.flatten(element_spec, expand_composites=True)
    return any(getattr(spec, "dtype", None) == tf.string for spec in specs)


_UNDECIDED = "not decided yet: choose_xla() or the first call decides"
_STRINGS_REASON = (
    "the inputs are strings (a text backbone's tokenizer), which XLA cannot compile: the "
    "train step runs without XLA"
)
_REPLICAS_REASON = (
    "{replicas} replicas: the optimizer's cross-replica all-reduce is a merge_call, which XLA "
    "cannot compile; augmentation, mixing and the update run outside XLA"
)
# What the ops XLA has no kernel for belong to, for the reason logged.
_KNOWN_OPS = (
    ("ImageProjectiveTransform", "RandomRotation, RandomTranslation or RandomZoom"),
    ("StatelessRandomGamma", "MixUp's or CutMix's Beta draw"),
    ("String", "string preprocessing"),
    ("Regex", "string preprocessing"),
)


def _compile_failure(error: Exception) -> str:
    """The reason logged when the whole step does not compile: the ops XLA has no kernel for
    (and what in tlloop uses them), a merge_call, or the error's own line."""
    text = str(error)
    ops = sorted(set(re.findall(r"No registered '(\w+)' OpKernel for XLA", text)))
    if ops:
        users = sorted({user for op in ops for key, user in _KNOWN_OPS if key in op})
        used_by = f" (used by {'; '.join(users)})" if users else ""
        cause = f"XLA has no kernel for {', '.join(ops)}{used_by}"
    elif "merge_call" in text:
        cause = (
            "the strategy's replica context synchronises through a merge_call (the optimizer's "
            "all-reduce), which a compiled function cannot hold, even with one replica"
        )
    else:  # autograph's message ends with the error's own line, after the traceback
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        named = [line for line in lines if re.match(r"\w+(Error|Exception): ", line)]
        line = (named or lines or [type(error).__name__])[-1 if named else 0]
        cause = line if len(line) <= 300 else line[:297] + "..."
    return (
        f"the whole step does not compile: {cause}; augmentation, mixing and the update run "
        "outside XLA"
    )


def _top_level_name_scope():
    """A name scope at the top of the graph: summary tags take the current scope as a prefix,
    which inside the step's loop and conditions would be "while/cond/"."""
    return tf.compat.v1.get_default_graph().name_scope(None)


class EvalStep:
    """Evaluation over weighted batches, every submodule in inference mode.

    Batches are (inputs, labels, weights); padding examples have weight 0, so `metrics`
    counts each real example exactly once. The loss is the `task`'s evaluation loss. With
    `jit_compile`, XLA compiles the forward pass, unless the inputs are strings (a text
    backbone's tokenizer), which XLA cannot compile.
    """

    def __init__(
        self,
        model: TransferModel,
        modes: ModeTable,
        metrics: Metrics,
        *,
        jit_compile: bool = False,
        features_in: bool = False,
        task: Task | None = None,
    ) -> None:
        """With `features_in`, batches hold backbone features and only the head runs."""
        self.model = model
        self.task = task or Classification()
        self.features_in = features_in
        self.modes = modes.row("eval")
        self.metrics = metrics
        self.strategy = tf.distribute.get_strategy()
        check_created_in_scope(self.strategy, model.weights, "model")
        check_created_in_scope(self.strategy, metrics.variables, "metric")
        forward = self._forward
        self._outputs = tf.function(forward, jit_compile=True) if jit_compile else forward
        self._jit_compile = jit_compile
        self._loop = tf.function(self._run_loop)

    @property
    def traces(self) -> dict[str, int]:
        """How often the compiled loop was traced: once per step object."""
        return {"loop": self._loop.experimental_get_tracing_count()}

    def __call__(self, iterator, num_steps: int) -> None:
        """Evaluates `num_steps` batches from `iterator` into `metrics`."""
        if self._jit_compile and _holds_strings(iterator.element_spec):
            self._jit_compile, self._outputs = False, self._forward  # before the loop traces
        self._loop(iterator, tf.constant(num_steps, tf.int32))

    def _forward(self, inputs):
        if self.features_in:
            return self.model.head(inputs, training=self.modes.head)
        return self.model.forward(inputs, self.modes)

    def _replica_step(self, inputs, labels, weights) -> None:
        outputs = self._outputs(inputs)
        self.metrics.update(self.task.eval_loss(labels, outputs), labels, outputs, weights)

    def _run_loop(self, iterator, num_steps) -> None:
        for _ in tf.range(num_steps):
            self.strategy.run(self._replica_step, args=next(iterator))
