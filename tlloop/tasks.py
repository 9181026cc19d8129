"""Tasks: what a model learns, given to the steps instead of written inside them.

A task says how a batch's labels and the model's outputs become a loss (one value per example:
the steps average it over the global batch themselves, so gradients do not depend on the replica
count), which Keras metrics describe the model, which per-example values are logged at each
logged step, what a served model returns, and the task's own TensorBoard views. Built in:
`Classification` (softmax cross-entropy on logits, accuracy, a confusion matrix in evaluation),
`MultiLabel` (a sigmoid per label, F1 at a threshold, PR-AUC, PR curves) and `Regression`
(standardised losses, errors in the targets' units, R^2, a predicted-vs-true scatter); `Task`
takes any Keras loss and metrics.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import keras
import numpy as np
import tensorflow as tf

from tlloop import summaries as summaries_lib
from tlloop.errors import ConfigError

if TYPE_CHECKING:
    from tlloop.config import BestMetric
    from tlloop.data.examples import Examples

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
    rank of one example's label (0 for a class index); informative only: whether a dataset is
    batched is decided from its inputs (`tlloop.data.examples.batching`). `mixable`: whether
    MixUp/CutMix may train it (the loss of mixed labels is the mix of the labels' losses: true
    of cross-entropy, not of a squared error). `best_metric`: (name, direction) of the metric
    the run keeps the best checkpoint of when `CheckpointConfig.best_metric` is "auto" (the
    default); the loss for a generic Task. Raises ValueError/TypeError naming the argument at
    fault.
    """

    mixable = True
    # (name, direction) of the metric `BestMetric("auto")` stands for with this task.
    best_metric = ("loss", "min")

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

    def checked_best_metric(self, metric: BestMetric) -> BestMetric:
        """`metric` for this task ("auto": the task's own `best_metric`). Raises ConfigError
        naming `best_metric` when the task's evaluation does not report it: the one check, made
        before anything is written, for the library and the command line alike."""
        resolved = metric.resolved(self.best_metric)
        known = ("loss", *self.metric_names)
        if resolved.name not in known:
            raise ConfigError(
                "best_metric",
                str(resolved),
                f"the task has no metric {resolved.name!r}",
                ", ".join(known),
            )
        return resolved

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

    def prepared(self, train: Examples) -> Task:
        """This task with anything that depends on the training examples resolved (e.g. class
        weights from `train.label_counts(num_classes)` and `train.size`); self if nothing
        does."""
        return self

    def write_summaries(self, summaries, metrics: Sequence[keras.metrics.Metric], step: int):
        """Writes this task's own TensorBoard views of an evaluation into `summaries` (a
        `tlloop.summaries.Summaries`) at `step`, from the evaluation's `metrics` objects
        (read after the evaluation, before the next reset); none by default."""


class Classification(Task):
    """Single-label classification: the model outputs logits (batch, classes), labels are class
    indices. Loss: softmax cross-entropy, with `label_smoothing` and per-class
    `class_weights` (an array, or "auto": N / (classes x count of the class) from the training
    data) in the training loss only. Metrics: accuracy (also logged per step) and, in
    evaluation with `num_classes` known, a confusion matrix (rows: labels). Serving:
    probabilities, the class id and its name from `class_names`. Best metric ("auto"):
    accuracy.
    """

    best_metric = ("accuracy", "max")

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

    def prepared(self, train: Examples) -> Classification:
        if not (isinstance(self.class_weights, str) and self.class_weights == "auto"):
            return self
        if not self.num_classes:
            raise ValueError("task: class_weights='auto' needs num_classes (or class_names)")
        counts = np.asarray(train.label_counts(self.num_classes), np.float64)
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


class MultiLabel(Task):
    """Multi-label classification: the model outputs one logit per label (batch, labels),
    labels are multi-hot (batch, labels) of 0/1. Loss: sigmoid binary cross-entropy, the mean
    over labels, with `label_smoothing` (towards 1/2) and per-label positive weights
    `class_weights` (an array of `num_labels`, or "auto": negatives / positives of each
    label in the training examples, what `positive_weights(train_labels)` gives) in the
    training loss only. Metrics: micro and macro F1 of the labels whose probability is over
    `threshold`, and the PR-AUC averaged over labels (`keras.metrics.AUC(curve="PR",
    multi_label=True)`). Serving: per-label probabilities, the multi-hot prediction and the
    names over the threshold joined by ";". Best metric ("auto"): micro_f1.
    Raises ValueError/TypeError naming the argument at fault.
    """

    best_metric = ("micro_f1", "max")

    def __init__(
        self,
        num_labels: int | None = None,
        *,
        threshold: float = 0.5,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | np.ndarray | None = None,
        class_names: Sequence[str] | None = None,
        metrics: Sequence[keras.metrics.Metric | str] = (),
    ) -> None:
        if class_names is not None and num_labels is None:
            num_labels = len(class_names)
        if not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(
                f"num_labels={num_labels!r}: accepted: an integer >= 1 (or class_names)"
            )
        if class_names is not None and len(class_names) != num_labels:
            raise ValueError(
                f"class_names: {len(class_names)} names for num_labels={num_labels}; accepted: "
                "one name per label"
            )
        if not 0 < threshold < 1:
            raise ValueError(f"threshold={threshold!r}: accepted: 0 < x < 1")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing={label_smoothing!r}: accepted: 0 <= x < 1")
        if isinstance(class_weights, str) and class_weights != "auto":
            raise ValueError(
                f"class_weights={class_weights!r}: accepted: 'auto' (negatives / positives per "
                "label in the training examples), an array of positive weights, or None"
            )
        if class_weights is not None and not isinstance(class_weights, str):
            class_weights = np.asarray(class_weights, np.float32)
            if class_weights.shape != (num_labels,) or not np.all(class_weights > 0):
                raise ValueError(
                    f"class_weights: shape {class_weights.shape}; accepted: {num_labels} "
                    "positive weights (one per label), or None"
                )
        super().__init__(
            _sigmoid_cross_entropy,
            [
                MultiLabelF1(num_labels, threshold, "micro", name="micro_f1"),
                MultiLabelF1(num_labels, threshold, "macro", name="macro_f1"),
                keras.metrics.AUC(
                    curve="PR",
                    multi_label=True,
                    num_labels=num_labels,
                    from_logits=True,
                    name="pr_auc",
                ),
                *metrics,
            ],
            step_metrics={"label_accuracy": functools.partial(_label_hits, threshold=threshold)},
            label_rank=1,
        )
        self.num_labels = num_labels
        self.threshold = float(threshold)
        self.label_smoothing = label_smoothing
        self.class_weights = class_weights
        self.class_names = tuple(class_names) if class_names is not None else None

    def prepared(self, train: Examples) -> MultiLabel:
        if not (isinstance(self.class_weights, str) and self.class_weights == "auto"):
            return self
        positives = np.asarray(train.label_counts(self.num_labels), np.float64)
        result = copy.copy(self)
        result.class_weights = _negatives_per_positive(positives, train.size)
        return result

    def eval_loss(self, labels, outputs):
        return _sigmoid_cross_entropy(labels, outputs)

    def train_loss(self, labels, outputs):
        labels = tf.cast(labels, tf.float32)
        if self.label_smoothing:
            labels = labels * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        weights = self.class_weights
        if weights is None:
            return _sigmoid_cross_entropy(labels, outputs)
        losses = tf.nn.weighted_cross_entropy_with_logits(
            labels, tf.cast(outputs, tf.float32), tf.constant(weights, tf.float32)
        )
        return tf.reduce_mean(losses, axis=-1)

    def write_summaries(self, summaries, metrics, step: int) -> None:
        """A precision-recall curve per label (TensorBoard's PR curves), from the counts at
        each threshold the PR-AUC metric kept over the whole evaluation."""
        auc = next((m for m in metrics if m.name == "pr_auc"), None)
        if auc is None:
            return
        counts = [
            np.asarray(v)
            for v in (
                auc.true_positives,
                auc.false_positives,
                auc.true_negatives,
                auc.false_negatives,
            )
        ]
        names = self.class_names or tuple(str(i) for i in range(self.num_labels))
        for label, name in enumerate(names):
            summaries.pr_curve("eval", name, *(c[:, label] for c in counts), step)

    def serving_outputs(self, outputs) -> dict:
        probabilities = tf.sigmoid(tf.cast(outputs, tf.float32))
        over = probabilities > self.threshold
        served = {"probabilities": probabilities, "predicted": tf.cast(over, tf.int32)}
        if self.class_names:
            names = tf.broadcast_to(tf.constant(list(self.class_names)), tf.shape(over))
            kept = tf.where(over, names, tf.zeros_like(names))
            # Names over the threshold joined by ";" (empty strings of the others dropped).
            served["labels"] = tf.strings.regex_replace(
                tf.strings.reduce_join(kept, axis=-1, separator=";"), r"^;+|;+$|(;);+", r"\1"
            )
        return served


def positive_weights(labels: np.ndarray) -> np.ndarray:
    """Per-label positive weights of multi-hot `labels` (N, L): negatives / positives of each
    label (a label with no positive counts as one), float32; what class_weights='auto' gives
    a `MultiLabel` task."""
    labels = np.asarray(labels, np.float64)
    if labels.ndim != 2:
        raise ValueError(f"labels: shape {labels.shape}; accepted: multi-hot labels (N, labels)")
    return _negatives_per_positive(labels.sum(axis=0), len(labels))


def _negatives_per_positive(positives: np.ndarray, count: int) -> np.ndarray:
    return ((count - positives) / np.maximum(positives, 1.0)).astype(np.float32)


class MultiLabelF1(keras.metrics.Metric):
    """F1 of multi-label predictions (probability over `threshold`) from weighted per-label
    true positive, false positive and false negative counts, summed over replicas when read.
    `average` "micro": F1 of the counts summed over labels; "macro": the mean of the labels'
    F1 (a label with no positive and no prediction counts as 0)."""

    def __init__(
        self,
        num_labels: int,
        threshold: float = 0.5,
        average: str = "micro",
        name: str = "f1",
        **kwargs,
    ) -> None:
        super().__init__(name=name, **kwargs)
        if average not in ("micro", "macro"):
            raise ValueError(f"average={average!r}: accepted: micro, macro")
        self.num_labels, self.threshold, self.average = num_labels, threshold, average
        self.counts = self.add_variable(
            shape=(3, num_labels), initializer="zeros", name="counts", aggregation="sum"
        )

    def update_state(self, labels, logits, sample_weight=None) -> None:
        labels = tf.cast(labels, tf.float32)
        predicted = tf.cast(tf.sigmoid(tf.cast(logits, tf.float32)) > self.threshold, tf.float32)
        weight = 1.0 if sample_weight is None else tf.cast(sample_weight, tf.float32)[:, None]
        counts = tf.stack(
            [
                tf.reduce_sum(weight * predicted * labels, axis=0),
                tf.reduce_sum(weight * predicted * (1.0 - labels), axis=0),
                tf.reduce_sum(weight * (1.0 - predicted) * labels, axis=0),
            ]
        )
        self.counts.assign_add(counts)

    def result(self):
        tp, fp, fn = tf.unstack(tf.convert_to_tensor(self.counts))
        if self.average == "micro":
            tp, fp, fn = tf.reduce_sum(tp), tf.reduce_sum(fp), tf.reduce_sum(fn)
            return tf.math.divide_no_nan(2.0 * tp, 2.0 * tp + fp + fn)
        return tf.reduce_mean(tf.math.divide_no_nan(2.0 * tp, 2.0 * tp + fp + fn))

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "num_labels": self.num_labels,
            "threshold": self.threshold,
            "average": self.average,
        }


def _sigmoid_cross_entropy(labels, logits):
    losses = tf.nn.sigmoid_cross_entropy_with_logits(
        tf.cast(labels, tf.float32), tf.cast(logits, tf.float32)
    )
    return tf.reduce_mean(losses, axis=-1)


def _label_hits(labels, logits, threshold: float):
    predicted = tf.sigmoid(tf.cast(logits, tf.float32)) > threshold
    hits = tf.cast(predicted == (tf.cast(labels, tf.float32) > 0.5), tf.float32)
    return tf.reduce_mean(hits, axis=-1)


REGRESSION_LOSSES = ("mse", "huber", "mae")


class Regression(Task):
    """Regression of `outputs` values per example: the model outputs (batch, outputs) in the
    targets' units, targets are (batch, outputs) floats. `targets` (the training targets,
    (N, outputs)) give each output's mean and standard deviation (or `scale`, (mean, std) as
    they gave it, e.g. a trained head's `Destandardize` values): `regression_head` stores
    them in the model (its last layer maps standardised values back to the targets' units,
    so the export predicts in those units), and the loss compares standardised values, so
    each output weighs the same whatever its units. Loss: "mse", "huber" (`huber_delta` in
    standard deviations) or "mae". Metrics: mean_absolute_error and root_mean_squared_error,
    in the targets' units, and r2 (`RegressionFit`, whose predicted-vs-true histogram is
    TensorBoard's scatter image per output). Serving: "predictions". Raises ValueError naming
    the argument. Best metric ("auto"): root_mean_squared_error, min.
    """

    best_metric = ("root_mean_squared_error", "min")
    mixable = False  # a squared error of a mixed target is not the mix of squared errors

    def __init__(
        self,
        outputs: int = 1,
        *,
        loss: str = "mse",
        targets: np.ndarray | None = None,
        scale: tuple[Sequence[float], Sequence[float]] | None = None,
        target_names: Sequence[str] | None = None,
        huber_delta: float = 1.0,
        metrics: Sequence[keras.metrics.Metric | str] = (),
    ) -> None:
        if not isinstance(outputs, int) or outputs < 1:
            raise ValueError(f"outputs={outputs!r}: accepted: an integer >= 1")
        if loss not in REGRESSION_LOSSES:
            raise ValueError(f"loss={loss!r}: unknown; accepted: {', '.join(REGRESSION_LOSSES)}")
        if huber_delta <= 0:
            raise ValueError(f"huber_delta={huber_delta!r}: accepted: > 0")
        if target_names is not None and len(target_names) != outputs:
            raise ValueError(
                f"target_names: {len(target_names)} names for outputs={outputs}; accepted: one "
                "name per output"
            )
        self.mean = np.zeros(outputs, np.float32)
        self.std = np.ones(outputs, np.float32)
        if scale is not None:
            if targets is not None:
                raise ValueError("scale: given with targets, which give it; accepted: one")
            mean, std = (np.asarray(v, np.float32).ravel() for v in scale)
            if mean.shape != (outputs,) or std.shape != (outputs,) or not np.all(std > 0):
                raise ValueError(f"scale: accepted: (mean, std), {outputs} values each, std > 0")
            self.mean, self.std = mean, std
        if targets is not None:
            values = np.asarray(targets, np.float64).reshape(len(targets), -1)
            if values.shape[1] != outputs or not len(values) or not np.all(np.isfinite(values)):
                raise ValueError(
                    f"targets: shape {np.shape(targets)}; accepted: finite training targets "
                    f"(N, {outputs})"
                )
            self.mean = values.mean(axis=0).astype(np.float32)
            # A constant output keeps scale 1: there is nothing to standardise.
            std = values.std(axis=0)
            self.std = np.where(std > 0, std, 1.0).astype(np.float32)
        super().__init__(
            loss,
            [
                MeanAbsoluteError(),
                RootMeanSquaredError(),
                RegressionFit(self.mean.tolist(), self.std.tolist()),
                *metrics,
            ],
            step_metrics={"mean_absolute_error": _absolute_error},
            label_rank=1,
        )
        self.outputs = outputs
        self.loss_kind = loss
        self.huber_delta = huber_delta
        self.target_names = tuple(target_names) if target_names is not None else None

    def eval_loss(self, labels, outputs):
        outputs = tf.cast(outputs, tf.float32)
        labels = tf.reshape(tf.cast(labels, tf.float32), tf.shape(outputs))
        # (target - prediction) / std: the loss of standardised targets (the mean cancels).
        scale = tf.constant(self.std, tf.float32)
        error = (labels - outputs) / scale
        if self.loss_kind == "mse":
            return tf.reduce_mean(tf.square(error), axis=-1)
        if self.loss_kind == "mae":
            return tf.reduce_mean(tf.abs(error), axis=-1)
        return keras.losses.huber(error, tf.zeros_like(error), delta=self.huber_delta)

    def serving_outputs(self, outputs) -> dict:
        return {"predictions": tf.cast(outputs, tf.float32)}

    def write_summaries(self, summaries, metrics, step: int) -> None:
        """A predicted-vs-true scatter image per output, from the `RegressionFit` histogram."""
        fit = next((m for m in metrics if isinstance(m, RegressionFit)), None)
        if fit is None:
            return
        histogram = np.asarray(fit.histogram)
        names = self.target_names or tuple(str(i) for i in range(self.outputs))
        for output, name in enumerate(names):
            pixels = summaries_lib.scatter_image(histogram[output])
            summaries.image("eval", f"predicted_vs_true/{name}", pixels, step)


def _matched(labels, outputs):
    outputs = tf.cast(outputs, tf.float32)
    return tf.reshape(tf.cast(labels, tf.float32), tf.shape(outputs)), outputs


def _absolute_error(labels, outputs):
    labels, outputs = _matched(labels, outputs)
    return tf.reduce_mean(tf.abs(labels - outputs), axis=-1)


def _squared_error(labels, outputs):
    labels, outputs = _matched(labels, outputs)
    return tf.reduce_mean(tf.square(labels - outputs), axis=-1)


class MeanAbsoluteError(keras.metrics.Mean):
    """Weighted mean over examples of the mean absolute error over outputs; targets of shape
    (batch,) count as (batch, 1)."""

    def __init__(self, name: str = "mean_absolute_error", **kwargs) -> None:
        super().__init__(name=name, **kwargs)

    def update_state(self, labels, outputs, sample_weight=None):
        return super().update_state(_absolute_error(labels, outputs), sample_weight)


class RootMeanSquaredError(keras.metrics.Mean):
    """The square root of the weighted mean over examples of the mean squared error over
    outputs; targets of shape (batch,) count as (batch, 1)."""

    def __init__(self, name: str = "root_mean_squared_error", **kwargs) -> None:
        super().__init__(name=name, **kwargs)

    def update_state(self, labels, outputs, sample_weight=None):
        return super().update_state(_squared_error(labels, outputs), sample_weight)

    def result(self):
        return tf.sqrt(super().result())


class RegressionFit(keras.metrics.Metric):
    """The coefficient of determination R^2 (1 - residual / total sum of squares, per output,
    then the mean over outputs; weighted), from sums of values standardised by `mean` and `std`
    (precise in float32 whatever the units). It also keeps a `bins` x `bins` histogram per
    output of (predicted, true) standardised values within +-`span` standard deviations
    (rows: predicted, from the top; columns: true), TensorBoard's predicted-vs-true scatter."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        bins: int = 48,
        span: float = 3.5,
        name: str = "r2",
        **kwargs,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        self.bins, self.span = bins, span
        outputs = len(self.mean)
        # Per output: sum of weights, of weighted targets, of their squares, of squared errors.
        self.sums = self.add_variable(
            shape=(4, outputs), initializer="zeros", name="sums", aggregation="sum"
        )
        self.histogram = self.add_variable(
            shape=(outputs, bins, bins), initializer="zeros", name="histogram", aggregation="sum"
        )

    def update_state(self, labels, outputs, sample_weight=None) -> None:
        labels, outputs = _matched(labels, outputs)
        mean, std = tf.constant(self.mean), tf.constant(self.std)
        true, predicted = (labels - mean) / std, (outputs - mean) / std
        if sample_weight is None:
            sample_weight = tf.ones(tf.shape(true)[:1])
        weight = tf.cast(sample_weight, tf.float32)[:, None] * tf.ones_like(true)
        self.sums.assign_add(
            tf.stack(
                [
                    tf.reduce_sum(weight, 0),
                    tf.reduce_sum(weight * true, 0),
                    tf.reduce_sum(weight * tf.square(true), 0),
                    tf.reduce_sum(weight * tf.square(true - predicted), 0),
                ]
            )
        )

        def cell(values):
            position = (values + self.span) / (2 * self.span) * self.bins
            return tf.cast(tf.clip_by_value(tf.floor(position), 0, self.bins - 1), tf.int32)

        output = tf.broadcast_to(tf.range(tf.shape(true)[1]), tf.shape(true))
        row = self.bins - 1 - cell(predicted)  # high predictions at the top of the image
        index = tf.reshape(tf.stack([output, row, cell(true)], axis=-1), (-1, 3))
        self.histogram.assign_add(
            tf.scatter_nd(index, tf.reshape(weight, (-1,)), tf.shape(self.histogram))
        )

    def result(self):
        count, total, squares, residual = tf.unstack(tf.convert_to_tensor(self.sums))
        spread = squares - tf.math.divide_no_nan(tf.square(total), count)
        return tf.reduce_mean(1.0 - tf.math.divide_no_nan(residual, spread))

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "mean": self.mean,
            "std": self.std,
            "bins": self.bins,
            "span": self.span,
        }
