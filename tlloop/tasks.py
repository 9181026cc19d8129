"""Tasks: what a model learns, given to the steps instead of written inside them.

A task says how a batch's labels and the model's outputs become a loss (one value per example:
the steps average it over the global batch themselves, so gradients do not depend on the replica
count), which Keras metrics describe the model, which per-example values are logged at each
logged step, and what a served model returns. `Classification` is the built-in one (softmax
cross-entropy on logits, accuracy, a confusion matrix in evaluation); `Task` takes any Keras loss
and metrics.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

# Names the steps' own metrics use: a task metric may not take them.
RESERVED_METRIC_NAMES = ("loss", "examples")


class Task:
    """A loss, metrics and serving outputs for the model's outputs (any structure).

    `loss`: a `keras.losses.Loss` (its reduction is ignored: the steps average the per-example
    values over the global batch), a loss name `keras.losses.get` knows, or a function
    `(labels, outputs) -> one value per example`. `metrics`: `keras.metrics.Metric` objects or
    names; they are templates, cloned fresh for training and for evaluation under the strategy's
    scope, and updated with `(labels, outputs, sample_weight)` exactly as Keras updates them.
    `step_metrics`: `{name: (labels, outputs) -> one value per example}`, averaged over the
    global batch of every logged step (Keras metrics are reported per epoch). `label_rank`: the
    rank of one example's label (0 for a class index), used to tell a batched dataset from an
    unbatched one. Raises ValueError/TypeError naming the argument at fault.
    """

    def __init__(
        self,
        loss: keras.losses.Loss | str | Callable,
        metrics: Sequence[keras.metrics.Metric | str] = (),
        *,
        step_metrics: Mapping[str, Callable] | None = None,
        label_rank: int = 0,
    ) -> None:
        self.loss_fn = _per_example_loss(loss)
        self.loss_name = getattr(loss, "name", None) or getattr(loss, "__name__", str(loss))
        self._metrics = [_metric(m) for m in metrics]
        self.step_metrics = dict(step_metrics or {})
        self.label_rank = label_rank
        names = [m.name for m in self._metrics] + list(self.step_metrics)
        clash = [n for n in names if n in RESERVED_METRIC_NAMES]
        if clash:
            raise ValueError(
                f"metrics: the name {clash[0]!r} is the steps' own; accepted: other metric names"
            )
        if len(set(m.name for m in self._metrics)) != len(self._metrics):
            raise ValueError("metrics: two metrics share a name; accepted: distinct names")

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The names of the metrics every evaluation reports (besides loss and examples)."""
        return tuple(m.name for m in self.make_metrics(evaluation=True))

    def make_metrics(self, *, evaluation: bool) -> list[keras.metrics.Metric]:
        """Fresh metric objects (call under the strategy's scope)."""
        return [_clone(m) for m in self._metrics]

    def train_loss(self, labels, outputs):
        """The loss the train step minimises, one float32 value per example."""
        return self.eval_loss(labels, outputs)

    def eval_loss(self, labels, outputs):
        """The loss evaluation reports, one float32 value per example."""
        values = tf.cast(self.loss_fn(labels, _float32(outputs)), tf.float32)
        if values.shape.rank != 1:
            raise TypeError(
                f"loss: {self.loss_name!r} gives values of shape {values.shape}, not one per "
                "example; accepted: a keras.losses.Loss, or a function returning shape (batch,)"
            )
        return values

    def step_values(self, labels, outputs) -> dict:
        """Per-example values of `step_metrics` for one batch, float32."""
        return {
            name: tf.cast(fn(labels, outputs), tf.float32) for name, fn in self.step_metrics.items()
        }

    def serving_outputs(self, outputs) -> dict:
        """What a served model returns for `outputs` (inference mode)."""
        return {"outputs": outputs}

    def prepared(self, label_counts: Callable[[int], np.ndarray]) -> Task:
        """This task with anything that depends on the training data resolved (e.g. class
        weights from `label_counts(num_classes)`, the examples per class); self if nothing
        does."""
        return self


class Classification(Task):
    """Single-label classification: the model outputs logits (batch, classes), labels are class
    indices. Loss: softmax cross-entropy, with `label_smoothing` and per-class
    `class_weights` (an array, or "auto": N / (classes x count of the class) from the training
    data) in the training loss only. Metrics: accuracy (also logged per step) and, in
    evaluation with `num_classes` known, a confusion matrix (rows: labels). Serving:
    probabilities, the class id and its name from `class_names`.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        *,
        label_smoothing: float = 0.0,
        class_weights: str | Sequence[float] | np.ndarray | None = None,
        class_names: Sequence[str] | None = None,
        metrics: Sequence[keras.metrics.Metric | str] = (),
    ) -> None:
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing={label_smoothing!r}: accepted: 0 <= x < 1")
        if isinstance(class_weights, str) and class_weights != "auto":
            raise ValueError(f"class_weights={class_weights!r}: accepted: 'auto', an array, None")
        if class_names is not None and num_classes is None:
            num_classes = len(class_names)
        super().__init__(
            "sparse_categorical_crossentropy",
            [keras.metrics.SparseCategoricalAccuracy(name="accuracy"), *metrics],
            step_metrics={"accuracy": _correct},
        )
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.class_weights = class_weights
        self.class_names = tuple(class_names) if class_names is not None else None

    def make_metrics(self, *, evaluation: bool) -> list[keras.metrics.Metric]:
        metrics = super().make_metrics(evaluation=evaluation)
        if evaluation and self.num_classes:
            metrics.append(ConfusionMatrix(self.num_classes))
        return metrics

    def eval_loss(self, labels, outputs):
        return keras.losses.sparse_categorical_crossentropy(
            labels, tf.cast(outputs, tf.float32), from_logits=True
        )

    def train_loss(self, labels, outputs):
        logits = tf.cast(outputs, tf.float32)
        if self.label_smoothing:
            losses = keras.losses.categorical_crossentropy(
                tf.one_hot(labels, tf.shape(logits)[-1]),
                logits,
                from_logits=True,
                label_smoothing=self.label_smoothing,
            )
        else:
            losses = self.eval_loss(labels, logits)
        if self.class_weights is not None:
            weights = tf.constant(np.asarray(self.class_weights, np.float32))
            losses *= tf.gather(weights, labels)
        return losses

    def prepared(self, label_counts: Callable[[int], np.ndarray]) -> Classification:
        if not (isinstance(self.class_weights, str) and self.class_weights == "auto"):
            return self
        if not self.num_classes:
            raise ValueError("task: class_weights='auto' needs num_classes (or class_names)")
        counts = np.asarray(label_counts(self.num_classes), np.float64)
        result = copy.copy(self)
        result.class_weights = balanced_class_weights(counts)
        return result

    def serving_outputs(self, outputs) -> dict:
        probabilities = tf.nn.softmax(tf.cast(outputs, tf.float32), axis=-1)
        class_id = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        served = {"probabilities": probabilities, "class_id": class_id}
        if self.class_names:
            served["class_name"] = tf.gather(tf.constant(list(self.class_names)), class_id)
        return served


def balanced_class_weights(counts: np.ndarray) -> np.ndarray:
    """N / (classes x count) per class (a class with no example counts as one), float32."""
    counts = np.asarray(counts, np.float64)
    return (counts.sum() / (len(counts) * np.maximum(counts, 1))).astype(np.float32)


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

    def get_config(self) -> dict:
        return {**super().get_config(), "num_classes": self.num_classes}


def _correct(labels, logits):
    predicted = tf.argmax(logits, -1, output_type=tf.int32)
    return tf.cast(predicted == tf.cast(labels, tf.int32), tf.float32)


def _float32(outputs):
    return tf.nest.map_structure(
        lambda t: tf.cast(t, tf.float32) if t.dtype.is_floating else t, outputs
    )


def _per_example_loss(loss) -> Callable:
    if isinstance(loss, keras.losses.Loss):
        # The steps reduce over the global batch themselves: keep Keras' own conversions and
        # masking, without its reduction.
        unreduced = copy.copy(loss)
        unreduced.reduction = None
        return unreduced
    if isinstance(loss, str):
        try:
            return keras.losses.get(loss)
        except ValueError:
            raise ValueError(
                f"loss={loss!r}: Keras knows no such loss; accepted: a keras.losses.Loss, a loss "
                "name, or a function (labels, outputs) -> one value per example"
            ) from None
    if callable(loss):
        return loss
    raise TypeError(
        f"loss: {type(loss).__name__} is not a loss; accepted: a keras.losses.Loss, a loss name, "
        "or a function (labels, outputs) -> one value per example"
    )


def _metric(metric) -> keras.metrics.Metric:
    if isinstance(metric, str):
        try:
            metric = keras.metrics.get(metric)
        except ValueError:
            raise ValueError(f"metrics: Keras knows no metric {metric!r}") from None
        if not isinstance(metric, keras.metrics.Metric):  # a function: wrap it as a mean
            metric = keras.metrics.MeanMetricWrapper(metric, name=metric.__name__)
    if not isinstance(metric, keras.metrics.Metric):
        raise TypeError(
            f"metrics: {type(metric).__name__} is not a keras.metrics.Metric; accepted: metric "
            "objects or names"
        )
    return metric


def _clone(metric: keras.metrics.Metric) -> keras.metrics.Metric:
    try:
        return type(metric).from_config(metric.get_config())
    except Exception as error:
        raise TypeError(
            f"metrics: {metric.name!r} ({type(metric).__name__}) cannot be cloned from its "
            f"get_config() ({error}); accepted: metrics whose get_config() holds every "
            "constructor argument"
        ) from None
