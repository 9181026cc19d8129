"""The loop over phases, epochs and steps; evaluation after every epoch; the run's outputs.

`build_experiment` does everything that can fail on bad input (data, backbone, phase plan)
before anything is written; `train` then runs the plan into a prepared workdir. Every piece of
state is created under the strategy's scope. In a multi-worker cluster every task runs the same
loop (the collectives need all of them) and only the chief writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tlloop import phases as phase_lib
from tlloop.config import RunConfig
from tlloop.data import Data, load_data
from tlloop.distribute import describe, is_chief
from tlloop.export import export_model
from tlloop.models import TransferModel, build_model
from tlloop.optim import make_optimizer
from tlloop.steps import EvalStep, Metrics, TrainStep
from tlloop.summaries import Summaries
from tlloop.workdir import write_json


@dataclasses.dataclass
class Experiment:
    """A run ready to train: its config, strategy, data, model and phase plan."""

    config: RunConfig
    strategy: tf.distribute.Strategy
    data: Data
    model: TransferModel
    phases: list[phase_lib.Phase]


def build_experiment(
    config: RunConfig, strategy: tf.distribute.Strategy | None = None
) -> Experiment:
    """Seeds, loads data, builds the model under `strategy` and plans the phases; writes nothing.

    Raises ConfigError (naming the flag or file) on bad input.
    """
    strategy = strategy or tf.distribute.get_strategy()
    keras.utils.set_random_seed(config.seed)
    data = load_data(config.data)
    with strategy.scope():
        model = build_model(config.model, data.num_classes, seed=config.seed)
    plan = phase_lib.plan_phases(config.phases, model)
    return Experiment(config, strategy, data, model, plan)


def train(experiment: Experiment, workdir: str) -> dict:
    """Runs every phase, evaluating after each epoch; the chief exports and writes results.json.

    Returns the results: per phase, its steps, time and last train and eval metrics; and a
    SHA-256 of the final weights, which every task logs (equal on all tasks of a cluster).
    """
    strategy = experiment.strategy
    chief = is_chief(strategy)
    logging.info("strategy: %s", describe(strategy))
    with strategy.scope():
        results = _train_in_scope(experiment, workdir, chief)
    logging.info("final weights sha256: %s", results["weights_sha256"])
    if chief:
        results["export"] = export_model(experiment.model, os.path.join(workdir, "export"))
        write_json(os.path.join(workdir, "results.json"), results)
    return results


def _train_in_scope(experiment: Experiment, workdir: str, chief: bool) -> dict:
    config, data, model, strategy = (
        experiment.config,
        experiment.data,
        experiment.model,
        experiment.strategy,
    )
    summaries = Summaries(os.path.join(workdir, "tensorboard"), enabled=chief)
    global_step = tf.Variable(
        0,
        dtype=tf.int64,
        trainable=False,
        name="global_step",
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )
    train_metrics, eval_metrics = Metrics(), Metrics()
    eval_step = EvalStep(
        model, experiment.phases[0].modes, eval_metrics, jit_compile=config.jit_compile
    )
    train_batches = iter(_distribute(strategy, data.train))
    eval_batches = _distribute(strategy, data.eval)
    results = {
        "class_names": list(data.class_names),
        "train_size": data.train_size,
        "eval_size": data.eval_size,
        "replicas": strategy.num_replicas_in_sync,
        "phases": [],
    }
    try:
        for phase in experiment.phases:
            phase_lib.apply_trainability(model, phase)
            # BatchNorm that uses batch statistics must see the global batch, not a replica's.
            phase_lib.synchronize_batch_norm(
                model, phase.modes.train.backbone and strategy.num_replicas_in_sync > 1
            )
            report = phase_lib.trainability_report(model, phase)
            logging.info("mode table:\n%s", phase.modes.to_text())
            logging.info("trainability:\n%s", report)
            step_now = int(global_step.numpy())
            summaries.text("mode_table", phase.modes.to_text(), step_now)
            summaries.text("trainability", report, step_now)
            optimizer = make_optimizer(phase.config, model.trainable_variables)
            train_step = TrainStep(
                model,
                optimizer,
                phase.modes,
                train_metrics,
                global_step,
                global_batch_size=config.data.batch_size,
                jit_compile=config.jit_compile,
            )
            started = time.perf_counter()
            for epoch in range(phase.config.epochs):
                # A stale compiled step would silently keep updating an old trainable set.
                if not train_step.matches(model):
                    raise RuntimeError("the trainable set changed under a compiled train step")
                train_metrics.reset()
                epoch_start = time.perf_counter()
                _run_steps(train_step, train_batches, data.steps_per_epoch, config.steps_per_loop)
                seconds = time.perf_counter() - epoch_start
                train_result = train_metrics.result()
                eval_result = evaluate(eval_step, eval_metrics, eval_batches, data.eval_steps)
                step_now = int(global_step.numpy())
                summaries.scalars(
                    "train",
                    {
                        "loss": train_result["loss"],
                        "accuracy": train_result["accuracy"],
                        "learning_rate": phase.config.learning_rate,
                        "phase": phase.index + 1,
                        "examples_per_second": train_result["examples"] / seconds,
                    },
                    step_now,
                )
                summaries.scalars(
                    "eval",
                    {"loss": eval_result["loss"], "accuracy": eval_result["accuracy"]},
                    step_now,
                )
                summaries.flush()
                logging.info(
                    "%s epoch %d/%d step %d: train loss %.4f acc %.4f | eval loss %.4f acc %.4f "
                    "(%d examples) | %.1f s",
                    phase.name,
                    epoch + 1,
                    phase.config.epochs,
                    step_now,
                    train_result["loss"],
                    train_result["accuracy"],
                    eval_result["loss"],
                    eval_result["accuracy"],
                    eval_result["examples"],
                    seconds,
                )
            results["phases"].append(
                {
                    "name": phase.name,
                    "epochs": phase.config.epochs,
                    "last_step": int(global_step.numpy()),
                    "seconds": round(time.perf_counter() - started, 3),
                    "train": train_result,
                    "eval": eval_result,
                }
            )
    finally:
        summaries.close()
    results["weights_sha256"] = weights_digest(model)
    return results


def evaluate(eval_step: EvalStep, metrics: Metrics, batches, steps: int) -> dict:
    """Loss, accuracy and example count over the whole evaluation set."""
    metrics.reset()
    eval_step(iter(batches), steps)
    return metrics.result()


def weights_digest(model: keras.Model) -> str:
    """SHA-256 of every weight (RNG states excluded), in order: equal iff the weights are."""
    digest = hashlib.sha256()
    for variable in model.weights:
        if "seed_generator" not in variable.path:
            digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()


def _distribute(strategy: tf.distribute.Strategy, dataset: tf.data.Dataset):
    # Every task builds the same dataset from the same seed; DATA sharding splits each global
    # batch between the tasks, so a cluster sees the same global batches as one device.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def _run_steps(step: TrainStep, batches, count: int, steps_per_loop: int) -> None:
    while count > 0:
        chunk = min(count, steps_per_loop)
        step(batches, chunk)
        count -= chunk
