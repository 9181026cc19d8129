"""The metrics a run of steps fills, and the check that step state lives in the strategy."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

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
