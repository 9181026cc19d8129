"""The loop over phases, epochs and steps; evaluation after every epoch; the run's outputs.

`build_experiment` does everything that can fail on bad input (data, backbone, phase plan)
before anything is written; `train` then runs the plan into a prepared workdir. Every piece of
state is created under the strategy's scope. In a multi-worker cluster every task runs the same
loop (the collectives need all of them) and only the chief writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import threading
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tlloop import checkpoints as checkpoint_lib
from tlloop import phases as phase_lib
from tlloop.config import RunConfig
from tlloop.data import Data, load_data
from tlloop.distribute import cluster_task, describe, is_chief
from tlloop.export import export_model
from tlloop.models import TransferModel, build_model
from tlloop.optim import make_optimizer
from tlloop.steps import LOG_COLUMNS, EvalStep, Metrics, TrainStep
from tlloop.summaries import Summaries, confusion_image, confusion_text, image_grid
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
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    data = load_data(config.data)
    with strategy.scope():
        model = build_model(config.model, data.num_classes, seed=config.seed)
    plan = phase_lib.plan_phases(config.phases, model)
    return Experiment(config, strategy, data, model, plan)


class Stopped(Exception):
    """Raised when training stopped on request (`stop` set), after saving a checkpoint."""


def train(
    experiment: Experiment,
    workdir: str,
    flags_text: str = "",
    stop: threading.Event | None = None,
) -> dict:
    """Runs every phase, evaluating after each epoch; the chief exports and writes results.json.

    If WORKDIR/checkpoints holds a checkpoint, the run resumes from it: same phase, next step,
    the batch it would have seen next. Returns the results: per phase, its steps, time and
    last train and eval metrics; and a SHA-256 of the final weights, which every task logs
    (equal on all tasks of a cluster). Summaries are flushed at every evaluation and closed on
    the way out, whatever ends the run. When `stop` is set, training ends after the step under
    way with a checkpoint and raises `Stopped`; KeyboardInterrupt also saves one first.
    """
    strategy = experiment.strategy
    chief = is_chief(strategy)
    logging.info("strategy: %s", describe(strategy))
    directory = os.path.join(workdir, "checkpoints")
    resume_from = checkpoint_lib.latest(directory)
    start = checkpoint_lib.position(resume_from) if resume_from else (0, 0)
    if resume_from:
        phases = len(experiment.phases)
        where = f"phase {start[0] + 1} of {phases}" if start[0] < phases else "finished run"
        logging.info("resuming from %s: %s, step %d", resume_from, where, start[1])
    checkpoints = checkpoint_lib.Checkpoints(
        directory, keep=experiment.config.checkpoint.keep, chief=chief
    )
    if resume_from:
        checkpoints.check(resume_from, experiment.model)
    summaries = Summaries(workdir, enabled=chief and experiment.config.logging.summaries)
    summaries.start_session(start[1])
    # Outside the strategy's scope: the same on every task, and a distributed string variable
    # cannot be broadcast by MultiWorkerMirroredStrategy.
    state = checkpoint_lib.RunState()
    try:
        with strategy.scope():
            results = _train_in_scope(
                experiment,
                workdir,
                summaries,
                flags_text,
                chief,
                checkpoints,
                resume_from,
                start,
                stop,
                state,
            )
    finally:
        summaries.close()
    logging.info("final weights sha256: %s", results["weights_sha256"])
    if chief:
        results["export"] = export_model(experiment.model, os.path.join(workdir, "export"))
        write_json(os.path.join(workdir, "results.json"), results)
    return results


def hparams_of(config: RunConfig) -> dict:
    """The run's hyperparameters as flat str/int/float/bool values, for the HParams dashboard."""
    return {
        "dataset": config.data.dataset,
        "classes": ",".join(config.data.classes) or "all",
        "train_examples_per_class": config.data.train_examples_per_class,
        "image_size": config.data.image_size,
        "batch_size": config.data.batch_size,
        "backbone": config.model.backbone,
        "weights": config.model.weights or "default",
        "dropout": config.model.dropout,
        "augment": ",".join(f"{op.name}:{op.factor:g}" for op in config.model.augment) or "none",
        **{f"{p.name}_epochs": p.epochs for p in config.phases},
        **{f"{p.name}_lr": p.learning_rate for p in config.phases},
        "unfreeze": str(config.phases[-1].unfreeze),
        "bn_mode": config.phases[-1].bn_mode,
        "strategy": config.distribute.strategy,
        "jit_compile": config.jit_compile,
        "seed": config.seed,
    }


def _train_in_scope(
    experiment: Experiment,
    workdir: str,
    summaries: Summaries,
    flags_text: str,
    chief: bool,
    checkpoints: checkpoint_lib.Checkpoints,
    resume_from: str | None,
    start: tuple[int, int],
    stop: threading.Event | None,
    state: checkpoint_lib.RunState,
) -> dict:
    config, data, model, strategy = (
        experiment.config,
        experiment.data,
        experiment.model,
        experiment.strategy,
    )
    log_config = config.logging
    global_step = tf.Variable(
        0,
        dtype=tf.int64,
        trainable=False,
        name="global_step",
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )
    train_metrics, eval_metrics = Metrics(), Metrics(data.num_classes)
    eval_step = EvalStep(
        model, experiment.phases[0].modes, eval_metrics, jit_compile=config.jit_compile
    )
    # The input position is the global step: one batch per step, from one seeded stream.
    train_batches = iter(_distribute(strategy, data.train.skip(start[1])))
    eval_batches = _distribute(strategy, data.eval)
    saver = _Saver(
        checkpoints, config, global_step, single_host=cluster_task(strategy) is None, stop=stop
    )
    profiler = _Profiler(log_config.profile_steps, os.path.join(workdir, "tensorboard", "train"))
    if not resume_from:
        summaries.hparams(hparams_of(config), trial=os.path.basename(os.path.abspath(workdir)))
        if flags_text:
            summaries.text("flags", "```\n" + flags_text + "```", 0)
    results = {
        "class_names": list(data.class_names),
        "train_size": data.train_size,
        "eval_size": data.eval_size,
        "replicas": strategy.num_replicas_in_sync,
        "phases": [],
    }
    with summaries.default("train"), _save_when_stopped(saver):
        for phase in experiment.phases[start[0] :]:
            step_now = int(global_step.numpy())
            phase_lib.apply_trainability(model, phase)
            # BatchNorm that uses batch statistics must see the global batch, not a replica's.
            phase_lib.synchronize_batch_norm(
                model, phase.modes.train.backbone and strategy.num_replicas_in_sync > 1
            )
            report = phase_lib.trainability_report(model, phase)
            logging.info("mode table:\n%s", phase.modes.to_text())
            logging.info("trainability:\n%s", report)
            summaries.text("mode_table", phase.modes.to_text(), step_now)
            summaries.text("trainability", report, step_now)
            summaries.scalars("train", {"phase": phase.index + 1}, step_now)
            inputs = model.augment(data.preview, training=phase.modes.train.augment)
            summaries.image("train", "augmented_inputs", image_grid(np.asarray(inputs)), step_now)
            optimizer = make_optimizer(phase.config, model.trainable_variables)
            train_step = TrainStep(
                model,
                optimizer,
                phase.modes,
                train_metrics,
                global_step,
                global_batch_size=config.data.batch_size,
                jit_compile=config.jit_compile,
                log_every_steps=log_config.log_every_steps,
                histogram_every_steps=log_config.histogram_every_steps,
            )
            checkpoints.track(
                model=model,
                optimizer=optimizer,
                step=global_step,
                state=state,
                metrics=train_metrics.variables,
                rng=checkpoint_lib.rng_states(model),
            )
            if resume_from:
                checkpoints.restore(resume_from)
                results["phases"] = state.finished_phases()
                resume_from = None
                if len(results["phases"]) > phase.index:
                    continue  # the checkpoint was this phase's last
            else:
                state.phase.assign(phase.index)
                state.phase_start.assign(global_step)
                saver.save()
            done = int(global_step.numpy() - state.phase_start.numpy())
            first_epoch, offset = divmod(done, data.steps_per_epoch)
            started = time.perf_counter()
            train_result = eval_result = None
            for epoch in range(first_epoch, phase.config.epochs):
                # A stale compiled step would silently keep updating an old trainable set.
                if not train_step.matches(model):
                    raise RuntimeError("the trainable set changed under a compiled train step")
                if not offset:
                    train_metrics.reset()  # a resumed epoch goes on with its restored metrics
                progress = keras.utils.Progbar(
                    data.steps_per_epoch,
                    verbose=1 if chief and not log_config.quiet else 0,
                    stateful_metrics=["examples/s"],
                )
                seconds = _run_epoch(
                    train_step,
                    train_batches,
                    data.steps_per_epoch - offset,
                    config,
                    phase,
                    profiler,
                    summaries,
                    progress,
                    saver,
                )
                offset = 0
                train_result = train_metrics.result()
                eval_result = evaluate(eval_step, eval_metrics, eval_batches, data.eval_steps)
                step_now = int(global_step.numpy())
                _write_epoch(summaries, phase, epoch, step_now, train_result, eval_result, data)
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
            if eval_result is None:  # resumed after the phase's last step, before its end
                train_result = train_metrics.result()
                eval_result = evaluate(eval_step, eval_metrics, eval_batches, data.eval_steps)
            summaries.flush()
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
            state.record(results["phases"])
            saver.save()  # the end of the phase
    state.phase.assign(len(experiment.phases))
    if resume_from:  # the checkpoint was of a finished run: only its results are needed
        checkpoints.track(model=model, step=global_step, state=state)
        checkpoints.restore(resume_from)
        results["phases"] = state.finished_phases()
    else:
        saver.save()
    profiler.stop()
    results["weights_sha256"] = weights_digest(model)
    return results


def _run_epoch(step, batches, count, config, phase, profiler, summaries, progress, saver) -> float:
    """Runs `count` steps in calls of up to --steps_per_loop; returns their seconds.

    Calls end where the profiler or a step-count checkpoint needs the host.
    """
    done, seconds = 0, 0.0
    while done < count:
        current = int(step.global_step.numpy())
        profiler.at(current)
        chunk = min(count - done, config.steps_per_loop)
        chunk = saver.limit(current, profiler.limit(current, chunk))
        started = time.perf_counter()
        rows = step(batches, chunk)
        elapsed = time.perf_counter() - started
        done, seconds = done + chunk, seconds + elapsed
        speed = {
            "examples_per_second": config.data.batch_size * chunk / elapsed,
            "step_time_ms": 1000.0 * elapsed / chunk,
        }
        for row in rows:
            values = dict(zip(LOG_COLUMNS, (float(v) for v in row), strict=True))
            logged_step = int(values.pop("step"))
            summaries.scalars("train", speed, logged_step)
            summaries.record("train", logged_step, {"phase": phase.name, **values, **speed})
        shown = (
            [("loss", float(rows[-1][1])), ("accuracy", float(rows[-1][2]))] if len(rows) else []
        )
        progress.update(done, values=[*shown, ("examples/s", speed["examples_per_second"])])
        saver.maybe_save()
        if saver.stop is not None and saver.stop.is_set():
            raise Stopped()
    profiler.at(int(step.global_step.numpy()))
    return seconds


def _write_epoch(summaries, phase, epoch, step, train_result, eval_result, data) -> None:
    summaries.scalars(
        "train",
        {"epoch/loss": train_result["loss"], "epoch/accuracy": train_result["accuracy"]},
        step,
    )
    summaries.scalars(
        "eval", {"loss": eval_result["loss"], "accuracy": eval_result["accuracy"]}, step
    )
    summaries.image("eval", "confusion_matrix", confusion_image(eval_result["confusion"]), step)
    summaries.text(
        "confusion_matrix", confusion_text(eval_result["confusion"], data.class_names), step
    )
    summaries.record("eval", step, {"phase": phase.name, "epoch": epoch + 1, **eval_result})
    summaries.flush()


class _Saver:
    """Saves checkpoints every --checkpoint_every_steps and every --checkpoint_every_secs."""

    def __init__(
        self,
        checkpoints,
        config: RunConfig,
        global_step,
        *,
        single_host: bool,
        stop: threading.Event | None = None,
    ) -> None:
        self.checkpoints = checkpoints
        self.every_steps = config.checkpoint.every_steps
        # Tasks of a cluster must save together, and their clocks do not agree.
        self.every_secs = config.checkpoint.every_secs if single_host else 0.0
        self.global_step = global_step
        self.last = time.monotonic()
        self.stop = stop  # set by the entry point on SIGTERM

    def limit(self, step: int, chunk: int) -> int:
        """`chunk` cut so that a call ends on a checkpoint step."""
        if self.every_steps:
            chunk = min(chunk, self.every_steps - step % self.every_steps)
        return chunk

    def maybe_save(self) -> None:
        step = int(self.global_step.numpy())
        due_by_steps = self.every_steps and step % self.every_steps == 0
        due_by_time = self.every_secs and time.monotonic() - self.last >= self.every_secs
        if due_by_steps or due_by_time:
            self.save()

    def save(self) -> None:
        step = int(self.global_step.numpy())
        self.checkpoints.save(step)
        self.last = time.monotonic()
        logging.info("checkpoint saved at step %d", step)


@contextlib.contextmanager
def _save_when_stopped(saver: _Saver):
    """Saves a checkpoint at the current step when the run is stopped (Stopped, SIGINT).

    Both arrive between host calls, so the state saved is that of whole steps.
    """
    try:
        yield
    except (Stopped, KeyboardInterrupt):
        saver.save()
        raise


class _Profiler:
    """Traces global steps START..END with the TensorFlow profiler, on loop boundaries."""

    def __init__(self, steps: tuple[int, ...], logdir: str) -> None:
        self.first, self.last = steps if steps else (0, -1)
        self.logdir = logdir
        self.running = False

    def limit(self, step: int, chunk: int) -> int:
        """`chunk` cut so that a call ends where the trace starts or stops."""
        for boundary in (self.first - 1, self.last):
            if step < boundary:
                chunk = min(chunk, boundary - step)
        return chunk

    def at(self, step: int) -> None:
        """Starts or stops the trace when `step` (the steps done so far) calls for it."""
        if not self.running and self.first - 1 <= step < self.last:
            tf.profiler.experimental.start(self.logdir)
            self.running = True
        elif self.running and step >= self.last:
            self.stop()

    def stop(self) -> None:
        if self.running:
            tf.profiler.experimental.stop()
            self.running = False


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
