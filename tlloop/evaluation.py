"""Evaluation and prediction of a model over whole datasets, in training and after it (the
library's `tlloop.evaluate` and `tlloop.predict`; evaluating a saved run from its flags is the
command line's, in `tlloop.cli.saved_run`)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tlloop.data.examples import as_examples
from tlloop.distribute import distribute_batches
from tlloop.models import INFERENCE, ModeTable, TransferModel
from tlloop.models.walk import declared_input_spec
from tlloop.steps import CompiledSteps, Metrics, compile_eval
from tlloop.tasks import Classification, Task


def evaluate_batches(eval_step: CompiledSteps, metrics: Metrics, batches, steps: int) -> dict:
    """Loss, the task's metrics and the example count (and the confusion matrix, if `metrics`
    keeps it) over the `steps` batches of `batches`, every submodule in inference mode."""
    metrics.reset()
    eval_step(iter(batches), steps)
    return metrics.result()


def evaluate_model(
    model: TransferModel,
    data,
    *,
    task: Task | None = None,
    batch_size: int = 32,
    strategy: tf.distribute.Strategy | None = None,
) -> dict:
    """The `task`'s loss and metrics (default: classification) of `model` over every example of
    `data` exactly once (arrays, a finite tf.data.Dataset or Examples; the last batch padded
    and masked), every submodule in inference mode, under `strategy` (default: the current)."""
    strategy = strategy or tf.distribute.get_strategy()
    task = task or Classification()
    examples = as_examples(data, argument="data", inputs=declared_input_spec(model.backbone))
    with strategy.scope():
        metrics = Metrics(task=task, evaluation=True)
        step = compile_eval(model, ModeTable(), metrics, task=task)
    batches = distribute_batches(
        strategy,
        lambda part: examples.eval_batches(batch_size, part),
        positionable=examples.positionable,
        batch_size=batch_size,
    )
    return evaluate_batches(step, metrics, batches, examples.eval_steps(batch_size))


def predict(model: TransferModel, inputs, *, batch_size: int = 32):
    """The model's outputs for `inputs` (an array or a structure of arrays, or a finite
    tf.data.Dataset of inputs), every submodule in inference mode, in batches of
    `batch_size`; returns numpy arrays in the structure of the outputs."""
    dataset = (
        inputs
        if isinstance(inputs, tf.data.Dataset)
        else tf.data.Dataset.from_tensor_slices(inputs)
    )
    forward = tf.function(lambda x: model.forward(x, INFERENCE))
    parts = [
        tf.nest.map_structure(np.asarray, forward(batch)) for batch in dataset.batch(batch_size)
    ]
    return tf.nest.map_structure(lambda *a: np.concatenate(a), *parts)
