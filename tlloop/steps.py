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

from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from tlloop.models import ModeTable, TransferModel


class Metrics:
    """Weighted mean loss, accuracy and example count; made under the strategy's scope.

    Keras 3 metric variables are sync-on-read: `update` runs in replica context, `result`
    must be read outside `strategy.run`.
    """

    def __init__(self, num_classes: int = 0) -> None:
        """With `num_classes` > 0, also a weighted confusion matrix (rows: labels)."""
        self.loss = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.examples = keras.metrics.Sum(name="examples")
        self.confusion = ConfusionMatrix(num_classes) if num_classes else None
        self._all = [m for m in (self.loss, self.accuracy, self.examples, self.confusion) if m]

    def update(self, per_example_loss, labels, logits, weights=None) -> None:
        if weights is None:
            weights = tf.ones_like(per_example_loss)
        self.loss.update_state(per_example_loss, sample_weight=weights)
        self.accuracy.update_state(labels, logits, sample_weight=weights)
        self.examples.update_state(weights)
        if self.confusion is not None:
            self.confusion.update_state(labels, logits, sample_weight=weights)

    def result(self) -> dict:
        """loss, accuracy, examples; and `confusion`, a nested list, when it is kept."""
        values = {
            "loss": float(self.loss.result()),
            "accuracy": float(self.accuracy.result()),
            "examples": round(float(self.examples.result())),
        }
        if self.confusion is not None:
            values["confusion"] = np.rint(np.asarray(self.confusion.result())).astype(int).tolist()
        return values

    @property
    def variables(self) -> list:
        return [v for metric in self._all for v in metric.variables]

    def reset(self) -> None:
        for metric in self._all:
            metric.reset_state()


class ConfusionMatrix(keras.metrics.Metric):
    """Weighted counts of (label, predicted class) pairs, summed over replicas when read."""

    def __init__(self, num_classes: int, name: str = "confusion", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.matrix = self.add_variable(
            shape=(num_classes, num_classes), initializer="zeros", name="matrix", aggregation="sum"
        )

    def update_state(self, labels, logits, sample_weight=None) -> None:
        predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
        counts = tf.math.confusion_matrix(
            tf.cast(labels, tf.int32),
            predictions,
            num_classes=self.num_classes,
            weights=sample_weight,
            dtype=self.matrix.dtype,
        )
        self.matrix.assign_add(counts)

    def result(self):
        return tf.convert_to_tensor(self.matrix)


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


def per_example_loss(labels, logits):
    """Sparse softmax cross-entropy on logits, one value per example, computed in float32."""
    return keras.losses.sparse_categorical_crossentropy(
        labels, tf.cast(logits, tf.float32), from_logits=True
    )


# Columns of the rows a train call returns, one row per logged step.
LOG_COLUMNS = ("step", "loss", "accuracy", "learning_rate", "gradient_norm")
NAN_POLICIES = ("stop", "skip_step")


class StepsResult(NamedTuple):
    """What one call of a TrainStep returns.

    `rows`: one row of LOG_COLUMNS per logged step. `nonfinite`: the global steps whose loss
    or gradients held a NaN or Inf; their update was not applied.
    """

    rows: np.ndarray
    nonfinite: np.ndarray


class TrainStep:
    """One compiled training step for the model's trainable set at construction time.

    Forward: augment, backbone and head each called with the `train` row of `modes`. The loss
    is the per-example loss averaged over the global batch (`tf.nn.compute_average_loss`), plus
    the model's regularisation losses, so gradients do not depend on the replica count. With
    `jit_compile`, only the loss-and-gradient computation is compiled by XLA: augmentation
    layers (RandomRotation), summaries and the update stay outside, where every op can run.
    With `features_in`, batches hold backbone features (the feature cache of a frozen phase)
    and only the head runs.

    Every `log_every_steps` steps (0: never) it writes scalars to the default summary writer
    and returns a row of `LOG_COLUMNS`; every `histogram_every_steps` steps, histograms of the
    trainable weights and their gradients (both of the global batch: with several replicas, a
    logged step reduces the gradients once more). The cadence is decided in the graph, on the
    step counter, so nothing retraces.

    The training loss may use `label_smoothing` and per-class `class_weights` (evaluation never
    does). With `grad_accum_steps` k > 1 the gradients of k consecutive batches are summed in
    per-replica accumulators and their mean is applied once (`accumulators` must be
    checkpointed with the optimizer). `clip_grad_norm` > 0 clips the gradient of the global
    batch (summed over replicas first: each replica's own norm would clip the wrong thing).

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
        label_smoothing: float = 0.0,
        class_weights=None,
        clip_grad_norm: float = 0.0,
        grad_accum_steps: int = 1,
        features_in: bool = False,
        ema_decay: float = 0.0,
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
        self.label_smoothing = label_smoothing
        self.class_weights = (
            None if class_weights is None else tf.constant(class_weights, tf.float32)
        )
        self.clip_grad_norm = clip_grad_norm
        self.grad_accum_steps = grad_accum_steps
        self.features_in = features_in
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
        self._loop = tf.function(self._run_loop)

    def matches(self, model: TransferModel) -> bool:
        """True while `model`'s trainable variables are exactly the ones this step updates."""
        current = model.trainable_variables
        return len(current) == len(self.variables) and all(
            a is b for a, b in zip(current, self.variables, strict=True)
        )

    def __call__(self, iterator, num_steps: int) -> StepsResult:
        """Runs `num_steps` steps on batches from `iterator`; the global step advances by that
        (by fewer only when nan_policy "stop" ended the call at a non-finite step)."""
        rows, nonfinite = self._loop(iterator, tf.constant(num_steps, tf.int32))
        return StepsResult(rows.numpy(), nonfinite.numpy())

    def _loss_and_grads(self, images, labels):
        with tf.GradientTape() as tape:
            if self.features_in:  # backbone features computed once (a frozen backbone)
                features = images
            else:
                features = self.model.backbone(images, training=self.modes.backbone)
            logits = self.model.head(features, training=self.modes.head)
            losses = self._training_loss(labels, logits)
            loss = tf.nn.compute_average_loss(losses, global_batch_size=self.global_batch_size)
            if self.model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
            if self.loss_scaled:
                loss = self.optimizer.scale_loss(loss)
        return tape.gradient(loss, self.variables), losses, logits

    def _replica_gradients(self, images, labels):
        if not self.features_in:
            images = self.model.augment(images, training=self.modes.augment)
        grads, losses, logits = self._grads(images, labels)
        correct = tf.cast(tf.argmax(logits, -1, output_type=labels.dtype) == labels, tf.float32)
        finite = tf.reduce_all(tf.math.is_finite(losses))
        if not self.loss_scaled:  # overflowing scaled gradients are the optimizer's to handle
            finite = tf.logical_and(
                finite, tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
            )
        # This replica's shares of the global batch's mean loss and accuracy.
        share = 1.0 / self.global_batch_size
        loss, accuracy = tf.reduce_sum(losses) * share, tf.reduce_sum(correct) * share
        return loss, accuracy, grads, losses, logits, 1.0 - tf.cast(finite, tf.float32)

    def _training_loss(self, labels, logits):
        if self.label_smoothing:
            one_hot = tf.one_hot(labels, tf.shape(logits)[-1])
            losses = keras.losses.categorical_crossentropy(
                one_hot,
                tf.cast(logits, tf.float32),
                from_logits=True,
                label_smoothing=self.label_smoothing,
            )
        else:
            losses = per_example_loss(labels, logits)
        if self.class_weights is not None:
            losses *= tf.gather(self.class_weights, labels)
        return losses

    def _replica_apply(self, grads, labels, losses, logits) -> None:
        self.metrics.update(losses, labels, logits)
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

    def _replica_accumulate(self, grads, labels, losses, logits) -> None:
        self.metrics.update(losses, labels, logits)
        for accumulator, grad in zip(self.accumulators[1:], grads, strict=True):
            accumulator.assign_add(grad)

    def _replica_apply_accumulated(self) -> None:
        sums = self.accumulators[1:]
        self._update([tf.identity(a) / self.grad_accum_steps for a in sums])
        for accumulator in sums:
            accumulator.assign(tf.zeros_like(accumulator))

    def _run_loop(self, iterator, num_steps):
        rows = tf.TensorArray(tf.float32, size=0, dynamic_size=True, element_shape=(5,))
        nonfinite = tf.TensorArray(tf.int64, size=0, dynamic_size=True, element_shape=())
        for _ in tf.range(num_steps):
            images, labels = next(iterator)
            loss, correct, grads, losses, logits, bad = self.strategy.run(
                self._replica_gradients, args=(images, labels)
            )
            # Decided in cross-replica context on the sum over replicas: every replica takes the
            # same branch, and the optimizer's all-reduce (a merge_call) is never inside a
            # replica-context cond, which tf.distribute does not support.
            finite = self.strategy.reduce(tf.distribute.ReduceOp.SUM, bad, axis=None) == 0.0
            # The rate this step's update uses (a schedule reads the optimizer's iterations).
            rate = tf.cast(self.optimizer.learning_rate, tf.float32)
            if finite:
                if self.grad_accum_steps == 1:
                    self.strategy.run(self._replica_apply, args=(grads, labels, losses, logits))
                    self._update_averages()
                else:
                    self.strategy.run(
                        self._replica_accumulate, args=(grads, labels, losses, logits)
                    )
                    count = self.accumulated.assign_add(1)
                    if count % self.grad_accum_steps == 0:
                        self.strategy.run(self._replica_apply_accumulated)
                        self._update_averages()
            step = self.global_step.assign_add(1)
            if self.log_every_steps and step % self.log_every_steps == 0:
                row = self._log(step, loss, correct, grads, rate)
                rows = rows.write(rows.size(), row)
            if self.histogram_every_steps and step % self.histogram_every_steps == 0:
                self._histograms(step, grads)
            if not finite:
                nonfinite = nonfinite.write(nonfinite.size(), step)
                if self.stop_on_nonfinite:
                    break
        return rows.stack(), nonfinite.stack()

    def _log(self, step, loss, correct, grads, rate):
        sum_ = tf.distribute.ReduceOp.SUM
        loss = self.strategy.reduce(sum_, loss, axis=None)
        accuracy = self.strategy.reduce(sum_, correct, axis=None)
        norm = tf.linalg.global_norm(self._global_gradients(grads))
        if self.loss_scaled:
            norm /= tf.cast(self.optimizer.dynamic_scale, tf.float32)
        values = {"loss": loss, "accuracy": accuracy, "learning_rate": rate, "gradient_norm": norm}
        with _top_level_name_scope():
            for name, value in values.items():
                tf.summary.scalar(name, value, step=step)
        return tf.stack([tf.cast(step, tf.float32), loss, accuracy, rate, norm])

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


def _top_level_name_scope():
    """A name scope at the top of the graph: summary tags take the current scope as a prefix,
    which inside the step's loop and conditions would be "while/cond/"."""
    return tf.compat.v1.get_default_graph().name_scope(None)


class EvalStep:
    """Evaluation over weighted batches, every submodule in inference mode.

    Batches are (images, labels, weights); padding examples have weight 0, so `metrics`
    counts each real example exactly once.
    """

    def __init__(
        self,
        model: TransferModel,
        modes: ModeTable,
        metrics: Metrics,
        *,
        jit_compile: bool = False,
        features_in: bool = False,
    ) -> None:
        """With `features_in`, batches hold backbone features and only the head runs."""
        self.model = model
        self.features_in = features_in
        self.modes = modes.row("eval")
        self.metrics = metrics
        self.strategy = tf.distribute.get_strategy()
        check_created_in_scope(self.strategy, model.weights, "model")
        check_created_in_scope(self.strategy, metrics.variables, "metric")
        forward = self._forward
        self._logits = tf.function(forward, jit_compile=True) if jit_compile else forward
        self._loop = tf.function(self._run_loop)

    def __call__(self, iterator, num_steps: int) -> None:
        """Evaluates `num_steps` batches from `iterator` into `metrics`."""
        self._loop(iterator, tf.constant(num_steps, tf.int32))

    def _forward(self, images):
        if self.features_in:
            return self.model.head(images, training=self.modes.head)
        return self.model.forward(images, self.modes)

    def _replica_step(self, images, labels, weights) -> None:
        logits = self._logits(images)
        self.metrics.update(per_example_loss(labels, logits), labels, logits, weights)

    def _run_loop(self, iterator, num_steps) -> None:
        for _ in tf.range(num_steps):
            self.strategy.run(self._replica_step, args=next(iterator))
