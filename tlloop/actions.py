"""The side jobs of a run, called by the controller at named points (as Orbit's actions are).

Each action owns one concern: checkpoints on a cadence (`Checkpointer`), the best evaluation
and early stopping (`BestKeeper`), TensorBoard and metrics.jsonl (`SummaryWriter`), the profiler
(`Profiler`), the console (`Progress`) and the user's Keras callbacks (`KerasCallbacks`). The
controller holds the run's state and calls, in order:

    on_run_begin                               once (also when resuming)
      on_phase_begin(phase)                    at each phase start, after trainability is set
        on_epoch_begin(phase, epoch)
          limit(step, chunk) -> chunk          before each host call: where it must end
          before_steps(step)                   right before each host call
          on_steps(phase, step, rows, ...)     after each host call, with its logged rows
        on_epoch_end(phase, epoch, logs)       after the epoch's evaluation
      on_phase_end(phase, result)
    on_run_end(results)

An action asks the run to stop by raising `Stopped` (the controller saves a checkpoint first) or
by setting `controller.stop_requested`.
"""

from __future__ import annotations

import math
import os
import signal
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tlloop.errors import CallbackError
from tlloop.steps import averaged
from tlloop.summaries import Summaries, confusion_image, confusion_text, image_grid


class Stopped(Exception):
    """Raised when training stopped on request (SIGTERM), after saving a checkpoint."""


class Action:
    """A side job of the run; every hook is optional. `controller` is set before the run."""

    controller = None

    def limit(self, step: int, chunk: int) -> int:
        """`chunk` steps from global step `step`, cut where this action needs the host."""
        return chunk

    def on_run_begin(self) -> None: ...
    def on_phase_begin(self, phase) -> None: ...
    def on_epoch_begin(self, phase, epoch: int) -> None: ...
    def before_steps(self, step: int) -> None: ...
    def on_steps(self, phase, step: int, rows: list[dict], speed: dict, nonfinite) -> None: ...
    def on_epoch_end(self, phase, epoch: int, logs: dict) -> None: ...
    def on_phase_end(self, phase, result: dict) -> None: ...
    def on_run_end(self, results: dict) -> None: ...


class Checkpointer(Action):
    """Saves the run's checkpoint every `every_steps` global steps and every `every_secs`
    seconds (single host only: the tasks of a cluster must save together and their clocks do
    not agree); `save()` saves now. A SIGTERM (`stop` set) ends the run after the host call
    under way, with a checkpoint, by raising `Stopped`."""

    def __init__(self, checkpoints, *, every_steps: int, every_secs: float, stop=None) -> None:
        self.checkpoints = checkpoints
        self.every_steps = every_steps
        self.every_secs = every_secs
        self.stop = stop
        self.last = time.monotonic()

    def limit(self, step: int, chunk: int) -> int:
        if self.every_steps:
            chunk = min(chunk, self.every_steps - step % self.every_steps)
        return chunk

    def on_steps(self, phase, step, rows, speed, nonfinite) -> None:
        due_by_steps = self.every_steps and step % self.every_steps == 0
        due_by_time = self.every_secs and time.monotonic() - self.last >= self.every_secs
        if due_by_steps or due_by_time:
            self.save()
        if self.stop is not None and self.stop.is_set():
            raise Stopped()

    def save(self) -> None:
        step = int(self.controller.global_step.numpy())
        self.checkpoints.save(step)
        self.last = time.monotonic()
        logging.info("checkpoint saved at step %d", step)


class BestKeeper(Action):
    """Keeps the best evaluation of `metric` (a config.BestMetric): its value and step in the
    run state, so a resumed run knows them, and its weights in `checkpoints` (WORKDIR/
    checkpoints/best): the weights evaluated, so the moving averages when they are kept. With
    `patience` > 0, ends a phase after that many evaluations without a better value than the
    phase's best so far."""

    def __init__(self, metric, checkpoints, *, patience: int = 0) -> None:
        self.metric = metric
        self.checkpoints = checkpoints
        self.patience = patience

    def on_run_begin(self) -> None:
        c = self.controller
        self.checkpoints.track(model=c.model, step=c.global_step, value=c.state.best)

    def on_epoch_end(self, phase, epoch, logs) -> None:
        value = float(logs["eval"][self.metric.name])
        state = self.controller.state
        if self.metric.better(value, float(state.phase_best.numpy())):
            state.phase_best.assign(value)
            state.since_phase_best.assign(0)
        else:
            state.since_phase_best.assign_add(1)
        logs["is_best"] = self.metric.better(value, float(state.best.numpy()))
        if logs["is_best"]:
            step = int(self.controller.global_step.numpy())
            state.best.assign(value)
            state.best_step.assign(step)
            with averaged(self.controller.last_step):  # the weights just evaluated
                self.checkpoints.save(step)
        if self.patience and int(state.since_phase_best.numpy()) >= self.patience:
            logging.info(
                "%s phase stopped early at epoch %d: %d evaluations without a better %s "
                "(patience %d)",
                phase.name,
                epoch + 1,
                self.patience,
                self.metric,
                self.patience,
            )
            self.controller.stop_phase = True

    def summary(self) -> dict:
        state = self.controller.state
        return {
            "metric": str(self.metric),
            "value": float(state.best.numpy()),
            "step": int(state.best_step.numpy()),
        }


class SummaryWriter(Action):
    """What a researcher inspects: TensorBoard (train and eval writers) and metrics.jsonl.

    Train-step scalars are written in the graph by the steps (into the `train` writer, made the
    default around the host calls by the controller); this action writes the host-measured
    speed beside them, the logged rows to metrics.jsonl, each phase's mode table, trainability
    report and augmented inputs, and each evaluation's scalars and confusion matrix.
    """

    def __init__(
        self, summaries: Summaries, class_names=None, *, hparams=None, texts=(), scalars=None
    ) -> None:
        self.summaries = summaries
        self.class_names = class_names
        self.hparams = hparams
        self.texts = list(texts)
        self.scalars = scalars  # written once at the step this process starts from

    def on_run_begin(self) -> None:
        c, s = self.controller, self.summaries
        s.start_session(c.start_step)
        if self.scalars:
            s.scalars("train", self.scalars, c.start_step)
        if c.resume_from:
            return
        if self.hparams:
            trial = os.path.basename(os.path.abspath(s.workdir))
            scalars = [m.name for m in c.eval_metrics.task_metrics if np.ndim(m.result()) == 0]
            s.hparams(self.hparams, trial, scalars)
        for name, text in self.texts:
            s.text(name, text, 0)

    def on_phase_begin(self, phase) -> None:
        c, s = self.controller, self.summaries
        step = int(c.global_step.numpy())
        s.text("mode_table", phase.modes.to_text(), step)
        s.text("trainability", c.report, step)
        s.scalars("train", {"phase": phase.index + 1}, step)
        if c.preview is not None:
            inputs = c.model.augment(c.preview, training=phase.modes.train.augment)
            s.image("train", "augmented_inputs", image_grid(np.asarray(inputs)), step)

    def on_steps(self, phase, step, rows, speed, nonfinite) -> None:
        s = self.summaries
        if len(nonfinite):
            skipped = float(self.controller.state.nonfinite_steps.numpy())
            s.scalars("train", {"nonfinite_steps": skipped}, step)
        for row in rows:
            logged = row["step"]
            s.scalars("train", speed, logged)
            values = {k: v for k, v in row.items() if k != "step"}
            s.record("train", logged, {"phase": phase.name, **values, **speed})

    def on_epoch_end(self, phase, epoch, logs) -> None:
        s, step = self.summaries, logs["step"]
        s.scalars("train", {f"epoch/{k}": v for k, v in _scalars(logs["train"]).items()}, step)
        s.scalars("eval", _scalars(logs["eval"]), step)
        s.scalars("eval", {f"drift/{k}": v for k, v in logs.get("drift", {}).items()}, step)
        confusion = logs["eval"].get("confusion")
        if confusion is not None:
            s.image("eval", "confusion_matrix", confusion_image(confusion), step)
            names = self.class_names or tuple(str(i) for i in range(len(confusion)))
            s.text("confusion_matrix", confusion_text(confusion, names), step)
        # The task's own views (PR curves, a predicted-vs-true scatter) from its metrics.
        self.controller.task.write_summaries(s, self.controller.eval_metrics.task_metrics, step)
        s.record("eval", step, {"phase": phase.name, "epoch": epoch + 1, **logs["eval"]})
        s.flush()

    def on_phase_end(self, phase, result) -> None:
        self.summaries.flush()


class Profiler(Action):
    """Traces global steps START..END with the TensorFlow profiler, on host-call boundaries,
    into `logdir` (nothing when `steps` is empty)."""

    def __init__(self, steps: tuple[int, ...], logdir: str) -> None:
        self.first, self.last = steps if steps else (0, -1)
        self.logdir = logdir
        self.running = False

    def limit(self, step: int, chunk: int) -> int:
        for boundary in (self.first - 1, self.last):
            if step < boundary:
                chunk = min(chunk, boundary - step)
        return chunk

    def before_steps(self, step: int) -> None:
        if not self.running and self.first - 1 <= step < self.last:
            tf.profiler.experimental.start(self.logdir)
            self.running = True
        elif self.running and step >= self.last:
            self.on_run_end({})

    def on_steps(self, phase, step, rows, speed, nonfinite) -> None:
        if self.running and step >= self.last:
            self.on_run_end({})

    def on_run_end(self, results) -> None:
        if self.running:
            tf.profiler.experimental.stop()
            self.running = False


class Progress(Action):
    """The console: a progress bar per epoch (unless `quiet`) and one log line per epoch; at
    each phase start, the phase's mode table and trainability report, which the controller
    logs at INFO, are printed too (unless `quiet`) when absl would not show INFO (a Python
    caller's default verbosity, WARNING): set absl's verbosity to INFO to have them logged
    instead, or `LoggingConfig(quiet=True)` for neither."""

    def __init__(self, *, verbose: bool) -> None:
        self.verbose = verbose
        self.bar = None

    def on_phase_begin(self, phase) -> None:
        if self.verbose and not logging.level_info():
            report = self.controller.report
            print(f"{phase.name} phase:\n{phase.modes.to_text()}\n{report}", flush=True)

    def on_epoch_begin(self, phase, epoch) -> None:
        c = self.controller
        self.bar = keras.utils.Progbar(
            c.steps_per_epoch, verbose=1 if self.verbose else 0, stateful_metrics=["examples/s"]
        )
        self.done = c.epoch_offset

    def on_steps(self, phase, step, rows, speed, nonfinite) -> None:
        self.done = step - self.controller.epoch_start_step
        hidden = ("step", "learning_rate", "gradient_norm")
        shown = [(k, v) for k, v in rows[-1].items() if k not in hidden] if rows else []
        self.bar.update(self.done, values=[*shown, ("examples/s", speed["examples_per_second"])])

    def on_epoch_end(self, phase, epoch, logs) -> None:
        train, evaluation = logs["train"], logs["eval"]
        logging.info(
            "%s epoch %d/%d step %d: train %s | eval %s (%d examples)%s | %.1f s",
            phase.name,
            epoch + 1,
            phase.config.epochs,
            logs["step"],
            _format(train),
            _format(evaluation),
            evaluation["examples"],
            " | best so far" if logs.get("is_best") else "",
            logs["seconds"],
        )


class FaultHook(Action):
    """For tests only: ends this process with a signal as it starts global step STEP, as a
    native crash inside that step would (every time it gets there). Configured by the
    environment variable TLLOOP_FAULT = "SIGNAL@STEP" (e.g. "SIGSEGV@5"), or
    "SIGNAL@STEP:once=PATH" to fire only while PATH does not exist (it is created first), so
    that a restarted process goes on; "SIGNAL@STEP:onednn" fires only while TensorFlow's
    oneDNN kernels are on (TF_ENABLE_ONEDNN_OPTS is not "0"), as their known crash does."""

    def __init__(self, signum: int, step: int, once: str = "", onednn: bool = False) -> None:
        self.signum, self.step, self.once, self.onednn = signum, step, once, onednn

    @classmethod
    def from_environment(cls) -> list[FaultHook]:
        spec = os.environ.get("TLLOOP_FAULT", "")
        if not spec:
            return []
        name, _, rest = spec.partition("@")
        onednn = rest.endswith(":onednn")
        step, _, once = rest.removesuffix(":onednn").partition(":once=")
        return [cls(int(signal.Signals[name]), int(step), once, onednn)]

    def limit(self, step: int, chunk: int) -> int:
        before = self.step - 1  # a host call ends right before the step that crashes
        return min(chunk, before - step) if step < before else chunk

    def before_steps(self, step: int) -> None:
        if step + 1 != self.step or (self.once and os.path.exists(self.once)):
            return
        if self.onednn and os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0":
            return
        if self.once:
            with open(self.once, "w"):
                pass
        os.kill(os.getpid(), self.signum)


class KerasCallbacks(Action):
    """Runs `keras.callbacks.Callback`s: on_train_begin/end, on_epoch_begin/end (epochs counted
    across phases; logs: the epoch's training metrics and, prefixed `val_`, its evaluation
    metrics, as `Model.fit` gives them), on_train_batch_begin/end at each logged step (its
    row: loss, step metrics, learning_rate, gradient_norm). A callback that sets
    `model.stop_training` ends the phase under way (as it ends one `fit` in the Keras guide's
    two `fit`s) after the host call under way and its evaluation; the next phase runs. An
    `EarlyStopping` starts afresh at each phase (as at each `fit`). One that raises stops the
    run with a `CallbackError` naming it. Callbacks that drive `model.optimizer` are refused."""

    # Callbacks that set model.optimizer's rate: a TransferModel has none (each phase makes its
    # own), so they would fail after the first epoch had trained.
    UNSUPPORTED = (keras.callbacks.ReduceLROnPlateau, keras.callbacks.LearningRateScheduler)

    def __init__(self, callbacks) -> None:
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            if not isinstance(callback, keras.callbacks.Callback):
                raise TypeError(
                    f"callbacks: {type(callback).__name__} is not a keras.callbacks.Callback; "
                    "accepted: Keras callbacks (CSVLogger, TerminateOnNaN, your own subclass)"
                )
            if isinstance(callback, self.UNSUPPORTED):
                raise ValueError(
                    f"callbacks: {type(callback).__name__} sets model.optimizer's learning rate, "
                    "and a TransferModel's phases each make their own optimizer; accepted: a "
                    "schedule in TrainingConfig(lr_schedule=..., warmup_steps=...) or a Phase's "
                    "own optimizer=keras.optimizers.X(learning_rate=SCHEDULE)"
                )
        self.last_logs: dict = {}

    def _call(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            try:
                getattr(callback, hook)(*args)
            except (Stopped, KeyboardInterrupt):
                raise
            except Exception as error:
                raise CallbackError(
                    f"callback {type(callback).__name__}.{hook} raised "
                    f"{type(error).__name__}: {error}"
                ) from error
        if getattr(self.controller.model, "stop_training", False):
            self.controller.stop_phase = "callback"

    def on_run_begin(self) -> None:
        c = self.controller
        c.model.stop_training = False
        params = {"epochs": c.total_epochs, "steps": c.steps_per_epoch, "verbose": 0}
        for callback in self.callbacks:
            callback.set_model(c.model)
            callback.set_params(params)
        self._call("on_train_begin", {})

    def on_phase_begin(self, phase) -> None:
        self.controller.model.stop_training = False
        for callback in self.callbacks:
            if isinstance(callback, keras.callbacks.EarlyStopping):
                callback.on_train_begin({})  # its patience counts within one phase, one fit

    def on_epoch_begin(self, phase, epoch) -> None:
        self._call("on_epoch_begin", self.controller.epoch_number, {})

    def on_steps(self, phase, step, rows, speed, nonfinite) -> None:
        start = self.controller.epoch_start_step
        for row in rows:
            batch = row["step"] - start - 1
            logs = {k: v for k, v in row.items() if k != "step"}
            self._call("on_train_batch_begin", batch, {})
            self._call("on_train_batch_end", batch, logs)

    def on_epoch_end(self, phase, epoch, logs) -> None:
        values = {
            **_scalars(logs["train"]),
            **{f"val_{k}": v for k, v in _scalars(logs["eval"]).items()},
        }
        self.last_logs = values
        self._call("on_epoch_end", self.controller.epoch_number, dict(values))

    def on_run_end(self, results) -> None:
        self._call("on_train_end", dict(self.last_logs))


def _scalars(values: dict) -> dict:
    """The metrics among `values` that are numbers, the example count aside."""
    return {
        k: float(v)
        for k, v in values.items()
        if k != "examples" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _format(values: dict) -> str:
    return " ".join(
        f"{k} {v:.4f}" if math.isfinite(v) else f"{k} {v}" for k, v in _scalars(values).items()
    )
