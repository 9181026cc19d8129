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

import keras
import tensorflow as tf

from tlloop.models import ModeTable, TransferModel


class Metrics:
    """Weighted mean loss, accuracy and example count; made under the strategy's scope.

    Keras 3 metric variables are sync-on-read: `update` runs in replica context, `result`
    must be read outside `strategy.run`.
    """

    def __init__(self) -> None:
        self.loss = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.examples = keras.metrics.Sum(name="examples")

    def update(self, per_example_loss, labels, logits, weights=None) -> None:
        if weights is None:
            weights = tf.ones_like(per_example_loss)
        self.loss.update_state(per_example_loss, sample_weight=weights)
        self.accuracy.update_state(labels, logits, sample_weight=weights)
        self.examples.update_state(weights)

    def result(self) -> dict[str, float]:
        return {
            "loss": float(self.loss.result()),
            "accuracy": float(self.accuracy.result()),
            "examples": round(float(self.examples.result())),
        }

    @property
    def variables(self) -> list:
        return [v for metric in (self.loss, self.accuracy, self.examples) for v in metric.variables]

    def reset(self) -> None:
        for metric in (self.loss, self.accuracy, self.examples):
            metric.reset_state()


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


class TrainStep:
    """One compiled training step for the model's trainable set at construction time.

    Forward: augment, backbone and head each called with the `train` row of `modes`. The loss
    is the per-example loss averaged over the global batch (`tf.nn.compute_average_loss`), plus
    the model's regularisation losses, so gradients do not depend on the replica count. With
    `jit_compile`, only the loss-and-gradient computation is compiled by XLA: augmentation
    layers (RandomRotation) and the update stay outside, where every op and device can run.
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
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.modes = modes.row("train")
        self.metrics = metrics
        self.global_step = global_step
        self.global_batch_size = global_batch_size
        self.variables = list(model.trainable_variables)
        self.strategy = tf.distribute.get_strategy()
        if not self.variables:
            raise ValueError("nothing to train: the model has no trainable variables")
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

    def __call__(self, iterator, num_steps: int) -> None:
        """Runs `num_steps` steps on batches from `iterator`; the global step advances by that."""
        self._loop(iterator, tf.constant(num_steps, tf.int32))

    def _loss_and_grads(self, images, labels):
        with tf.GradientTape() as tape:
            features = self.model.backbone(images, training=self.modes.backbone)
            logits = self.model.head(features, training=self.modes.head)
            losses = per_example_loss(labels, logits)
            loss = tf.nn.compute_average_loss(losses, global_batch_size=self.global_batch_size)
            if self.model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
        return tape.gradient(loss, self.variables), losses, logits

    def _replica_step(self, images, labels) -> None:
        images = self.model.augment(images, training=self.modes.augment)
        grads, losses, logits = self._grads(images, labels)
        self.optimizer.apply(grads, self.variables)
        self.metrics.update(losses, labels, logits)

    def _run_loop(self, iterator, num_steps) -> None:
        for _ in tf.range(num_steps):
            images, labels = next(iterator)
            self.strategy.run(self._replica_step, args=(images, labels))
            self.global_step.assign_add(1)


class EvalStep:
    """Evaluation over weighted batches, every submodule in inference mode.

    Batches are (images, labels, weights); padding examples have weight 0, so `metrics`
    counts each real example exactly once.
    """

    def __init__(
        self, model: TransferModel, modes: ModeTable, metrics: Metrics, *, jit_compile: bool = False
    ) -> None:
        self.model = model
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
        return self.model.forward(images, self.modes)

    def _replica_step(self, images, labels, weights) -> None:
        logits = self._logits(images)
        self.metrics.update(per_example_loss(labels, logits), labels, logits, weights)

    def _run_loop(self, iterator, num_steps) -> None:
        for _ in tf.range(num_steps):
            self.strategy.run(self._replica_step, args=next(iterator))
