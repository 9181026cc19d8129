"""One replica's training step body: forward with the mode table, the task's loss, gradients
and their finiteness. It changes no state: the update (`tlloop.steps.update`) applies what it
computes, and `tlloop.steps.compiled` decides what of it XLA compiles."""

from __future__ import annotations

import keras
import tensorflow as tf

from tlloop.anchors import Penalty
from tlloop.mixing import Mixing, mixed_loss
from tlloop.models import ModeTable, TransferModel
from tlloop.tasks import Classification, Task


class TrainBody:
    """The forward pass, loss and gradients of one replica's batch, for the model's trainable
    set when it is made (`variables`).

    Forward: augment, backbone and head each called with the `train` row of `modes`. The loss
    is the per-example loss averaged over the global batch (`tf.nn.compute_average_loss`), plus
    the model's regularisation losses, so gradients do not depend on the replica count. With
    `features_in`, batches hold backbone features (the feature cache of a frozen phase) and
    only the head runs. With `mixing` (MixUp/CutMix, see `tlloop.mixing`), each replica mixes
    its own batch after augmentation, drawn from (seed, `global_step`, replica), and the loss
    is the mixed loss of the two labels. With a `penalty` (L2-SP, see `tlloop.anchors`), its
    terms of the current weights are added once per global step (each replica adds
    1/replicas of them). Under loss scaling (`optimizer` a LossScaleOptimizer) the loss is
    scaled before the gradient and overflowing gradients are the optimizer's to skip.
    """

    def __init__(
        self,
        model: TransferModel,
        modes: ModeTable,
        optimizer: keras.optimizers.Optimizer,
        global_step: tf.Variable,
        *,
        global_batch_size: int,
        task: Task | None = None,
        features_in: bool = False,
        mixing: Mixing | None = None,
        penalty: Penalty | None = None,
    ) -> None:
        self.model = model
        self.modes = modes.row("train")
        self.optimizer = optimizer
        self.global_step = global_step
        self.global_batch_size = global_batch_size
        self.variables = list(model.trainable_variables)
        if not self.variables:
            raise ValueError("nothing to train: the model has no trainable variables")
        self.task = task or Classification()
        self.features_in = features_in
        self.penalty = penalty if penalty is not None and penalty.enabled else None
        if self.penalty is None:
            self.penalty = Penalty(model, [], None)  # no terms, no columns
        self.mixing = mixing if mixing is not None and mixing.enabled else None
        if self.mixing and features_in:
            raise ValueError(
                "mixing: MixUp/CutMix mix images, not cached backbone features; accepted: "
                "features_in=False with mixing"
            )
        # float16: the loss is scaled up before the gradient and the optimizer scales back,
        # skipping (and lowering the scale) when the scaled gradients overflow.
        self.loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def prepare(self, inputs):
        """Augments and mixes one replica's batch: (the inputs to train on, the mixing)."""
        if not self.features_in:
            inputs = self.model.augment(inputs, training=self.modes.augment)
        mixed = None
        if self.mixing is not None:
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            mixed = self.mixing.draw(inputs, self.global_step, replica)
            inputs = mixed.inputs
        return inputs, mixed

    def gradients(self, inputs, labels, mixed=None):
        """(the gradients of `variables`, the per-example losses, the outputs, the penalty
        terms) of prepared `inputs`."""
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

    def finite(self, grads, losses):
        """Whether this replica's losses and (without loss scaling) gradients are finite."""
        finite = tf.reduce_all(tf.math.is_finite(losses))
        if not self.loss_scaled:  # overflowing scaled gradients are the optimizer's to handle
            finite = tf.logical_and(
                finite, tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
            )
        return finite

    def step_values(self, labels, losses, outputs, penalties) -> list:
        """This replica's shares of the global batch's mean loss and step metrics, and of the
        penalty terms (each the same on every replica)."""
        share = 1.0 / self.global_batch_size
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        return (
            [tf.reduce_sum(losses) * share]
            + [tf.reduce_sum(v) * share for v in self.task.step_values(labels, outputs).values()]
            + [term / replicas for term in penalties]
        )

    @property
    def value_columns(self) -> tuple[str, ...]:
        """The names of `step_values`: the loss, the task's step metrics, the penalty terms."""
        return ("loss", *self.task.step_metrics, *self.penalty.columns)
