"""The controller: the loop over phases, epochs and host calls, and the run's state.

It reads top to bottom: `run` -> `_run_phase` -> `_run_epoch` -> `_run_steps`. It owns the
run's position (phase, gradual-unfreeze stage, global step, the resume point) and the compiled
steps; everything else (checkpoint cadence, best model and early stopping, summaries, profiler,
console, Keras callbacks) is an action called at named points (see `tlloop.actions`). All state
is created under the strategy's scope; in a cluster every task runs the same loop (reading a
metric is a collective) and only the chief's actions write.
"""

from __future__ import annotations

import contextlib
import hashlib
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tlloop import adabn, feature_cache
from tlloop import anchors as anchors_lib
from tlloop import checkpoints as checkpoint_lib
from tlloop import phases as phase_lib
from tlloop.actions import Action, Checkpointer, Stopped
from tlloop.data.examples import BatchStream, Examples
from tlloop.errors import CallbackError, RunFailed
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
    train and eval metrics; the best evaluation when a BestKeeper is among the actions; the
    SHA-256 of the final weights, equal on every task of a cluster).
    """

    def __init__(
        self,
        *,
        model: TransferModel,
        task: Task,
        train: Examples,
        eval_data: Examples,
        plan: list[phase_lib.Phase],
        settings: StepOptions,
        strategy: tf.distribute.Strategy,
        checkpoints: checkpoint_lib.Checkpoints,
        actions: list[Action],
        distribute,
        train_writer=None,
    ) -> None:
        self.model, self.task, self.plan = model, task, plan
        self.train, self.eval = train, eval_data
        self.settings, self.strategy = settings, strategy
        self.checkpoints, self.actions, self.distribute = checkpoints, actions, distribute
        self.train_writer = train_writer or contextlib.nullcontext()
        self.steps_per_epoch = -(-train.size // settings.batch_size)
        self.eval_steps = eval_data.eval_steps(settings.eval_batch_size)
        self.total_epochs = sum(phase.config.epochs for phase in plan)
        self.preview = train.preview()
        # Outside the strategy's scope: the same on every task, and a distributed string
        # variable cannot be broadcast by MultiWorkerMirroredStrategy.
        self.state = checkpoint_lib.RunState()
        self.host_call = (0, 1)  # the last host call's (first global step, steps)
        self.stop_requested = False  # set by an action: end the run after the host call
        # Set by an action: end the phase after this epoch (True), or, "callback" (a Keras
        # callback set model.stop_training), after the host call under way and its evaluation.
        self.stop_phase: bool | str = False
        self.report = ""
        self.epoch_seconds = []  # each epoch's training loop, the phase under way
        self.in_epoch = False  # from an epoch's first host call to its last action
        self.auto_loop = AutoLoop()
        self.host_calls = 0  # train-step calls of the phase under way
        self.epoch_number = self.epoch_start_step = self.epoch_offset = 0
        found = [a for a in actions if isinstance(a, Checkpointer)]
        if len(found) != 1:
            raise ValueError("actions: exactly one Checkpointer saves the run's checkpoints")
        self.checkpointer = found[0]
        for action in actions:
            action.controller = self

    # The run, top to bottom.

    def run(self) -> dict:
        resume_from = self.checkpoints.resume_point()  # the newest intact one, verified
        start_phase, start_step = checkpoint_lib.position(resume_from) if resume_from else (0, 0)
        if resume_from:
            self.checkpoints.check(resume_from, self.model)
            where = (
                f"phase {start_phase + 1} of {len(self.plan)}"
                if start_phase < len(self.plan)
                else "finished run"
            )
            logging.info("resuming from %s: %s, step %d", resume_from, where, start_step)
        self.resume_from, self.start_step = resume_from, start_step
        with self.strategy.scope():
            self._make_state()
            self.epoch_number = self._epochs_before(start_phase, start_step, resume_from)
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
                        batch_size=self.settings.eval_batch_size,
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
            jit_compile=self.settings.jit_compile,
            task=self.task,
        )
        self.eval_batches = self._distributed_eval(self.eval)
        self.feature_eval_step = None  # made when a phase first trains on cached features
        self.stream = BatchStream(
            self.train, self.distribute, self.settings.batch_size, self.settings.seed
        )
        self.last_step: CompiledSteps | None = None
        # w0, the backbone as it starts: a resumed run restores the first start's.
        self.anchors = anchors_lib.Anchors(self.model.backbone)

    def _distributed_eval(self, examples: Examples):
        size = self.settings.eval_batch_size
        return self.distribute(
            lambda part: examples.eval_batches(size, part), examples.positionable, size
        )

    def _run_phase(self, phase: phase_lib.Phase, results: dict) -> None:
        self._set_trainability(phase, self._resume_stage(phase))
        self.report = phase_lib.trainability_report(self.model, phase)
        logging.info("mode table:\n%s", phase.modes.to_text())
        logging.info("trainability:\n%s", self.report)
        self._call("on_phase_begin", phase)
        use_cache, cache_reason = self._feature_cache(phase)
        self.stop_phase = False
        self.host_calls = 0
        step = self._new_step(phase, use_cache)
        if self.resume_from:
            self.checkpoints.restore(self.resume_from)
            results["phases"] = self.state.finished_phases()
            self.resume_from = None
            if len(results["phases"]) > phase.index:
                return  # the checkpoint was this phase's last
        else:
            self.state.start_phase(phase.index, self._step())
            self.checkpointer.save()
        evaluator = (self.eval_step, self.eval_batches)
        if use_cache:
            cached = feature_cache.compute(self.model, self.train, self.eval)
            cached_stream = BatchStream(
                cached.train, self.distribute, self.settings.batch_size, self.settings.seed
            )
            batches = cached_stream.at(self._step())
            self.feature_eval_step = self.feature_eval_step or compile_eval(
                self.model,
                phase.modes,
                self.eval_metrics,
                jit_compile=self.settings.jit_compile,
                features_in=True,
                task=self.task,
            )
            evaluator = (self.feature_eval_step, self._distributed_eval(cached.eval))
            cache_reason += f"; computed in {cached.seconds:.2f} s"
        else:
            batches = self.stream.at(self._step())
        logging.info("%s phase feature cache: %s", phase.name, cache_reason)
        # With jit_compile: XLA's scope (the whole step or the gradients), before any batch is read.
        step.choose_xla(batches.element_spec)
        first_epoch, offset = self._resume_epoch()
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
        if not use_cache:
            self.stream.ran_to(self._step())
        if eval_result is None:  # resumed after the phase's evaluated last step
            train_result = self.train_metrics.result()
            eval_result = self._evaluate(step, evaluator)
        result = {
            "name": phase.name,
            "epochs": phase.config.epochs,
            "epochs_run": epochs_run,  # fewer when stopped early (the last may be partial)
            "stopped_early": stopped_early,
            "feature_cache": cache_reason,
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
        self.checkpointer.save()  # the end of the phase
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
            chunk = self._chunk(current, count - done)
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
                "examples_per_second": self.settings.batch_size * chunk / elapsed,
                "step_time_ms": 1000.0 * elapsed / chunk,
            }
            rows = [_row(step.log_columns, values) for values in output.rows]
            self._call("on_steps", phase, self._step(), rows, speed, output.nonfinite)
        return time.perf_counter() - loop_started

    def _chunk(self, current: int, remaining: int) -> int:
        """The steps of the next host call from global step `current`: `remaining` (the
        epoch's, so an evaluation ends a call) cut by steps_per_loop and by every action."""
        if self.settings.steps_per_loop == "auto":
            chunk = min(remaining, self.auto_loop.steps())
            every = self.settings.log_every_steps
            if every:  # a logged row reaches the host (console, callbacks) as it is made
                chunk = min(chunk, every - current % every)
        else:
            chunk = min(remaining, self.settings.steps_per_loop)
        for action in self.actions:
            chunk = action.limit(current, chunk)
        return chunk

    def _finish(self, results: dict) -> None:
        self.state.phase.assign(len(self.plan))
        if self.resume_from:  # the checkpoint was of a finished run: only its results count
            self.checkpoints.track(model=self.model, step=self.global_step, state=self.state)
            self.checkpoints.restore(self.resume_from)
            results["phases"] = self.state.finished_phases()
        else:
            if self.last_step is not None and self.last_step.averages:
                # From here on the model holds the averaged weights: the final checkpoint,
                # the digest and the export (of the last weights) are of those.
                self.last_step.swap_averages()
            self.checkpointer.save()
        results["nonfinite_steps_skipped"] = int(self.state.nonfinite_steps.numpy())
        results["weights_sha256"] = weights_digest(self.model)
        self._call("on_run_end", results)

    # The pieces.

    def _step(self) -> int:
        return int(self.global_step.numpy())

    def _call(self, hook: str, *args) -> None:
        for action in self.actions:
            getattr(action, hook)(*args)

    def _set_trainability(self, phase, stage: int) -> None:
        phase_lib.apply_trainability(self.model, phase, stage)
        # BatchNorm that uses batch statistics must see the global batch, not a replica's.
        phase_lib.synchronize_batch_norm(
            self.model, phase.modes.train.backbone and self.strategy.num_replicas_in_sync > 1
        )

    def _feature_cache(self, phase) -> tuple[bool, str]:
        """(train this phase on cached features?, the reason logged)."""
        mixing = mixing_of(self.settings)
        return feature_cache.decide(
            self.settings.feature_cache,
            backbone_frozen=phase.config.unfreeze.kind == "none",
            backbone_training=phase.modes.train.backbone,
            augmenting=phase.modes.train.augment and _augments(self.model),
            mixing=mixing.describe() if mixing else "",
            model=self.model,
            train=self.train,
            eval_data=self.eval,
            eval_batch_size=self.settings.eval_batch_size,
        )

    def _new_step(self, phase, use_cache: bool) -> CompiledSteps:
        """A fresh optimizer and compiled training steps for the current trainable set, and the
        checkpoint tracking them."""
        compiled = build_train_step(
            self.model,
            phase,
            self.task,
            self.settings,
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
        )
        self.last_step = compiled
        self.auto_loop = AutoLoop()  # a new step traces in its first call: measured afresh
        return compiled

    def _evaluate(self, step: CompiledSteps, evaluator) -> dict:
        eval_step, batches = evaluator
        with averaged(step):  # the moving averages, when kept
            self.eval_metrics.reset()
            eval_step(iter(batches), self.eval_steps)
            return self.eval_metrics.result()

    def _drift(self, step: CompiledSteps) -> dict[str, float]:
        """Per backbone layer, how far the weights evaluated moved from w0 (relative)."""
        with averaged(step):
            return self.anchors.drift()

    def _check_finite(self, phase, nonfinite, step: int) -> None:
        if not len(nonfinite):
            return
        if self.settings.nan_policy == "stop":
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
            "--nan_policy=skip_step: NaN/Inf at step(s) %s: no update applied (%d so far)",
            ", ".join(str(int(s)) for s in nonfinite),
            int(self.state.nonfinite_steps.numpy()),
        )

    def _resume_stage(self, phase) -> int:
        """The gradual-unfreeze stage a resumed phase was in (0 otherwise)."""
        if not (self.resume_from and phase.config.gradual):
            return 0
        _, step = checkpoint_lib.position(self.resume_from)
        done = step - checkpoint_lib.phase_start(self.resume_from)
        return max(done - 1, 0) // self.steps_per_epoch

    def _resume_epoch(self) -> tuple[int, int]:
        """(first epoch, steps of it already done) of the phase under way."""
        start = int(self.state.phase_start.numpy())
        done = self._step() - start
        first_epoch, offset = divmod(done, self.steps_per_epoch)
        if done and not offset and int(self.state.evaluated_step.numpy()) != self._step():
            # Resumed after an epoch's last step but before its evaluation: evaluate it.
            first_epoch, offset = first_epoch - 1, self.steps_per_epoch
        return first_epoch, offset

    def _epochs_before(self, phase_index: int, step: int, resume_from) -> int:
        """Epochs finished before the resume point, counted across phases (Keras' epoch
        numbers for callbacks)."""
        if not resume_from or phase_index >= len(self.plan):
            return sum(p.config.epochs for p in self.plan[:phase_index])
        done = step - checkpoint_lib.phase_start(resume_from)
        return sum(p.config.epochs for p in self.plan[:phase_index]) + done // self.steps_per_epoch

    @contextlib.contextmanager
    def _save_when_stopped(self):
        """Saves a checkpoint at the current step when the run is stopped (Stopped, SIGINT, a
        callback that raised). All arrive between host calls: the state saved is that of whole
        steps."""
        try:
            yield
        except (Stopped, KeyboardInterrupt, CallbackError):
            if self.in_epoch:
                self.checkpointer.save()
            raise


class AutoLoop:
    """How many steps the next host call of a compiled step may run under steps_per_loop
    "auto": one while the step is new (its first call traces, its second is timed), then as
    many as take about `seconds` at the last call's speed, at most `max_steps`. The bound
    keeps a call short enough for the console, a SIGTERM and the checkpoint clock, which
    are served between calls; the results do not depend on it (every step is the same)."""

    seconds = 1.0
    max_steps = 1000

    def __init__(self) -> None:
        self.calls = 0
        self.step_seconds = 0.0

    def steps(self) -> int:
        if self.calls < 2 or self.step_seconds <= 0:
            return 1
        return max(1, min(self.max_steps, int(self.seconds / self.step_seconds)))

    def observe(self, steps: int, seconds: float) -> None:
        """Records a host call of `steps` steps that took `seconds`."""
        self.calls += 1
        if self.calls >= 2:  # the first call's time is mostly tracing
            self.step_seconds = seconds / steps


def _row(columns: tuple[str, ...], values) -> dict:
    row = dict(zip(columns, (float(v) for v in values), strict=True))
    row["step"] = int(row["step"])
    return row


def _augments(model: TransferModel) -> bool:
    """True if the augment submodule holds any layer that changes its input."""
    return bool(phase_lib.leaf_layers(model.augment)) and not all(
        isinstance(layer, (keras.layers.InputLayer, keras.layers.Identity))
        for layer in phase_lib.leaf_layers(model.augment)
    )


def weights_digest(model: keras.Model) -> str:
    """SHA-256 of every weight (RNG states excluded), in order: equal iff the weights are."""
    digest = hashlib.sha256()
    for variable in model.weights:
        if "seed_generator" not in variable.path:
            digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()
