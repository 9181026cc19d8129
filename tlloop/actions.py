"""The side jobs of a run, called by the controller at named points (as Orbit's actions are).

Each action owns one concern: when to checkpoint (`Checkpointer`), the best evaluation
(`BestKeeper`), early stopping (`EarlyStopping`), TensorBoard and metrics.jsonl
(`SummaryWriter`), the profiler (`Profiler`), the console (`Progress`) and the user's Keras
callbacks (`KerasCallbacks`). An action sees the run through a read-only `RunView` (`view`,
set before the run) and never changes the controller: a hook returns what it wants done as
`Signal`s (one, several in a tuple, or None), which the controller applies in order, right
after that hook. The controller calls, in order:

    on_run_begin                               once (also when resuming)
      on_phase_begin(phase)                    at each phase start, after trainability is set
        on_epoch_begin(phase, epoch)
          limit(step, chunk) -> chunk          before each host call: where it must end
          before_steps(step)                   right before each host call
          on_steps(phase, step, rows, ...)     after each host call, with its logged rows
        on_epoch_end(phase, epoch, logs)       after the epoch's evaluation
      on_phase_end(phase, result)
    on_run_end(results)

A stateful action owns its state, as Lightning's callbacks do: `state()` is a `tf.Module` the
controller saves in the run's checkpoint under `actions/<state_key>` and restores on resume;
`restore_old(path)` reads it from a checkpoint an older tlloop wrote (without that key).
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
import signal
import time
from collections.abc import Iterator

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tlloop.errors import CallbackError, ConfigError
from tlloop.summaries import Summaries, confusion_image, confusion_text, image_grid


class Stopped(Exception):
    """Raised when training stopped on request (SIGTERM), after saving a checkpoint."""


class Signal(enum.Enum):
    """What an action asks of the run; the controller applies it after the hook returns."""

    SAVE = "save"  # save the run's checkpoint at the current step
    STOP_PHASE = "stop_phase"  # end the phase after the epoch under way (early stopping)
    # End the phase after the host call under way and its evaluation; the phase's result
    # says `stopped_by: callback` (a Keras callback set model.stop_training).
    CALLBACK_STOP = "callback_stop"
    STOP_RUN = "stop_run"  # end the run after the host call under way; nothing left to resume
    INTERRUPT = "interrupt"  # raise Stopped now (SIGTERM); the controller saves first


Signals = Signal | tuple[Signal, ...] | None


def signals_of(returned: Signals) -> tuple[Signal, ...]:
    """The signals a hook returned, in order (None: none)."""
    if returned is None:
        return ()
    return (returned,) if isinstance(returned, Signal) else tuple(returned)


class RunView:
    """A read-only view of the run for actions: its model and task, its position (global
    step, the epoch under way, the resume point), the phase's trainability report, the last
    epoch's logs and what evaluates the weights. Built by the controller over itself; every
    value is read when asked, so it is always the run's current one."""

    def __init__(self, run) -> None:
        self._run = run

    @property
    def model(self) -> keras.Model:
        return self._run.model

    @property
    def task(self):
        return self._run.task

    @property
    def step(self) -> int:
        """The global step: steps trained so far in the whole run."""
        return int(self._run.global_step.numpy())

    @property
    def start_step(self) -> int:
        """The global step this process started from (0, or the resume point's)."""
        return self._run.start_step

    @property
    def resuming(self) -> bool:
        """True until the resume point is restored (in the first phase this process runs,
        after its on_phase_begin): what is about to run was started by an earlier process."""
        return bool(self._run.resume_from)

    @property
    def resumed_phase(self) -> int | None:
        """The index of the phase the resume point is in (len(plan): a finished run), or
        None when this process started the run."""
        return self._run.start_phase if self._run.resumed else None

    @property
    def steps_per_epoch(self) -> int:
        return self._run.steps_per_epoch

    @property
    def total_epochs(self) -> int:
        return self._run.epochs.total

    @property
    def epoch_number(self) -> int:
        """The epoch under way, counted across phases from 0 (Keras' epoch numbers)."""
        return self._run.epoch_number

    @property
    def epoch_start_step(self) -> int:
        """The global step at which the epoch under way began."""
        return self._run.epoch_start_step

    @property
    def epoch_offset(self) -> int:
        """The steps of the epoch under way done before this process resumed it."""
        return self._run.epoch_offset

    @property
    def report(self) -> str:
        """The trainability report of the phase under way."""
        return self._run.report

    @property
    def preview(self):
        """A few training inputs (for the augmented-inputs image), or None."""
        return self._run.preview

    @property
    def task_metrics(self) -> list:
        """The task's evaluation metrics, as last evaluated."""
        return self._run.eval_metrics.task_metrics

    @property
    def nonfinite_steps(self) -> int:
        """The NaN/Inf steps skipped so far (nan_policy skip_step)."""
        return int(self._run.state.nonfinite_steps.numpy())

    @property
    def last_logs(self) -> dict:
        """The last epoch's logs (step, train, eval, seconds, drift); {} before one ends."""
        return dict(self._run.last_logs)

    @property
    def last_saved(self) -> float:
        """time.monotonic() of the run's last checkpoint (of its start before one)."""
        return self._run.last_saved

    @contextlib.contextmanager
    def evaluated_weights(self) -> Iterator[None]:
        """The model holds the weights last evaluated (the moving averages, when kept)."""
        with self._run.evaluated_weights():
            yield

    def evaluate(self) -> dict:
        """The evaluation metrics of the model's weights as they are now."""
        return self._run.evaluate_now()


class Action:
    """A side job of the run; every hook is optional and may return Signals. `view` is set
    before the run."""

    view: RunView
    state_key = ""  # the key of this action's state in the run's checkpoint ("": none)

    def state(self) -> tf.Module | None:
        """The variables this action saves in the run's checkpoint (None: stateless)."""
        return None

    def restore_old(self, path: str) -> None:
        """Sets this action's state from checkpoint `path`, which holds none under
        `state_key` (an older tlloop's layout)."""

    def limit(self, step: int, chunk: int) -> int:
        """`chunk` steps from global step `step`, cut where this action needs the host."""
        return chunk

    def on_run_begin(self) -> Signals: ...
    def on_phase_begin(self, phase) -> Signals: ...
    def on_epoch_begin(self, phase, epoch: int) -> Signals: ...
    def before_steps(self, step: int) -> Signals: ...
    def on_steps(self, phase, step: int, rows: list[dict], speed: dict, nonfinite) -> Signals: ...
    def on_epoch_end(self, phase, epoch: int, logs: dict) -> Signals: ...
    def on_phase_end(self, phase, result: dict) -> Signals: ...
    def on_run_end(self, results: dict) -> Signals: ...


class Checkpointer(Action):
    """Asks for the run's checkpoint every `every_steps` global steps and every `every_secs`
    seconds (single host only: the tasks of a cluster must save together and their clocks do
    not agree). A SIGTERM (`stop` set) ends the run after the host call under way, with a
    checkpoint (Signal.INTERRUPT: the controller saves and raises `Stopped`)."""

    def __init__(self, *, every_steps: int, every_secs: float, stop=None) -> None:
        self.every_steps = every_steps
        self.every_secs = every_secs
        self.stop = stop

    def limit(self, step: int, chunk: int) -> int:
        if self.every_steps:
            chunk = min(chunk, self.every_steps - step % self.every_steps)
        return chunk

    def on_steps(self, phase, step, rows, speed, nonfinite) -> Signals:
        due_by_steps = self.every_steps and step % self.every_steps == 0
        due_by_time = self.every_secs and time.monotonic() - self.view.last_saved >= self.every_secs
        signals = (Signal.SAVE,) if due_by_steps or due_by_time else ()
        if self.stop is not None and self.stop.is_set():
            signals += (Signal.INTERRUPT,)
        return signals


def _variable(value, dtype, name: str) -> tf.Variable:
    return tf.Variable(value, dtype=dtype, trainable=False, name=name)


def _read_old(path: str, names: dict[str, tf.Variable], what: str) -> bool:
    """Assigns each of `names` (the old RunState's field -> variable) from checkpoint `path`'s
    `state/<field>`; False (nothing assigned) if the checkpoint holds none of them."""
    keys = {name for name, _ in tf.train.list_variables(path)}
    old = {f: f"state/{f}/.ATTRIBUTES/VARIABLE_VALUE" for f in names}
    if not all(key in keys for key in old.values()):
        return False
    for field, variable in names.items():
        variable.assign(tf.train.load_variable(path, old[field]))
    logging.info("checkpoint %s: %s read from its run state (an older tlloop's layout)", path, what)
    return True


class BestKeeper(Action):
    """Keeps the best evaluation of `metric` (a config.BestMetric): its value and step in its
    own state (saved in the run's checkpoint, so a resumed run knows them), and its weights in
    `checkpoints` (WORKDIR/checkpoints/best): the weights evaluated, so the moving averages
    when they are kept. Marks an epoch's logs `is_best` when it is the best so far."""

    state_key = "best"

    def __init__(self, metric, checkpoints) -> None:
        self.metric = metric
        self.checkpoints = checkpoints
        self.values = tf.Module(name="best")
        self.values.value = _variable(math.nan, tf.float64, "best")
        self.values.step = _variable(-1, tf.int64, "best_step")

    def state(self) -> tf.Module:
        return self.values

    def restore_old(self, path: str) -> None:
        names = {"best": self.values.value, "best_step": self.values.step}
        if not _read_old(path, names, "the best evaluation"):
            raise ConfigError(
                f"checkpoint {path!r}: holds no best evaluation (not a tlloop checkpoint?); "
                "accepted: the checkpoints a tlloop run wrote, or a new workdir"
            )

    def on_run_begin(self) -> Signals:
        self.checkpoints.track(
            model=self.view.model, step=self.values.step, value=self.values.value
        )

    def on_epoch_end(self, phase, epoch, logs) -> Signals:
        value = float(logs["eval"][self.metric.name])
        logs["is_best"] = self.metric.better(value, float(self.values.value.numpy()))
        if logs["is_best"]:
            step = self.view.step
            self.values.value.assign(value)
            self.values.step.assign(step)
            with self.view.evaluated_weights():
                self.checkpoints.save(step)

    def summary(self) -> dict:
        return {
            "metric": str(self.metric),
            "value": float(self.values.value.numpy()),
            "step": int(self.values.step.numpy()),
        }


class EarlyStopping(Action):
    """Ends a phase after `patience` evaluations of `metric` without a better value than the
    phase's best so far (counted afresh in each phase; its count saved with the run)."""

    state_key = "early_stopping"

    def __init__(self, metric, patience: int) -> None:
        self.metric = metric
        self.patience = patience
        self.count = tf.Module(name="early_stopping")
        self.count.phase_best = _variable(math.nan, tf.float64, "phase_best")
        self.count.since_phase_best = _variable(0, tf.int64, "since_phase_best")

    @classmethod
    def of(cls, metric, patience: int) -> list[EarlyStopping]:
        """The action for `patience` (> 0), or none."""
        return [cls(metric, patience)] if patience else []

    def state(self) -> tf.Module:
        return self.count

    def restore_old(self, path: str) -> None:
        names = {
            "phase_best": self.count.phase_best,
            "since_phase_best": self.count.since_phase_best,
        }
        if not _read_old(path, names, "the early-stopping count"):
            logging.warning(
                "checkpoint %s holds no early-stopping count (written without patience): "
                "counting from this resume",
                path,
            )

    def on_phase_begin(self, phase) -> Signals:
        # A resumed phase restores its count after this hook.
        self.count.phase_best.assign(math.nan)
        self.count.since_phase_best.assign(0)

    def on_epoch_end(self, phase, epoch, logs) -> Signals:
        value = float(logs["eval"][self.metric.name])
        if self.metric.better(value, float(self.count.phase_best.numpy())):
            self.count.phase_best.assign(value)
            self.count.since_phase_best.assign(0)
        else:
            self.count.since_phase_best.assign_add(1)
        if int(self.count.since_phase_best.numpy()) < self.patience:
            return None
        logging.info(
            "%s phase stopped early at epoch %d: %d evaluations without a better %s (patience %d)",
            phase.name,
            epoch + 1,
            self.patience,
            self.metric,
            self.patience,
        )
        return Signal.STOP_PHASE


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
        view, s = self.view, self.summaries
        s.start_session(view.start_step)
        if self.scalars:
            s.scalars("train", self.scalars, view.start_step)
        if view.resuming:
            return
        if self.hparams:
            trial = os.path.basename(os.path.abspath(s.workdir))
            scalars = [m.name for m in view.task_metrics if np.ndim(m.result()) == 0]
            s.hparams(self.hparams, trial, scalars)
        for name, text in self.texts:
            s.text(name, text, 0)

    def on_phase_begin(self, phase) -> None:
        view, s = self.view, self.summaries
        step = view.step
        s.text("mode_table", phase.modes.to_text(), step)
        s.text("trainability", view.report, step)
        s.scalars("train", {"phase": phase.index + 1}, step)
        if view.preview is not None:
            inputs = view.model.augment(view.preview, training=phase.modes.train.augment)
            s.image("train", "augmented_inputs", image_grid(np.asarray(inputs)), step)

    def on_steps(self, phase, step, rows, speed, nonfinite) -> None:
        s = self.summaries
        if len(nonfinite):
            skipped = float(self.view.nonfinite_steps)
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
        self.view.task.write_summaries(s, self.view.task_metrics, step)
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
            report = self.view.report
            print(f"{phase.name} phase:\n{phase.modes.to_text()}\n{report}", flush=True)

    def on_epoch_begin(self, phase, epoch) -> None:
        view = self.view
        self.bar = keras.utils.Progbar(
            view.steps_per_epoch, verbose=1 if self.verbose else 0, stateful_metrics=["examples/s"]
        )
        self.done = view.epoch_offset

    def on_steps(self, phase, step, rows, speed, nonfinite) -> None:
        self.done = step - self.view.epoch_start_step
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

    def _call(self, hook: str, *args) -> Signals:
        """Calls `hook` on every callback; CALLBACK_STOP when one set model.stop_training."""
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
        return Signal.CALLBACK_STOP if getattr(self.view.model, "stop_training", False) else None

    def on_run_begin(self) -> Signals:
        view = self.view
        view.model.stop_training = False
        params = {"epochs": view.total_epochs, "steps": view.steps_per_epoch, "verbose": 0}
        for callback in self.callbacks:
            callback.set_model(view.model)
            callback.set_params(params)
        return self._call("on_train_begin", {})

    def on_phase_begin(self, phase) -> None:
        self.view.model.stop_training = False
        for callback in self.callbacks:
            if isinstance(callback, keras.callbacks.EarlyStopping):
                callback.on_train_begin({})  # its patience counts within one phase, one fit

    def on_epoch_begin(self, phase, epoch) -> Signals:
        return self._call("on_epoch_begin", self.view.epoch_number, {})

    def on_steps(self, phase, step, rows, speed, nonfinite) -> Signals:
        start, signals = self.view.epoch_start_step, ()
        for row in rows:
            batch = row["step"] - start - 1
            logs = {k: v for k, v in row.items() if k != "step"}
            signals += signals_of(self._call("on_train_batch_begin", batch, {}))
            signals += signals_of(self._call("on_train_batch_end", batch, logs))
        return signals

    def on_epoch_end(self, phase, epoch, logs) -> None:
        values = {
            **_scalars(logs["train"]),
            **{f"val_{k}": v for k, v in _scalars(logs["eval"]).items()},
        }
        self.last_logs = values
        return self._call("on_epoch_end", self.view.epoch_number, dict(values))

    def on_run_end(self, results) -> Signals:
        return self._call("on_train_end", dict(self.last_logs))


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
