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
from tlloop import feature_cache
from tlloop import phases as phase_lib
from tlloop.config import RunConfig
from tlloop.data import Data, load_data
from tlloop.distribute import cluster_task, describe, is_chief
from tlloop.errors import RunFailed
from tlloop.evaluation import evaluate
from tlloop.export import export_model
from tlloop.models import TransferModel, build_model
from tlloop.optim import make_optimizer
from tlloop.steps import LOG_COLUMNS, EvalStep, Metrics, TrainStep
from tlloop.summaries import Summaries, confusion_image, confusion_text, image_grid
from tlloop.warm_start import WarmStartReport, warm_start
from tlloop.workdir import write_json


@dataclasses.dataclass
class Experiment:
    """A run ready to train: its config, strategy, data, model and phase plan."""

    config: RunConfig
    strategy: tf.distribute.Strategy
    data: Data
    model: TransferModel
    phases: list[phase_lib.Phase]
    warm_start: WarmStartReport | None = None


def build_experiment(
    config: RunConfig, strategy: tf.distribute.Strategy | None = None
) -> Experiment:
    """Seeds, loads data, builds the model under `strategy` (warm-started from
    --init_checkpoint if given) and plans the phases; writes nothing.

    Raises ConfigError (naming the flag or file) on bad input.
    """
    strategy = strategy or tf.distribute.get_strategy()
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    data = load_data(config.data)
    with strategy.scope():
        model = build_model(config.model, data.num_classes, seed=config.seed)
    report = None
    if config.model.init_checkpoint:
        report = warm_start(model.backbone, config.model.init_checkpoint)
        logging.info("%s", report.to_text())
    plan = phase_lib.plan_phases(config.phases, model)
    return Experiment(config, strategy, data, model, plan, report)


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
    the batch it would have seen next. Every evaluation is checked against --best_metric; the
    best one's weights are kept in WORKDIR/checkpoints/best and exported at the end (or the last
    weights, with --export=last). Returns the results: per phase, its steps, time and last train
    and eval metrics; the best evaluation; and a SHA-256 of the final weights, which every task
    logs (equal on all tasks of a cluster). Summaries are flushed at every evaluation and closed
    on the way out, whatever ends the run. When `stop` is set, training ends after the step
    under way with a checkpoint and raises `Stopped`; KeyboardInterrupt also saves one first.
    Raises RunFailed (the last checkpoint intact) on a NaN/Inf step under --nan_policy=stop and
    when a checkpoint or the export cannot be written.
    """
    strategy = experiment.strategy
    config = experiment.config
    chief = is_chief(strategy)
    logging.info("strategy: %s", describe(strategy))
    directory = os.path.join(workdir, "checkpoints")
    resume_from = checkpoint_lib.latest(directory)
    start = checkpoint_lib.position(resume_from) if resume_from else (0, 0)
    if resume_from:
        phases = len(experiment.phases)
        where = f"phase {start[0] + 1} of {phases}" if start[0] < phases else "finished run"
        logging.info("resuming from %s: %s, step %d", resume_from, where, start[1])
        if experiment.warm_start:
            logging.info("resuming: the run's own checkpoint replaces the warm-started weights")
    checkpoints = checkpoint_lib.Checkpoints(directory, keep=config.checkpoint.keep, chief=chief)
    if resume_from:
        checkpoints.check(resume_from, experiment.model)
    best = checkpoint_lib.Checkpoints(
        os.path.join(directory, checkpoint_lib.BEST), keep=1, chief=chief
    )
    summaries = Summaries(workdir, enabled=chief and config.logging.summaries)
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
                best,
                resume_from,
                start,
                stop,
                state,
            )
    finally:
        summaries.close()
    logging.info("final weights sha256: %s", results["weights_sha256"])
    if chief:
        results["export"] = _export(experiment, best, results, os.path.join(workdir, "export"))
        write_json(os.path.join(workdir, "results.json"), results)
    return results


def _export(experiment: Experiment, best, results: dict, directory: str) -> dict:
    """Exports the best evaluation's weights (or the last, per --export); returns what it did."""
    model = experiment.model
    exported = {"weights": "last", "step": results["phases"][-1]["last_step"]}
    best_path = checkpoint_lib.latest(best.directory)
    if best_path:
        # The file is the truth: after a non-deterministic resume it may hold an evaluation
        # the run's state never saw.
        results["best"].update(
            step=int(tf.train.load_variable(best_path, "step/.ATTRIBUTES/VARIABLE_VALUE")),
            value=float(tf.train.load_variable(best_path, "value/.ATTRIBUTES/VARIABLE_VALUE")),
        )
    if experiment.config.checkpoint.export == "best" and best_path:
        tf.train.Checkpoint(model=model).restore(best_path).expect_partial()
        exported = {"weights": "best", "step": results["best"]["step"]}
    try:
        paths = export_model(
            model, directory, experiment.data.class_names, experiment.config.data.resize
        )
    except (OSError, tf.errors.OpError) as error:
        raise RunFailed(
            f"export to {directory!r} failed ({getattr(error, 'strerror', None) or error}); the "
            "checkpoints are intact; accepted: free space and write access, then the same "
            "command exports again"
        ) from None
    logging.info("exported the %s weights (step %d) to %s", *exported.values(), directory)
    return {**exported, **paths}


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
    best: checkpoint_lib.Checkpoints,
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
    eval_batches = _distribute(strategy, data.eval)
    feature_eval_step = None  # made when a phase first trains on cached features
    images = _ImageStream(strategy, data.train)
    saver = _Saver(
        checkpoints, config, global_step, single_host=cluster_task(strategy) is None, stop=stop
    )
    tracker = _BestTracker(config.checkpoint.best_metric, state, best, model, global_step)
    profiler = _Profiler(log_config.profile_steps, os.path.join(workdir, "tensorboard", "train"))
    if not resume_from:
        summaries.hparams(hparams_of(config), trial=os.path.basename(os.path.abspath(workdir)))
        if flags_text:
            summaries.text("flags", "```\n" + flags_text + "```", 0)
        if experiment.warm_start:
            summaries.text("init_checkpoint", experiment.warm_start.to_text(), 0)
    results = {
        "class_names": list(data.class_names),
        "train_size": data.train_size,
        "eval_size": data.eval_size,
        "skipped_images": list(data.skipped_files),
        "replicas": strategy.num_replicas_in_sync,
        "init_checkpoint": dataclasses.asdict(experiment.warm_start)
        if experiment.warm_start
        else None,
        "phases": [],
    }
    patience = config.checkpoint.early_stopping_patience
    last_step = None
    with summaries.default("train"), _save_when_stopped(saver):
        for phase in experiment.phases[start[0] :]:
            step_now = int(global_step.numpy())
            # A gradual unfreeze resumes in the stage its checkpoint was saved in.
            stage = 0
            if resume_from and phase.config.gradual:
                done = start[1] - checkpoint_lib.phase_start(resume_from)
                stage = max(done - 1, 0) // data.steps_per_epoch
            phase_lib.apply_trainability(model, phase, stage)
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
            use_cache, cache_reason = feature_cache.decide(
                config.feature_cache,
                backbone_frozen=phase.config.unfreeze.kind == "none",
                augmenting=bool(config.model.augment) and phase.modes.train.augment,
                model=model,
                data=data,
            )

            def make_step(phase=phase, use_cache=use_cache) -> TrainStep:
                """A fresh optimizer and compiled step for the current trainable set, and the
                checkpoint tracking them."""
                optimizer = _phase_optimizer(config, phase, model, data.steps_per_epoch)
                step = TrainStep(
                    model,
                    optimizer,
                    phase.modes,
                    train_metrics,
                    global_step,
                    global_batch_size=config.data.batch_size,
                    jit_compile=config.jit_compile,
                    log_every_steps=log_config.log_every_steps,
                    histogram_every_steps=log_config.histogram_every_steps,
                    nan_policy=config.nan_policy,
                    label_smoothing=config.training.label_smoothing,
                    class_weights=_class_weights(config, data),
                    clip_grad_norm=config.training.clip_grad_norm,
                    grad_accum_steps=config.training.grad_accum_steps,
                    features_in=use_cache,
                    ema_decay=config.training.ema_decay,
                )
                checkpoints.track(
                    model=model,
                    optimizer=optimizer,
                    accumulators=step.accumulators,
                    averages=step.averages,
                    step=global_step,
                    state=state,
                    metrics=train_metrics.variables,
                    rng=checkpoint_lib.rng_states(model),
                )
                return step

            train_step = last_step = make_step()
            if resume_from:
                checkpoints.restore(resume_from)
                results["phases"] = state.finished_phases()
                resume_from = None
                if len(results["phases"]) > phase.index:
                    continue  # the checkpoint was this phase's last
            else:
                state.start_phase(phase.index, int(global_step.numpy()))
                saver.save()
            # The input position is the global step: one batch per step, from one seeded
            # stream of images, or of their features (which line up batch for batch).
            phase_eval = (eval_step, eval_batches)
            if use_cache:
                cached = feature_cache.compute(model, data)
                train_batches = iter(
                    _distribute(strategy, data.stream(cached.train).skip(global_step.numpy()))
                )
                feature_eval_step = feature_eval_step or EvalStep(
                    model,
                    phase.modes,
                    eval_metrics,
                    jit_compile=config.jit_compile,
                    features_in=True,
                )
                phase_eval = (feature_eval_step, _distribute(strategy, cached.eval))
                cache_reason += f"; computed in {cached.seconds:.2f} s"
            else:
                train_batches = images.at(int(global_step.numpy()))
            logging.info("%s phase feature cache: %s", phase.name, cache_reason)
            done = int(global_step.numpy() - state.phase_start.numpy())
            first_epoch, offset = divmod(done, data.steps_per_epoch)
            if (
                done
                and not offset
                and int(state.evaluated_step.numpy()) != done + int(state.phase_start.numpy())
            ):
                # Resumed after an epoch's last step but before its evaluation: evaluate it.
                first_epoch, offset = first_epoch - 1, data.steps_per_epoch
            started = time.perf_counter()
            train_result = eval_result = None
            stopped_early = False
            for epoch in range(first_epoch, phase.config.epochs):
                if phase.config.gradual:  # the next stage: more layers train
                    phase_lib.apply_trainability(model, phase, epoch)
                    if not train_step.matches(model):
                        train_step = last_step = make_step()
                        logging.info(
                            "gradual unfreeze, epoch %d:\n%s",
                            epoch + 1,
                            phase_lib.trainability_report(model, phase),
                        )
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
                    state,
                )
                offset = 0
                train_result = train_metrics.result()
                step_now = int(global_step.numpy())
                with _averaged(train_step):  # the moving averages, with --ema_decay
                    eval_result = evaluate(
                        phase_eval[0], eval_metrics, phase_eval[1], data.eval_steps
                    )
                    is_best = tracker.update(eval_result)
                state.evaluated_step.assign(step_now)
                _write_epoch(summaries, phase, epoch, step_now, train_result, eval_result, data)
                logging.info(
                    "%s epoch %d/%d step %d: train loss %.4f acc %.4f | eval loss %.4f acc %.4f "
                    "(%d examples)%s | %.1f s",
                    phase.name,
                    epoch + 1,
                    phase.config.epochs,
                    step_now,
                    train_result["loss"],
                    train_result["accuracy"],
                    eval_result["loss"],
                    eval_result["accuracy"],
                    eval_result["examples"],
                    " | best so far" if is_best else "",
                    seconds,
                )
                if patience and int(state.since_phase_best.numpy()) >= patience:
                    logging.info(
                        "%s phase stopped early at epoch %d: %d evaluations without a better "
                        "%s (--early_stopping_patience=%d)",
                        phase.name,
                        epoch + 1,
                        patience,
                        config.checkpoint.best_metric,
                        patience,
                    )
                    stopped_early = True
                    break
            if not use_cache:
                images.ran_to(int(global_step.numpy()))
            if eval_result is None:  # resumed after the phase's evaluated last step
                train_result = train_metrics.result()
                with _averaged(train_step):
                    eval_result = evaluate(
                        phase_eval[0], eval_metrics, phase_eval[1], data.eval_steps
                    )
            summaries.flush()
            results["phases"].append(
                {
                    "name": phase.name,
                    "epochs": phase.config.epochs,
                    "stopped_early": stopped_early,
                    "feature_cache": cache_reason,
                    "last_step": int(global_step.numpy()),
                    "seconds": round(time.perf_counter() - started, 3),
                    "train": train_result,
                    "eval": eval_result,
                }
            )
            state.record(results["phases"])
            saver.save()  # the end of the phase
    state.phase.assign(len(experiment.phases))
    if not resume_from and last_step.averages:
        # From here on the model holds the averaged weights: the final checkpoint, the digest
        # and the export (--export=last) are of those.
        last_step.swap_averages()
    if resume_from:  # the checkpoint was of a finished run: only its results are needed
        checkpoints.track(model=model, step=global_step, state=state)
        checkpoints.restore(resume_from)
        results["phases"] = state.finished_phases()
    else:
        saver.save()
    profiler.stop()
    results["best"] = tracker.summary()
    results["nonfinite_steps_skipped"] = int(state.nonfinite_steps.numpy())
    results["weights_sha256"] = weights_digest(model)
    return results


def _run_epoch(
    step, batches, count, config, phase, profiler, summaries, progress, saver, state
) -> float:
    """Runs `count` steps in calls of up to --steps_per_loop; returns their seconds.

    Calls end where the profiler or a step-count checkpoint needs the host. A NaN/Inf step
    raises RunFailed under --nan_policy=stop (before any checkpoint is saved after it) and is
    counted and logged under skip_step.
    """
    done, seconds = 0, 0.0
    while done < count:
        current = int(step.global_step.numpy())
        profiler.at(current)
        chunk = min(count - done, config.steps_per_loop)
        chunk = saver.limit(current, profiler.limit(current, chunk))
        started = time.perf_counter()
        rows, nonfinite = step(batches, chunk)
        elapsed = time.perf_counter() - started
        if len(nonfinite) and config.nan_policy == "stop":
            last = checkpoint_lib.latest(saver.checkpoints.directory)
            raise RunFailed(
                f"--nan_policy=stop: the loss or a gradient is NaN or Inf at step "
                f"{int(nonfinite[0])} ({phase.name} phase); no update was applied and the last "
                f"checkpoint ({last}) is intact; accepted: a lower --{phase.name}_lr, clean "
                "data, or --nan_policy=skip_step to skip such steps"
            )
        if len(nonfinite):
            state.nonfinite_steps.assign_add(len(nonfinite))
            logging.warning(
                "--nan_policy=skip_step: NaN/Inf at step(s) %s: no update applied (%d so far)",
                ", ".join(str(int(s)) for s in nonfinite),
                int(state.nonfinite_steps.numpy()),
            )
            summaries.scalars(
                "train", {"nonfinite_steps": float(state.nonfinite_steps.numpy())}, current + chunk
            )
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


def _phase_optimizer(config: RunConfig, phase, model, steps_per_epoch: int):
    """The phase's fresh optimizer; its schedule spans the phase's optimizer steps."""
    training = config.training
    steps = phase.config.epochs * steps_per_epoch // training.grad_accum_steps
    warmup = training.warmup_steps or (
        training.warmup_epochs * steps_per_epoch // training.grad_accum_steps
    )
    return make_optimizer(
        phase.config,
        model.trainable_variables,
        training,
        steps=steps,
        warmup_steps=warmup,
        no_decay=tuple(phase_lib.no_decay_variables(model)),
        multipliers=phase_lib.lr_multipliers(model, training.layer_lr_decay),
        loss_scale=config.model.mixed_precision == "float16",
    )


def _class_weights(config: RunConfig, data) -> np.ndarray | None:
    """--class_weights=auto: N / (classes x count) per class, so every class weighs the same."""
    if config.training.class_weights != "auto":
        return None
    counts = np.asarray(data.class_counts, np.float64)
    return (counts.sum() / (len(counts) * np.maximum(counts, 1))).astype(np.float32)


class _BestTracker:
    """Keeps the best evaluation of --best_metric: its value and step in the run state (so a
    resumed run knows them) and its weights in WORKDIR/checkpoints/best. Also counts the
    phase's evaluations since its own best improved, for early stopping."""

    def __init__(self, metric, state, checkpoints, model, global_step) -> None:
        self.metric = metric
        self.state = state
        self.checkpoints = checkpoints
        self.global_step = global_step
        checkpoints.track(model=model, step=global_step, value=state.best)

    def update(self, eval_result: dict) -> bool:
        """Records one evaluation; True (and the weights saved) if it is the best so far."""
        value = float(eval_result[self.metric.name])
        state = self.state
        if self.metric.better(value, float(state.phase_best.numpy())):
            state.phase_best.assign(value)
            state.since_phase_best.assign(0)
        else:
            state.since_phase_best.assign_add(1)
        if not self.metric.better(value, float(state.best.numpy())):
            return False
        step = int(self.global_step.numpy())
        state.best.assign(value)
        state.best_step.assign(step)
        self.checkpoints.save(step)
        return True

    def summary(self) -> dict:
        return {
            "metric": str(self.metric),
            "value": float(self.state.best.numpy()),
            "step": int(self.state.best_step.numpy()),
        }


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


def weights_digest(model: keras.Model) -> str:
    """SHA-256 of every weight (RNG states excluded), in order: equal iff the weights are."""
    digest = hashlib.sha256()
    for variable in model.weights:
        if "seed_generator" not in variable.path:
            digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _averaged(step: TrainStep):
    """The model holds `step`'s moving averages inside, its trained weights again after."""
    if not step.averages:
        yield
        return
    step.swap_averages()
    try:
        yield
    finally:
        step.swap_averages()


class _ImageStream:
    """The one iterator over the training images, positioned at a global step on demand.

    One per process: a dataset shuffled with reshuffle_each_iteration gives each new iterator
    another order, so a second iterator would not continue the first one's stream.
    """

    def __init__(self, strategy: tf.distribute.Strategy, dataset: tf.data.Dataset) -> None:
        self.strategy, self.dataset = strategy, dataset
        self.iterator, self.position = None, 0

    def at(self, step: int):
        """The iterator, its next batch the one of global step `step` + 1."""
        if self.iterator is None:
            self.iterator = iter(_distribute(self.strategy, self.dataset.skip(step)))
            self.position = step
        for _ in range(step - self.position):  # steps taken meanwhile on cached features
            next(self.iterator)
        self.position = step
        return self.iterator

    def ran_to(self, step: int) -> None:
        """Records that the training steps up to global step `step` read this iterator."""
        self.position = step


def _distribute(strategy: tf.distribute.Strategy, dataset: tf.data.Dataset):
    # Every task builds the same dataset from the same seed; DATA sharding splits each global
    # batch between the tasks, so a cluster sees the same global batches as one device.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))
