"""The controller: the loop over phases, epochs and host calls, and the run's state.

It reads top to bottom: `run` -> `_run_phase` -> `_run_epoch` -> `_run_steps`. It owns the
run's position (phase, gradual-unfreeze stage, global step, the resume point; the arithmetic in
`tlloop.loop.position`), the phase's input (`tlloop.loop.inputs`), the compiled steps and the
run's checkpoint; everything else (checkpoint cadence, best model, early stopping, summaries,
profiler, console, Keras callbacks) is an action called at named points (see `tlloop.actions`):
each sees the run through a read-only `RunView` and returns `Signal`s (save, stop the phase,
stop the run) that the controller applies. All state is created under the strategy's scope; in
a cluster every task runs the same loop (reading a metric is a collective) and only the
chief's actions write.
"""

from __future__ import annotations

import contextlib
import hashlib
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tlloop import adabn
from tlloop import anchors as anchors_lib
from tlloop import checkpoints as checkpoint_lib
from tlloop import phases as phase_lib
from tlloop.actions import Action, RunView, Signal, Signals, Stopped, signals_of
from tlloop.data.examples import Examples
from tlloop.errors import CallbackError, RunFailed
from tlloop.loop import position as position_lib
from tlloop.loop.inputs import Inputs
from tlloop.loop.position import AutoLoop
from tlloop.models import TransferModel
from tlloop.steps import (
    CompiledSteps,
    Metrics,
    StepOptions,
    averaged,
    build_train_step,
    compile_eval,
    mixing_of,
)
from tlloop.tasks import Task


class Controller:
    """Runs a phase plan on a model and data, resuming from `checkpoints` when they hold a run.

    `distribute(batches, positionable, batch_size)` makes the strategy's distributed dataset
    of `batches(part)` (see `distribute.distribute_batches`). Actions are
    called in the order given. `run` returns the results (per phase: its steps, seconds, the
    seconds of each epoch's training loop (host calls, input waits and actions; evaluation
    aside), last
    train and eval metrics; the SHA-256 of the final weights, equal on every task of a
    cluster).
    """

    def __init__(
        self,
        *,
        model: TransferModel,
        task: Task,
        train: Examples,
        eval_data: Examples,
        plan: list[phase_lib.PlannedPhase],
        options: StepOptions,
        strategy: tf.distribute.Strategy,
        checkpoints: checkpoint_lib.Checkpoints,
        actions: list[Action],
        distribute,
        train_writer=None,
    ) -> None:
        self.model, self.task, self.plan = model, task, plan
        self.train, self.eval = train, eval_data
        self.options, self.strategy = options, strategy
        self.checkpoints, self.actions, self.distribute = checkpoints, actions, distribute
        self.train_writer = train_writer or contextlib.nullcontext()
        self.steps_per_epoch = train.batch_count(options.batch_size)
        self.epochs = position_lib.Epochs(
            self.steps_per_epoch, tuple(phase.config.epochs for phase in plan)
        )
        self.eval_steps = eval_data.eval_steps(options.eval_batch_size)
        self.preview = train.preview()
        # Outside the strategy's scope: the same on every task, and a distributed string
        # variable cannot be broadcast by MultiWorkerMirroredStrategy.
        self.state = checkpoint_lib.RunState()
        self.action_states = self._action_states(actions)
        self.host_call = (0, 1)  # the last host call's (first global step, steps)
        self.stop_requested = False  # Signal.STOP_RUN: end the run after the host call
        # Signal.STOP_PHASE: end the phase after this epoch (True); Signal.CALLBACK_STOP (a
        # Keras callback set model.stop_training): after the host call under way and its
        # evaluation ("callback").
        self.stop_phase: bool | str = False
        self.report = ""
        self.epoch_seconds = []  # each epoch's training loop, the phase under way
        self.in_epoch = False  # from an epoch's first host call to its last action
        self.auto_loop = AutoLoop()
        self.host_calls = 0  # train-step calls of the phase under way
        self.epoch_number = self.epoch_start_step = self.epoch_offset = 0
        self.last_logs: dict = {}
        self.last_saved = time.monotonic()
        self.view = RunView(self)
        for action in actions:
            action.view = self.view

    @staticmethod
    def _action_states(actions: list[Action]) -> dict[str, tf.Module]:
        """{state_key: state} of the stateful actions: saved under `actions/<state_key>`."""
        states = {}
        for action in actions:
            state = action.state()
            if state is None:
                continue
            if not action.state_key or action.state_key in states:
                raise ValueError(
                    f"actions: {type(action).__name__} keeps state under "
                    f"{action.state_key!r}; accepted: a state_key no other action uses"
                )
            states[action.state_key] = state
        return states

    # The run, top to bottom.

    def run(self) -> dict:
        resume_from = self.checkpoints.resume_point()  # the newest intact one, verified
        start_phase, start_step = (
            position_lib.stored(resume_from) if resume_from else position_lib.Stored(0, 0)
        )
        if resume_from:
            self.checkpoints.check(resume_from, self.model)
            where = (
                f"phase {start_phase + 1} of {len(self.plan)}"
                if start_phase < len(self.plan)
                else "finished run"
            )
            logging.info("resuming from %s: %s, step %d", resume_from, where, start_step)
        self.resume_from, self.start_step = resume_from, start_step
        self.resumed, self.start_phase = bool(resume_from), start_phase
        # The step the resumed phase began at (read before anything restores it).
        self.resume_phase_start = (
            position_lib.phase_start(resume_from)
            if resume_from and start_phase < len(self.plan)
            else 0
        )
        with self.strategy.scope():
            self._make_state()
            self.epoch_number = self.epochs.before(start_phase, start_step, self.resume_phase_start)
            self._call("on_run_begin")
            results = {"phases": []}
            with self.train_writer, self._save_when_stopped():
                results.update(  # AdaBN (bn_mode="adapt"): once, before the first phase
                    adabn.before_run(
                        self.model.backbone,
                        self.train,
                        self.plan,
                        self.state,
                        resume_from,
                        batch_size=self.options.eval_batch_size,
                    )
                )
                for phase in self.plan[start_phase:]:
                    self._run_phase(phase, results)
                    if self.stop_requested:
                        break
            self._finish(results)
        return results

    def _make_state(self) -> None:
        self.global_step = tf.Variable(
            0,
            dtype=tf.int64,
            trainable=False,
            name="global_step",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        self.train_metrics = Metrics(task=self.task, evaluation=False)
        self.eval_metrics = Metrics(task=self.task, evaluation=True)
        self.eval_step = compile_eval(
            self.model,
            self.plan[0].modes,
            self.eval_metrics,
            jit_compile=self.options.jit_compile,
            task=self.task,
        )
        self.inputs = Inputs(
            model=self.model,
            train=self.train,
            eval_data=self.eval,
            distribute=self.distribute,
            batch_size=self.options.batch_size,
            eval_batch_size=self.options.eval_batch_size,
            seed=self.options.seed,
            cache_mode=self.options.feature_cache,
            eval_step=self.eval_step,
            feature_eval_step=lambda phase: compile_eval(
                self.model,
                phase.modes,
                self.eval_metrics,
                jit_compile=self.options.jit_compile,
                features_in=True,
                task=self.task,
            ),
        )
        self.last_step: CompiledSteps | None = None
        # w0, the backbone as it starts: a resumed run restores the first start's.
        self.anchors = anchors_lib.Anchors(self.model.backbone)

    def _run_phase(self, phase: phase_lib.PlannedPhase, results: dict) -> None:
        self._set_trainability(phase, self._resume_stage(phase))
        self.report = phase_lib.trainability_report(self.model, phase)
        logging.info("mode table:\n%s", phase.modes.to_text())
        logging.info("trainability:\n%s", self.report)
        self._call("on_phase_begin", phase)
        mixing = mixing_of(self.options)
        use_cache, cache_reason = self.inputs.decide(phase, mixing.describe() if mixing else "")
        self.stop_phase = False
        self.host_calls = 0
        step = self._new_step(phase, use_cache)
        if self.resume_from:
            self._restore(self.resume_from)
            results["phases"] = self.state.finished_phases()
            self.resume_from = None
            if len(results["phases"]) > phase.index:
                return  # the checkpoint was this phase's last
        else:
            self.state.start_phase(phase.index, self._step())
            self._save()
        phase_input = self.inputs.open(phase, use_cache, cache_reason, self._step())
        batches, evaluator = phase_input.batches, phase_input.evaluator
        logging.info("%s phase feature cache: %s", phase.name, phase_input.reason)
        # With jit_compile: XLA's scope (the whole step or the gradients), before any batch is read.
        step.choose_xla(batches.element_spec)
        first_epoch, offset = self.epochs.resume(
            self._step(),
            int(self.state.phase_start.numpy()),
            int(self.state.evaluated_step.numpy()),
        )
        started = time.perf_counter()
        train_result = eval_result = None
        stopped_early = False
        epochs_run = first_epoch
        self.epoch_seconds: list[float] = []
        for epoch in range(first_epoch, phase.config.epochs):
            if phase.config.gradual:  # the next stage: more layers train
                self._set_trainability(phase, epoch)
                if not step.matches(self.model):
                    step = self._new_step(phase, use_cache)
                    logging.info(
                        "gradual unfreeze, epoch %d:\n%s",
                        epoch + 1,
                        phase_lib.trainability_report(self.model, phase),
                    )
            train_result, eval_result = self._run_epoch(
                phase, epoch, step, batches, offset, evaluator
            )
            offset = 0
            epochs_run = epoch + 1
            if self.stop_phase or self.stop_requested:
                stopped_early = bool(self.stop_phase)
                break
        self.inputs.close(phase_input, self._step())
        if eval_result is None:  # resumed after the phase's evaluated last step
            train_result = self.train_metrics.result()
            eval_result = self._evaluate(step, evaluator)
        result = {
            "name": phase.name,
            "epochs": phase.config.epochs,
            "epochs_run": epochs_run,  # fewer when stopped early (the last may be partial)
            "stopped_early": stopped_early,
            "feature_cache": phase_input.reason,
            "last_step": self._step(),
            "seconds": round(time.perf_counter() - started, 3),
            "epoch_seconds": [round(t, 4) for t in self.epoch_seconds],
            "host_calls": self.host_calls,
            "train": train_result,
            "eval": eval_result,
            "drift": self._drift(step),  # of the weights last evaluated
        }
        if self.stop_requested or self.stop_phase == "callback":
            result["stopped_by"] = "callback"
        results["phases"].append(result)
        self.state.record(results["phases"])
        if self.stop_requested:  # a callback ended the run: nothing is left to resume
            self.state.phase.assign(len(self.plan))
        self._save()  # the end of the phase
        self._call("on_phase_end", phase, result)

    def _run_epoch(self, phase, epoch, step, batches, offset, evaluator):
        # A stale compiled step would silently keep updating an old trainable set.
        if not step.matches(self.model):
            raise RuntimeError("the trainable set changed under a compiled train step")
        if not offset:
            self.train_metrics.reset()  # a resumed epoch goes on with its restored metrics
        self.epoch_offset = offset
        self.epoch_start_step = self._step() - offset
        self._call("on_epoch_begin", phase, epoch)
        self.in_epoch = True
        seconds = self._run_steps(phase, step, batches, self.steps_per_epoch - offset)
        left = step.apply_leftover()
        if left:
            logging.info(
                "gradient accumulation: the epoch's last %d batch(es) applied as one update "
                "(the mean of their gradients)",
                left,
            )
        self.epoch_seconds.append(seconds)
        train_result = self.train_metrics.result()
        eval_result = self._evaluate(step, evaluator)
        self.state.evaluated_step.assign(self._step())
        logs = {
            "step": self._step(),
            "train": train_result,
            "eval": eval_result,
            "seconds": seconds,
            "drift": self._drift(step),
        }
        self.last_logs = logs
        self._call("on_epoch_end", phase, epoch, logs)
        self.in_epoch = False
        self.epoch_number += 1
        return train_result, eval_result

    def _run_steps(self, phase, step: CompiledSteps, batches, count: int) -> float:
        """Runs `count` steps in host calls of up to `steps_per_loop` (with "auto": up to the
        next logged step, and calls of about `AutoLoop.seconds`), ending calls where an
        action needs the host; returns the seconds of the whole loop (input waits, host calls
        and every action's work between them). A NaN/Inf step raises RunFailed under
        nan_policy "stop" (before any checkpoint is saved after it) and is counted under
        "skip_step"."""
        done, loop_started = 0, time.perf_counter()
        while done < count and not (self.stop_requested or self.stop_phase):
            current = self._step()
            chunk = position_lib.chunk(
                current,
                count - done,
                steps_per_loop=self.options.steps_per_loop,
                log_every_steps=self.options.log_every_steps,
                auto_loop=self.auto_loop,
                limits=[action.limit for action in self.actions],
            )
            self.host_call = (current, chunk)
            self._call("before_steps", current)
            started = time.perf_counter()
            output = step(batches, chunk)
            elapsed = time.perf_counter() - started
            self.auto_loop.observe(chunk, elapsed)
            self.host_calls += 1
            self._check_finite(phase, output.nonfinite, current + chunk)
            done += chunk
            speed = {
                "examples_per_second": self.options.batch_size * chunk / elapsed,
                "step_time_ms": 1000.0 * elapsed / chunk,
            }
            rows = [_row(step.log_columns, values) for values in output.rows]
            self._call("on_steps", phase, self._step(), rows, speed, output.nonfinite)
        return time.perf_counter() - loop_started

    def _finish(self, results: dict) -> None:
        self.state.phase.assign(len(self.plan))
        if self.resume_from:  # the checkpoint was of a finished run: only its results count
            self.checkpoints.track(
                model=self.model,
                step=self.global_step,
                state=self.state,
                actions=self.action_states,
            )
            self._restore(self.resume_from)
            results["phases"] = self.state.finished_phases()
        else:
            if self.last_step is not None and self.last_step.averages:
                # From here on the model holds the averaged weights: the final checkpoint,
                # the digest and the export (of the last weights) are of those.
                self.last_step.swap_averages()
            self._save()
        results["nonfinite_steps_skipped"] = int(self.state.nonfinite_steps.numpy())
        results["weights_sha256"] = weights_digest(self.model)
        self._call("on_run_end", results)

    # The pieces.

    def _step(self) -> int:
        return int(self.global_step.numpy())

    def _call(self, hook: str, *args) -> None:
        """Calls `hook` on every action in order, applying each one's signals as it returns."""
        for action in self.actions:
            self._apply(getattr(action, hook)(*args))

    def _apply(self, returned: Signals) -> None:
        for signal in signals_of(returned):
            if signal is Signal.SAVE:
                self._save()
            elif signal is Signal.STOP_PHASE:
                self.stop_phase = True
            elif signal is Signal.CALLBACK_STOP:
                self.stop_phase = "callback"
            elif signal is Signal.STOP_RUN:
                self.stop_requested = True
            elif signal is Signal.INTERRUPT:
                raise Stopped()  # _save_when_stopped saves first
            else:
                raise TypeError(f"an action returned {signal!r}; accepted: tlloop.actions.Signal")

    def _save(self) -> None:
        """Saves the run's checkpoint at the current global step."""
        step = self._step()
        self.checkpoints.save(step)
        self.last_saved = time.monotonic()
        logging.info("checkpoint saved at step %d", step)

    def _restore(self, path: str) -> None:
        """Restores everything tracked from `path`; a stateful action whose state the
        checkpoint does not hold (an older tlloop's layout) reads it from there itself."""
        missing = self.checkpoints.restore(path)
        for action in self.actions:
            if action.state_key in missing:
                action.restore_old(path)

    def _set_trainability(self, phase, stage: int) -> None:
        phase_lib.apply_trainability(self.model, phase, stage)
        # BatchNorm that uses batch statistics must see the global batch, not a replica's.
        phase_lib.synchronize_batch_norm(
            self.model, phase.modes.train.backbone and self.strategy.num_replicas_in_sync > 1
        )

    def _new_step(self, phase, use_cache: bool) -> CompiledSteps:
        """A fresh optimizer and compiled training steps for the current trainable set, and the
        checkpoint tracking them."""
        compiled = build_train_step(
            self.model,
            phase,
            self.task,
            self.options,
            metrics=self.train_metrics,
            global_step=self.global_step,
            steps_per_epoch=self.steps_per_epoch,
            features_in=use_cache,
            anchors=self.anchors,
        )
        self.checkpoints.track(
            model=self.model,
            optimizer=compiled.optimizer,
            accumulators=compiled.accumulators,
            averages=compiled.averages,
            step=self.global_step,
            state=self.state,
            metrics=self.train_metrics.variables,
            rng=checkpoint_lib.rng_states(self.model),
            anchors=self.anchors.variables,
            actions=self.action_states,
        )
        self.last_step = compiled
        self.auto_loop = AutoLoop()  # a new step traces in its first call: measured afresh
        return compiled

    def _evaluate(self, step: CompiledSteps, evaluator) -> dict:
        with averaged(step):  # the moving averages, when kept
            return self._measure(evaluator)

    def _measure(self, evaluator) -> dict:
        """The evaluation metrics of the model's weights as they are, over `evaluator`'s
        batches with its eval step."""
        eval_step, batches = evaluator
        self.eval_metrics.reset()
        eval_step(iter(batches), self.eval_steps)
        return self.eval_metrics.result()

    def evaluate_now(self) -> dict:
        """RunView.evaluate: the model as it is, on the evaluation images."""
        return self._measure((self.eval_step, self.inputs.eval_batches))

    def evaluated_weights(self):
        """RunView.evaluated_weights: the model holds the weights last evaluated."""
        return averaged(self.last_step)

    def _drift(self, step: CompiledSteps) -> dict[str, float]:
        """Per backbone layer, how far the weights evaluated moved from w0 (relative)."""
        with averaged(step):
            return self.anchors.drift()

    def _check_finite(self, phase, nonfinite, step: int) -> None:
        if not len(nonfinite):
            return
        if self.options.nan_policy == "stop":
            last = checkpoint_lib.latest(self.checkpoints.directory)
            bad = int(nonfinite[0])
            where = f"at step {bad} ({phase.name} phase); no update was applied and the last "
            where += f"checkpoint ({last}) is intact"
            raise RunFailed(
                "nan_policy",
                "stop",
                f"the loss or a gradient is NaN or Inf {where}",
                f"a lower ${phase.name}.learning_rate, clean data, or $nan_policy=skip_step to "
                "skip such steps",
            )
        self.state.nonfinite_steps.assign_add(len(nonfinite))
        logging.warning(
            "nan_policy=skip_step: NaN/Inf at step(s) %s: no update applied (%d so far)",
            ", ".join(str(int(s)) for s in nonfinite),
            int(self.state.nonfinite_steps.numpy()),
        )

    def _resume_stage(self, phase) -> int:
        """The gradual-unfreeze stage a resumed phase was in (0 otherwise)."""
        if not (self.resume_from and phase.config.gradual):
            return 0
        return self.epochs.stage(self.start_step, self.resume_phase_start)

    @contextlib.contextmanager
    def _save_when_stopped(self):
        """Saves a checkpoint at the current step when the run is stopped (Stopped, SIGINT, a
        callback that raised). All arrive between host calls: the state saved is that of whole
        steps."""
        try:
            yield
        except (Stopped, KeyboardInterrupt, CallbackError):
            if self.in_epoch:
                self._save()
            raise


def _row(columns: tuple[str, ...], values) -> dict:
    row = dict(zip(columns, (float(v) for v in values), strict=True))
    row["step"] = int(row["step"])
    return row


def weights_digest(model: keras.Model) -> str:
    """SHA-256 of every weight (RNG states excluded), in order: equal iff the weights are."""
    digest = hashlib.sha256()
    for variable in model.weights:
        if "seed_generator" not in variable.path:
            digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()
