"""The library's front: `Trainer` trains any TransferModel on any data through a phase plan.

`Trainer(workdir, phases=..., task=..., callbacks=...).fit(model, train, eval_data)` is what a
script or a notebook calls; the command line (`tlloop.cli.experiment`) builds the data and the
model from its flags and runs the same `Trainer`. Everything that can
fail on bad input is checked before the workdir is touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tlloop import actions as action_lib
from tlloop import checkpoints as checkpoint_lib
from tlloop import config as config_lib
from tlloop import phases as phase_lib
from tlloop import tflite as tflite_lib
from tlloop import wise_ft
from tlloop.actions import Stopped
from tlloop.config import (
    CheckpointConfig,
    ConfigError,
    LoggingConfig,
    PhaseConfig,
    TrainingConfig,
)
from tlloop.controller import Controller, averaged, weights_digest
from tlloop.data.examples import Examples, as_examples
from tlloop.data.images import ACCEPTED_IMAGES
from tlloop.data.streaming import find_unreadable
from tlloop.distribute import cluster_task, describe, distribute_batches, is_chief
from tlloop.errors import RunFailed
from tlloop.export import ExportError, check_export, export_model
from tlloop.models import TransferModel
from tlloop.models.walk import declared_input_spec
from tlloop.steps import StepOptions
from tlloop.summaries import Summaries
from tlloop.tasks import Classification, Task
from tlloop.workdir import CONFIG_FILE, prepare, release, write_json

__all__ = [
    "FitInputs",
    "Results",
    "Stopped",
    "Trainer",
    "averaged",
    "weights_digest",
]


class Results(dict):
    """What `Trainer.fit` returns (and writes to WORKDIR/results.json): a dict with attribute
    access to its main parts: `phases` (per phase: name, epochs, last_step, seconds, stopped
    early, the feature cache decision, last train and eval metrics), `best` (metric, value,
    step), `export` (which weights, and the paths written), `weights_sha256`."""

    @property
    def phases(self) -> list[dict]:
        return self["phases"]

    @property
    def best(self) -> dict:
        return self["best"]

    @property
    def export(self) -> dict | None:
        return self.get("export")

    @property
    def weights_sha256(self) -> str:
        return self["weights_sha256"]


class Trainer:
    """Trains a `TransferModel` through `phases` (each a `PhaseConfig`: epochs, learning rate
    or optimizer, what unfreezes, BatchNorm mode), with the `task`'s loss and metrics
    (default: `Classification()`), the user's Keras `callbacks`, under `strategy` (default: the
    strategy of the current scope; create the model under the same scope). Outputs go to
    `workdir`: checkpoints (a call on a workdir that holds a run resumes it), TensorBoard,
    metrics.jsonl, the best checkpoint, the export and results.json.

    `training`, `checkpoint` and `logging` are the same option objects the command line fills
    from its flags; `jit_compile`, `steps_per_loop`, `nan_policy`, `feature_cache` and
    `deterministic` likewise. `resize` is how the exported SavedModel resizes served images
    ("squash", "crop", "pad"). Raises ValueError/TypeError naming the argument at fault.
    """

    def __init__(
        self,
        workdir: str,
        *,
        phases: Sequence[PhaseConfig],
        task: Task | None = None,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        strategy: tf.distribute.Strategy | None = None,
        seed: int = 0,
        training: TrainingConfig | None = None,
        checkpoint: CheckpointConfig | None = None,
        logging: LoggingConfig | None = None,
        jit_compile: bool = False,
        steps_per_loop: int | str = "auto",
        nan_policy: str = "stop",
        feature_cache: str = "auto",
        deterministic: bool = False,
        overwrite: bool = False,
        resize: str = "squash",
        mixed_float16: bool = False,
    ) -> None:
        if not workdir:
            raise ValueError("workdir: empty; accepted: a directory path")
        phases = tuple(phases)
        if not phases or not all(isinstance(p, PhaseConfig) for p in phases):
            raise TypeError("phases: accepted: a non-empty sequence of tlloop.Phase")
        if not any(p.epochs for p in phases):
            raise ValueError("phases: every phase has 0 epochs, nothing would train")
        if task is not None and not isinstance(task, Task):
            raise TypeError(f"task: {type(task).__name__} is not a tlloop.Task")
        self.workdir = workdir
        self.phases = phases
        self.task = task or Classification()
        self.callbacks = action_lib.KerasCallbacks(callbacks)  # checks them
        self.strategy = strategy
        self.seed = seed
        self.training = training or TrainingConfig()
        self.checkpoint = checkpoint or CheckpointConfig()
        self.logging = logging or LoggingConfig()
        steps_per_loop = config_lib.parse_steps_per_loop(steps_per_loop)
        self.finetune_index = wise_ft.finetune_index(self.checkpoint, phases)
        self.options = dict(
            jit_compile=jit_compile,
            steps_per_loop=steps_per_loop,
            nan_policy=nan_policy,
            feature_cache=feature_cache,
            mixed_float16=mixed_float16,
        )
        for name, value, accepted in (
            ("nan_policy", nan_policy, config_lib.NAN_POLICIES),
            ("feature_cache", feature_cache, config_lib.FEATURE_CACHE),
            ("resize", resize, config_lib.RESIZE_MODES),
        ):
            if value not in accepted:
                raise ConfigError(name, repr(value), "unknown", ", ".join(accepted))
        self.deterministic = deterministic
        self.overwrite = overwrite
        self.resize = resize

    def fit(
        self,
        model: TransferModel,
        train,
        eval_data,
        *,
        batch_size: int = 32,
        eval_batch_size: int = 0,
        export: bool = True,
    ) -> Results:
        """Trains `model` on `train` through the phases, evaluating on `eval_data` after every
        epoch; exports at the end (unless `export` is False), after which `model` holds the
        exported weights: the best evaluation's, or the last with `checkpoint.export="last"`, or
        the chosen interpolation with `checkpoint.wise_ft` (see `tlloop.wise_ft`).
        Data: (inputs, labels) arrays, a
        finite `tf.data.Dataset` of (inputs, label) pairs (batched or not: see
        `tlloop.data.examples.batching`), or tlloop `Examples`; see `tlloop.data.examples` for
        which can be positioned for exact resume.

        Before anything is written: the inputs are checked, and with `export` so is the export
        (`tlloop.export.check_export`: every class of the model registered with Keras and
        serializable; a backbone that declares no inputs is served the training inputs'
        spec). results.json and the checkpoints are written before the export, so an export
        that still fails (RunFailed naming the files not written) loses nothing."""
        run = self._prepare(model, train, eval_data, batch_size, eval_batch_size, export)
        try:
            prepare(self.workdir, None, overwrite=self.overwrite)  # takes the workdir's lock
            # The record the command line keeps in flags.txt: config.json, HParams, a text.
            record = self._record(run, export=export)
            if is_chief(self.strategy or tf.distribute.get_strategy()):
                write_json(os.path.join(self.workdir, CONFIG_FILE), record)
            text = json.dumps(record, indent=1)
            return self._run(
                run,
                export=export,
                hparams=_hparams(record),
                texts=[("config", f"```\n{text}\n```")],
            )
        finally:
            release(self.workdir)

    def _record(self, run: FitInputs, *, export: bool = True) -> dict:
        """Every argument of this Trainer and its fit, resolved, as JSON values: the phases,
        the task (its class, settings, metrics, best metric and class names), the option
        objects, the model's class and size, the data's sizes (WORKDIR/config.json)."""
        task = self.task
        return {
            "trainer": {
                "workdir": self.workdir,
                "seed": self.seed,
                "strategy": describe(self.strategy or tf.distribute.get_strategy()),
                "callbacks": [type(c).__name__ for c in self.callbacks.callbacks],
                "training": _jsonable(self.training),
                "checkpoint": _jsonable(self.checkpoint),
                "logging": _jsonable(self.logging),
                **self.options,
                "deterministic": self.deterministic,
                "overwrite": self.overwrite,
                "resize": self.resize,
            },
            "phases": [
                {
                    **{
                        f.name: _jsonable(getattr(p, f.name))
                        for f in dataclasses.fields(p)
                        if f.name not in ("optimizer", "modes")
                    },
                    "optimizer": p.optimizer and _jsonable(keras.optimizers.serialize(p.optimizer)),
                    "modes": p.modes and p.modes.to_text(),
                }
                for p in self.phases
            ],
            "task": {
                "class": type(task).__name__,
                **{k: _jsonable(v) for k, v in vars(task).items() if _plain(k, v)},
                "metrics": list(task.metric_names),
                "best_metric": str(self.checkpoint.best_metric.resolved(task.best_metric)),
            },
            "class_names": _jsonable(
                getattr(task, "class_names", None) or getattr(task, "target_names", None)
            ),
            "model": {
                "class": type(run.model).__name__,
                "backbone": run.model.backbone.name,
                "parameters": int(run.model.count_params()),
            },
            "fit": {
                "batch_size": run.batch_size,
                "eval_batch_size": run.eval_batch_size,
                "export": export,
                "train_size": run.train.size,
                "eval_size": run.eval.size,
            },
        }

    def describe(self, model: TransferModel) -> str:
        """Markdown: each phase's mode table and what it trains in `model` (trainable and
        non-trainable parameters, BatchNorm layers and their mode per submodule, the backbone
        layers that train by name, those it holds but never uses), as the run logs them at
        each phase start. The model's trainability is left as it was."""
        plan = phase_lib.plan_phases(self.phases, model)
        parts = []
        with phase_lib.kept_trainability(model):
            for phase in plan:
                phase_lib.apply_trainability(model, phase)
                report = phase_lib.trainability_report(model, phase)
                parts += [report, "", phase.modes.to_text(), ""]
        return "\n".join(parts)

    # A fit in two parts: its inputs checked (nothing written), then the run.

    def _prepare(
        self, model, train, eval_data, batch_size: int, eval_batch_size: int, export: bool = False
    ):
        if not isinstance(model, TransferModel):
            raise TypeError(
                f"model: {type(model).__name__} is not a tlloop.TransferModel; accepted: "
                "TransferModel(backbone, head, augment=None)"
            )
        if batch_size < 1 or eval_batch_size < 0:
            raise ValueError(f"batch_size={batch_size}, eval_batch_size={eval_batch_size}")
        auto = [p.name for p in self.phases if p.learning_rate == config_lib.AUTO_RATE]
        if auto:
            raise ConfigError(
                "phases",
                problem=f"{auto[0]!r} has learning_rate='auto', which only build_experiment "
                "($head_lr=auto) resolves",
                accepted="a rate > 0 (tlloop.lr_range.range_test suggests one)",
            )
        for name in ("label_smoothing", "class_weights"):  # the CLI gives them to its task
            value = getattr(self.training, name)
            if value:
                raise ConfigError(
                    f"training.{name}",
                    repr(value),
                    "the task's loss applies it, not the trainer",
                    f"{type(self.task).__name__}({name}={value!r}) "
                    f"(tlloop.Classification or tlloop.MultiLabel), and training.{name} unset",
                )
        if self.deterministic:
            tf.config.experimental.enable_op_determinism()
        declared = declared_input_spec(model.backbone)
        train = as_examples(train, argument="train", inputs=declared)
        _check_mixing(self.training, self.task, train)
        eval_data = as_examples(eval_data, argument="eval_data", inputs=declared)
        self.task.checked_best_metric(self.checkpoint.best_metric)
        plan = phase_lib.plan_phases(self.phases, model, train.element_spec[0])
        serving = serving_inputs(train)
        if export:  # decided now: an export refused after training would cost the whole run
            check_export(model, serving)
            if self.checkpoint.export_tflite:  # as the CLI refuses it before training
                try:
                    tflite_lib.check_model(model, self.task)
                except ValueError as error:
                    formats = ",".join(self.checkpoint.export_tflite)
                    raise ValueError(f"checkpoint.export_tflite={formats}: {error}") from None
        return FitInputs(
            model, train, eval_data, plan, batch_size, eval_batch_size or batch_size, serving
        )

    def run(self, inputs: FitInputs, **options) -> Results:
        """Runs inputs its caller checked already (the command line's path: its flags were
        checked before the workdir was prepared); `options` as `fit` passes them (stop,
        flags_text, hparams, header, texts, scalars)."""
        return self._run(inputs, **options)

    def _run(
        self,
        run: FitInputs,
        *,
        export: bool = True,
        stop: threading.Event | None = None,
        flags_text: str = "",
        hparams: dict | None = None,
        header: dict | None = None,
        texts: Sequence[tuple[str, str]] = (),
        scalars: dict | None = None,
    ) -> Results:
        strategy = self.strategy or tf.distribute.get_strategy()
        chief = is_chief(strategy)
        logging.info("strategy: %s", describe(strategy))
        task = self.task.prepared(run.train)
        directory = os.path.join(self.workdir, "checkpoints")
        checkpoints = checkpoint_lib.Checkpoints(directory, keep=self.checkpoint.keep, chief=chief)
        best = checkpoint_lib.Checkpoints(
            os.path.join(directory, checkpoint_lib.BEST), keep=1, chief=chief
        )
        summaries = Summaries(self.workdir, enabled=chief and self.logging.summaries)
        keeper = action_lib.BestKeeper(
            self.checkpoint.best_metric.resolved(task.best_metric),  # "auto": the task's
            best,
        )
        class_names = getattr(task, "class_names", None)
        writer = action_lib.SummaryWriter(
            summaries,
            class_names,
            hparams=hparams,
            texts=[("flags", f"```\n{flags_text}```")] * bool(flags_text) + list(texts),
            scalars=scalars,
        )
        actions = [
            writer,
            action_lib.Checkpointer(
                every_steps=self.checkpoint.every_steps,
                # Tasks of a cluster must save together, and their clocks do not agree.
                every_secs=self.checkpoint.every_secs if cluster_task(strategy) is None else 0.0,
                stop=stop,
            ),
            keeper,
            *action_lib.EarlyStopping.of(keeper.metric, self.checkpoint.early_stopping_patience),
            *self._wise_ft(directory, summaries, chief, keeper.metric),
            action_lib.Progress(verbose=chief and not self.logging.quiet),
            self.callbacks,
        ]
        actions += self.profiler(writes=summaries.enabled)
        actions += action_lib.FaultHook.from_environment()
        options = self.step_options(run.batch_size, run.eval_batch_size)
        controller = None
        try:
            controller = Controller(
                model=run.model,
                task=task,
                train=run.train,
                eval_data=run.eval,
                plan=run.plan,
                options=options,
                strategy=strategy,
                checkpoints=checkpoints,
                actions=actions,
                distribute=lambda batches, positionable, size: distribute_batches(
                    strategy, batches, positionable=positionable, batch_size=size
                ),
                train_writer=summaries.default("train"),
            )
            outcome = controller.run()
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
            # A streamed image that starts like one but does not decode (or that was deleted
            # since the run started) is met only when read.
            first, steps = controller.host_call if controller else (0, 1)
            found = find_unreadable(
                run.train,
                run.eval,
                step=first,
                steps=steps,
                batch_size=run.batch_size,
                seed=self.seed,
            )
            if found is None:
                raise
            last = checkpoint_lib.latest(directory)
            raise ConfigError(
                f"{found}; accepted: {ACCEPTED_IMAGES}, or $bad_images=skip (which decodes "
                "every image before training) to leave it out; "
                + (
                    f"the last checkpoint is intact ({last}): the same command resumes from it"
                    if last
                    else "no checkpoint was written yet: the same command starts afresh"
                )
            ) from None
        finally:
            for action in actions:
                if isinstance(action, action_lib.Profiler):
                    action.on_run_end({})
            summaries.close()
        results = Results(
            {
                **(header or {}),
                "train_size": run.train.size,
                "eval_size": run.eval.size,
                "replicas": strategy.num_replicas_in_sync,
                **outcome,
                "best": keeper.summary(),
            }
        )
        logging.info("final weights sha256: %s", results["weights_sha256"])
        if chief:
            path = os.path.join(self.workdir, "results.json")
            _read_best(best, results)
            # Written before the export too: an export that fails leaves the run's results.
            write_json(path, dict(results))
            if export:
                results["export"] = self._export_best(run.model, task, best, results, run)
                write_json(path, dict(results))
        return results

    def _wise_ft(self, directory: str, summaries, chief: bool, metric) -> list[wise_ft.WiseFT]:
        """The WiSE-FT action of `checkpoint.wise_ft` (theta_LP in WORKDIR/checkpoints/lp),
        choosing by `metric` (the BestKeeper's)."""
        options = self.checkpoint
        if not options.wise_ft:
            return []
        lp = checkpoint_lib.Checkpoints(os.path.join(directory, wise_ft.LP), keep=1, chief=chief)
        return [
            wise_ft.WiseFT(
                options.wise_ft,
                options.wise_ft_export,
                metric,
                finetune_index=self.finetune_index,
                lp=lp,
                summaries=summaries,
            )
        ]

    def profiler(self, *, writes: bool) -> list[action_lib.Profiler]:
        """The profiler action, if asked for and this task writes summaries (only the chief of
        a cluster does, and none with summaries off): a trace is a TensorBoard file."""
        if not (writes and self.logging.profile_steps):
            return []
        logdir = os.path.join(self.workdir, "tensorboard", "train")
        return [action_lib.Profiler(self.logging.profile_steps, logdir)]

    def step_options(self, batch_size: int, eval_batch_size: int) -> StepOptions:
        """How this trainer's compiled steps are made, for batches of `batch_size`."""
        return StepOptions(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size or batch_size,
            seed=self.seed,
            training=self.training,
            log_every_steps=self.logging.log_every_steps,
            histogram_every_steps=self.logging.histogram_every_steps,
            **self.options,
        )

    def _export_best(self, model, task, best, results: Results, run: FitInputs) -> dict:
        """Exports the best evaluation's weights (or the last, per `checkpoint.export`), and
        the TFLite files of `checkpoint.export_tflite`, checked on the run's evaluation images
        (int8 calibrated on its first training images)."""
        directory = os.path.join(self.workdir, "export")
        exported = {"weights": "last", "step": results["phases"][-1]["last_step"]}
        best_path = checkpoint_lib.latest(best.directory)
        wise = results.get("wise_ft_export")
        if wise:  # the model holds the chosen interpolation (tlloop.wise_ft)
            exported = {"weights": "wise_ft", "step": wise["theta_ft"]["step"]}
        elif self.checkpoint.export == "best" and best_path:
            tf.train.Checkpoint(model=model).restore(best_path).expect_partial()
            exported = {"weights": "best", "step": results["best"]["step"]}
        try:
            paths = export_model(
                model, directory, task=task, resize=self.resize, inputs=run.serving_inputs
            )
        except (ExportError, ValueError) as error:
            missing = getattr(error, "missing", ["model.keras", "backbone.keras", "saved_model"])
            reason = getattr(error, "reason", str(error))
            results["export"] = {**exported, "not_exported": missing, "error": reason}
            write_json(os.path.join(self.workdir, "results.json"), dict(results))
            raise RunFailed(
                f"export to {directory!r} failed: {', '.join(missing)} not written ({reason}); "
                "results.json and every checkpoint are written; accepted: the cause removed "
                "(free space and write access, or the model's classes made serializable), "
                "then the same call exports again"
            ) from None
        if self.checkpoint.export_tflite:
            exported = {**exported, **paths}
            paths["tflite"] = self._export_tflite(model, task, directory, run, results, exported)
        logging.info(
            "exported the %s weights (step %d) to %s",
            exported["weights"],
            exported["step"],
            directory,
        )
        return {**exported, **paths}

    def _export_tflite(self, model, task, directory, run: FitInputs, results, exported) -> dict:
        """The TFLite files of `checkpoint.export_tflite`, checked on the run's evaluation
        images (int8 calibrated on its first training images); prints a line per file. A
        failure still writes results.json (with the files that passed) before RunFailed."""
        options = self.checkpoint
        try:
            reports = tflite_lib.export_tflite(
                model,
                directory,
                options.export_tflite,
                images=tflite_lib.images_of(run.eval),
                representative=tflite_lib.images_of(run.train, options.tflite_calibration_images)
                if "int8" in options.export_tflite
                else None,
                task=task,
                resize=self.resize,
                min_agreement={
                    "float32": options.tflite_min_agreement,
                    "dynamic": options.tflite_min_agreement,
                    "int8": options.tflite_min_agreement_int8,
                },
            )
        except (OSError, tflite_lib.TFLiteError) as error:
            reason = getattr(error, "strerror", None) or error
            results["export"] = {
                **exported,
                "tflite": getattr(error, "reports", {}),
                "tflite_error": str(reason),
            }
            write_json(os.path.join(self.workdir, "results.json"), dict(results))
            converted = getattr(error, "converted", True)
            raise RunFailed(
                "export_tflite",
                problem=f"{reason}; the checkpoints and the other exports are intact",
                accepted="other formats"
                + (
                    ", or a lower threshold ($tflite_min_agreement, $tflite_min_agreement_int8)"
                    if converted
                    else ""
                ),
            ) from None
        for fmt, report in reports.items():
            print(f"tflite {tflite_lib.describe(fmt, report)}", flush=True)
        return reports


def _jsonable(value):
    """`value` as JSON values: dataclasses as dicts, sequences as lists, arrays as lists,
    other objects (an Unfreeze, a BestMetric) as their text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if isinstance(value, (config_lib.Unfreeze, config_lib.BestMetric)):
            return str(value)
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _plain(name: str, value) -> bool:
    """A task attribute the record shows: a public setting, not a function or metric."""
    return not name.startswith("_") and not callable(value) and not isinstance(value, dict)


def _hparams(record: dict) -> dict[str, str | int | float | bool]:
    """The HParams of a Trainer.fit's record (`Trainer._record`), flat: the training options, each
    phase's epochs, rate, unfreeze and BatchNorm mode, the task, the best metric, the batch."""
    flat = {
        "seed": record["trainer"]["seed"],
        "task": record["task"]["class"],
        "best_metric": record["task"]["best_metric"],
        "batch_size": record["fit"]["batch_size"],
    }
    for name, value in record["trainer"]["training"].items():
        flat[name] = value
    for phase in record["phases"]:
        rate = phase["learning_rate"] if phase["optimizer"] is None else "own optimizer"
        flat.update(
            {
                f"{phase['name']}_epochs": phase["epochs"],
                f"{phase['name']}_lr": rate,
                f"{phase['name']}_unfreeze": phase["unfreeze"],
                f"{phase['name']}_bn_mode": phase["bn_mode"],
            }
        )
    return {k: v for k, v in flat.items() if isinstance(v, (str, int, float, bool))}


@dataclasses.dataclass(frozen=True)
class FitInputs:
    """A fit's checked inputs: the model, the data as Examples, the planned phases, and what
    the SavedModel serves when the backbone declares no inputs (the training inputs' spec)."""

    model: TransferModel
    train: Examples
    eval: Examples
    plan: list[phase_lib.PlannedPhase]
    batch_size: int
    eval_batch_size: int
    serving_inputs: object = None


def serving_inputs(examples: Examples):
    """TensorSpecs of a batch of `examples`' inputs (any batch size), in their structure: what
    the SavedModel of a backbone that declares no inputs serves."""
    spec = examples.element_spec[0]
    return tf.nest.map_structure(lambda s: tf.TensorSpec((None, *s.shape), s.dtype), spec)


def _read_best(best, results: Results) -> None:
    """The best evaluation's step and value as its checkpoint holds them: the file is the
    truth (after a non-deterministic resume it may hold an evaluation the run's state never
    saw)."""
    best_path = checkpoint_lib.latest(best.directory)
    if best_path:
        results["best"].update(
            step=int(tf.train.load_variable(best_path, "step/.ATTRIBUTES/VARIABLE_VALUE")),
            value=float(tf.train.load_variable(best_path, "value/.ATTRIBUTES/VARIABLE_VALUE")),
        )


def _check_mixing(training: TrainingConfig, task: Task, train: Examples) -> None:
    """Refuses MixUp/CutMix, before anything is written, for a task whose loss is not linear
    in its labels (`Task.mixable`) or inputs that are not one numeric tensor of images."""
    name = training.mixing
    if not name:
        return
    value = getattr(training, name)
    if not task.mixable:
        raise ConfigError(
            f"training.{name}",
            value,
            f"a {type(task).__name__} task's loss of mixed labels is not its loss of their mix",
            "0",
        )
    spec = train.element_spec[0]
    if not (isinstance(spec, tf.TensorSpec) and (spec.dtype.is_floating or spec.dtype.is_integer)):
        raise ConfigError(
            f"training.{name}",
            value,
            f"the inputs are {spec}",
            "images (one numeric tensor per example), or 0",
        )
