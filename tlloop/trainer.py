"""The loop over phases, epochs and steps; evaluation after every epoch; the run's outputs.

`build_experiment` does everything that can fail on bad input (data, backbone, phase plan)
before anything is written; `train` then runs the plan into a prepared workdir.
"""

from __future__ import annotations

import dataclasses
import os
import time

import keras
import tensorflow as tf
from absl import logging

from tlloop import phases as phase_lib
from tlloop.config import RunConfig
from tlloop.data import Data, load_data
from tlloop.export import export_model
from tlloop.models import TransferModel, build_model
from tlloop.optim import make_optimizer
from tlloop.steps import EvalStep, Metrics, TrainStep
from tlloop.summaries import Summaries
from tlloop.workdir import write_json


@dataclasses.dataclass
class Experiment:
    """A run ready to train: its config, data, model and phase plan."""

    config: RunConfig
    data: Data
    model: TransferModel
    phases: list[phase_lib.Phase]


def build_experiment(config: RunConfig) -> Experiment:
    """Seeds, loads data, builds the model and plans the phases; writes nothing.

    Raises ConfigError (naming the flag or file) on bad input.
    """
    keras.utils.set_random_seed(config.seed)
    data = load_data(config.data)
    with tf.distribute.get_strategy().scope():
        model = build_model(config.model, data.num_classes, seed=config.seed)
    plan = phase_lib.plan_phases(config.phases, model)
    return Experiment(config, data, model, plan)


def train(experiment: Experiment, workdir: str) -> dict:
    """Runs every phase, evaluating after each epoch; exports the model and writes results.json.

    Returns the results written: per phase, its steps, time and last train and eval metrics.
    """
    config, data, model = experiment.config, experiment.data, experiment.model
    strategy = tf.distribute.get_strategy()
    summaries = Summaries(os.path.join(workdir, "tensorboard"))
    with strategy.scope():
        global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        train_metrics, eval_metrics = Metrics(), Metrics()
    eval_step = EvalStep(
        model, experiment.phases[0].modes, eval_metrics, jit_compile=config.jit_compile
    )
    train_batches = iter(data.train)
    results = {
        "class_names": list(data.class_names),
        "train_size": data.train_size,
        "eval_size": data.eval_size,
        "phases": [],
    }
    try:
        for phase in experiment.phases:
            phase_lib.apply_trainability(model, phase)
            report = phase_lib.trainability_report(model, phase)
            logging.info("mode table:\n%s", phase.modes.to_text())
            logging.info("trainability:\n%s", report)
            step_now = int(global_step.numpy())
            summaries.text("mode_table", phase.modes.to_text(), step_now)
            summaries.text("trainability", report, step_now)
            with strategy.scope():
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
                eval_result = evaluate(eval_step, eval_metrics, data)
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
        results["export"] = export_model(model, os.path.join(workdir, "export"))
        write_json(os.path.join(workdir, "results.json"), results)
    finally:
        summaries.close()
    return results


def evaluate(eval_step: EvalStep, metrics: Metrics, data: Data) -> dict:
    """Loss, accuracy and example count over the whole evaluation set."""
    metrics.reset()
    eval_step(iter(data.eval), data.eval_steps)
    return metrics.result()


def _run_steps(step: TrainStep, batches, count: int, steps_per_loop: int) -> None:
    while count > 0:
        chunk = min(count, steps_per_loop)
        step(batches, chunk)
        count -= chunk
