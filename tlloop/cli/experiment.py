"""The command line's experiment: a RunConfig -> data, model and phase plan -> the same Trainer.

`build_experiment` seeds, refuses flags the run cannot use (`check_task`, a table of rules),
loads the data, resolves --recipe, builds the task and the model (warm-started from
--init_checkpoint) and plans the phases; `train` runs it with `tlloop.Trainer` into a prepared
workdir. Nothing here is below the command line: the library's `Trainer` knows no flags.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Sequence

import keras
import tensorflow as tf
from absl import logging

from tlloop import checkpoints as checkpoint_lib
from tlloop import phases as phase_lib
from tlloop import supervise, wise_ft
from tlloop.cli import config as config_lib
from tlloop.cli.config import ConfigError, RunConfig
from tlloop.cli.data import is_text, load_task_data
from tlloop.cli.head_lr import FoundRate, find_rate
from tlloop.cli.model import build_model, build_text_model
from tlloop.cli.recipe import Recipe, resolve
from tlloop.config import AUTO_RATE, PhaseConfig
from tlloop.data.storage import Data
from tlloop.distribute import is_chief
from tlloop.models import TEXT_FINETUNE_MODES, TransferModel
from tlloop.tasks import Classification, MultiLabel, Regression, Task
from tlloop.trainer import FitInputs, Results, Trainer
from tlloop.warm_start import WarmStartReport, warm_start
from tlloop.workdir import FOUND_RATE_FILE, write_json

__all__ = ["Experiment", "build_experiment", "build_task", "check_task", "train"]


@dataclasses.dataclass
class Experiment:
    """A command-line run ready to train: its config, strategy, data, model and phase plan."""

    config: RunConfig
    strategy: tf.distribute.Strategy
    data: Data
    model: TransferModel
    phases: list[phase_lib.PlannedPhase]
    warm_start: WarmStartReport | None = None
    task: Task | None = None  # None: the classification the config describes
    recipe: Recipe | None = None
    found_rate: FoundRate | None = None  # --head_lr=auto's

    def trainer(self, callbacks: Sequence[keras.callbacks.Callback] = ()) -> Trainer:
        """The Trainer the config describes."""
        config = self.config
        return Trainer(
            config.workdir,
            phases=tuple(phase.config for phase in self.phases),
            task=self.task or build_task(config, self.data),
            callbacks=callbacks,
            strategy=self.strategy,
            seed=config.seed,
            training=config.training,
            checkpoint=config.checkpoint,
            logging=config.logging,
            jit_compile=config.jit_compile,
            steps_per_loop=config.steps_per_loop,
            nan_policy=config.nan_policy,
            feature_cache=config.feature_cache,
            deterministic=config.deterministic,
            resize=config.data.resize,
            mixed_float16=config.model.mixed_precision == "float16",
        )


def build_experiment(
    config: RunConfig, strategy: tf.distribute.Strategy | None = None, *, find_rates: bool = True
) -> Experiment:
    """Seeds, loads data, resolves --recipe from it (the experiment's config holds the
    values chosen: write flags.txt from it), builds the model under `strategy`
    (warm-started from --init_checkpoint if given) and plans the phases; with `find_rates`,
    --head_lr=auto's range test sets the head phase's rate (`Experiment.found_rate`; the config
    keeps "auto"; a resumed run reads the rate its first start found). Writes nothing.

    Raises ConfigError (naming the flag or file) on bad input.
    """
    strategy = strategy or tf.distribute.get_strategy()
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    text = is_text(config.data)
    check_task(config, text)
    data = load_task_data(config.data)
    config, recipe = resolve(
        config, data.train_size, data.num_classes, task=config.task.task, text=text
    )
    for line in recipe.lines():
        logging.info("%s", line)
    wise_ft.finetune_index(config.checkpoint, config.phases)  # with the recipe's epochs
    task = build_task(config, data)
    task.checked_best_metric(config.checkpoint.best_metric)
    with strategy.scope():
        model, phases = _model_and_phases(config, data, task, text)
    report = None
    if config.model.init_checkpoint:
        report = warm_start(model.backbone, config.model.init_checkpoint)
        logging.info("%s", report.to_text())
    plan = phase_lib.plan_phases(phases, model)
    experiment = Experiment(config, strategy, data, model, plan, report, task, recipe)
    auto = [i for i, p in enumerate(phases) if p.learning_rate == AUTO_RATE]
    if not (find_rates and auto):
        return experiment
    found = find_rate(experiment, auto[0], config.workdir, reuse=not config.overwrite)
    logging.info("%s", found.line())
    phases = tuple(
        dataclasses.replace(p, learning_rate=found.rate) if i == auto[0] else p
        for i, p in enumerate(phases)
    )
    plan = phase_lib.plan_phases(phases, model)
    return dataclasses.replace(experiment, phases=plan, found_rate=found)


def _model_and_phases(
    config: RunConfig, data: Data, task: Task, text: bool
) -> tuple[TransferModel, tuple[PhaseConfig, ...]]:
    """The model the config describes (call under the strategy's scope) and its phases: a
    text encoder fine-tunes with its Dropout on (it has no BatchNorm to protect)."""
    phases = config.phases
    if not text:
        standardized = (task.mean, task.std) if isinstance(task, Regression) else None
        model = build_model(
            config.model, data.num_classes, seed=config.seed, standardized=standardized
        )
        return model, phases
    model = build_text_model(config.model, data.num_classes, seed=config.seed)
    phases = tuple(
        dataclasses.replace(p, modes=TEXT_FINETUNE_MODES)
        if p.unfreeze.kind != "none" and p.bn_mode == "frozen" and p.modes is None
        else p
        for p in phases
    )
    logging.info(
        "text backbone: its Dropout runs in training mode in the train step of a "
        "phase that fine-tunes it (see each phase's mode table)"
    )
    return model, phases


# Where each task other than classification finds its labels or targets.
SOURCES_OF = {"multilabel": ("csv", "tfrecord"), "regression": ("csv",)}
# Flags that adapt an image backbone's input, and flags of image decoding only.
ADAPTER_FLAGS = ("backbone_layer", "backbone_range", "backbone_channels")
IMAGE_FLAGS = ("resize", "image_size", "bad_images")
_TEXTS = "the examples are texts (a KerasHub text preset reads them)"


@dataclasses.dataclass(frozen=True)
class Rule:
    """A combination of flags a run refuses: `flag` is at fault when `refused(config, text)`
    (`text`: the examples are texts); `problem` and `accepted` say why and what would do."""

    flag: str
    refused: Callable[[RunConfig, bool], bool]
    problem: Callable[[RunConfig, bool], str]
    accepted: Callable[[RunConfig], str]


def _kind(config: RunConfig) -> str:
    return config.task.task


def _mixing(name: str) -> Rule:
    return Rule(
        name,
        lambda c, text: c.training.mixing == name and (text or _kind(c) == "regression"),
        lambda c, text: (
            "mixing is for images, the examples are texts"
            if text
            else "mixing the losses of two targets is not the loss of a mixed target "
            "(--task=regression)"
        ),
        lambda c: "0",
    )


def _smoothing(name: str) -> Rule:
    return Rule(
        name,
        lambda c, text: bool(getattr(c.training, name)) and _kind(c) == "regression",
        lambda c, text: "applies to classification, not --task=regression",
        lambda c: "0 / empty with --task=regression",
    )


# What --task and the kind of examples cannot combine with, checked in this order.
TASK_RULES = (
    Rule(
        "task",
        lambda c, text: c.data.task != _kind(c),
        lambda c, text: f"the data section reads {c.data.task}",
        lambda c: "one value",
    ),
    Rule(
        "task",
        lambda c, text: _kind(c) != "classification" and c.data.dataset not in SOURCES_OF[_kind(c)],
        lambda c, text: (
            f"its labels or targets come from {' or '.join(SOURCES_OF[_kind(c)])}, "
            f"not --dataset={c.data.dataset}"
        ),
        lambda c: " or ".join(f"--dataset={source}" for source in SOURCES_OF[_kind(c)]),
    ),
    _smoothing("label_smoothing"),
    _smoothing("class_weights"),
    Rule(
        "export_tflite",
        lambda c, text: _kind(c) != "classification" and bool(c.checkpoint.export_tflite),
        lambda c, text: f"TFLite exports serve class probabilities, not --task={_kind(c)}",
        lambda c: "empty, or --task=classification",
    ),
    Rule(
        "augment",
        lambda c, text: text and bool(c.model.augment),
        lambda c, text: "augmentation operations are for images, the examples are texts",
        lambda c: "empty",
    ),
    Rule(
        "export_tflite",
        lambda c, text: text and bool(c.checkpoint.export_tflite),
        lambda c, text: "TFLite exports take images, the examples are texts",
        lambda c: "empty",
    ),
    _mixing("mixup"),
    _mixing("cutmix"),
)


def _unread(config: RunConfig, text: bool) -> list[tuple[str, bool, str]]:
    """(flag, read by this run?, why not) for the flags only some runs read."""
    kind, data, formats = _kind(config), config.data, config.checkpoint.export_tflite
    multi_hot = kind == "multilabel" and data.dataset == "tfrecord"
    return [
        *((flag, not text, f"it adapts an image model, {_TEXTS}") for flag in ADAPTER_FLAGS),
        *((flag, not text, f"it is for images, {_TEXTS}") for flag in IMAGE_FLAGS),
        ("mixed_precision", not text, f"a text model is built in float32, {_TEXTS}"),
        ("threshold", kind == "multilabel", f"it applies to --task=multilabel, not {kind}"),
        ("regression_loss", kind == "regression", f"it applies to --task=regression, not {kind}"),
        (
            "label_delimiter",
            data.dataset == "csv" and kind == "multilabel",
            "it separates the labels of --dataset=csv with --task=multilabel",
        ),
        ("image_feature", data.dataset == "tfrecord", "it is read by --dataset=tfrecord only"),
        ("tfds_dir", data.dataset.startswith("tfds:"), "it is read by --dataset=tfds:NAME only"),
        (
            "tflite_min_agreement",
            bool({"float32", "dynamic"} & set(formats)),
            "it checks --export_tflite=float32 or dynamic, which is not asked for",
        ),
        *(
            (flag, "int8" in formats, "it is for --export_tflite=int8, which is not asked for")
            for flag in ("tflite_min_agreement_int8", "tflite_calibration_images")
        ),
        (
            "classes",
            kind != "regression" and not multi_hot,
            "multi-hot TFRecord labels are read as they are"
            if multi_hot
            else "regression targets are the CSV's columns",
        ),
        (
            "train_examples_per_class",
            kind == "classification",
            f"--task={kind} has no one class per example to count",
        ),
    ]


def check_task(config: RunConfig, text: bool) -> None:
    """Refuses, naming the flag, what --task cannot combine with (`TASK_RULES`), then a flag
    this run would not read given with a value other than its default (flags.txt lists every
    flag, defaults included): before any data loads."""
    values = config_lib.flag_values(config)
    for rule in TASK_RULES:
        if rule.refused(config, text):
            value = values[rule.flag]
            shown = ",".join(value) if isinstance(value, list) else value
            raise ConfigError(
                rule.flag, repr(shown), rule.problem(config, text), rule.accepted(config)
            )
    given = config_lib.given_flags(config)
    defaults = {meta.flag: meta.default for meta in config_lib.options()}
    for flag, read, why in _unread(config, text):
        if not read and flag in given and values[flag] != defaults[flag]:
            raise ConfigError(
                flag, repr(values[flag]), f"this run does not read it: {why}", "no --" + flag
            )


def build_task(config: RunConfig, data: Data) -> Task:
    """The task the flags describe, with what it takes from the training data: class names,
    --class_weights=auto's weights, the regression targets' mean and standard deviation."""
    training, kind = config.training, config.task.task
    if kind == "classification":
        return Classification(
            label_smoothing=training.label_smoothing,
            class_weights=training.class_weights or None,
            class_names=data.class_names,
        )
    labels = data.train_examples.labels
    if kind == "multilabel":
        return MultiLabel(
            class_names=data.class_names,
            threshold=config.task.threshold,
            label_smoothing=training.label_smoothing,
            class_weights=training.class_weights or None,  # "auto": from the examples
        )
    return Regression(
        data.num_classes,
        loss=config.task.regression_loss,
        targets=labels,
        target_names=data.class_names,
    )


def train(
    experiment: Experiment,
    workdir: str,
    flags_text: str = "",
    stop: threading.Event | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    restarts: int = 0,
) -> Results:
    """Runs the experiment into a prepared `workdir` (see `Trainer`); the chief exports and
    writes results.json. When `stop` is set, training ends after the host call under way with a
    checkpoint and raises `Stopped`; KeyboardInterrupt also saves one first. Raises RunFailed
    (the last checkpoint intact) on a NaN/Inf step under --nan_policy=stop and when a
    checkpoint or the export cannot be written."""
    config = dataclasses.replace(experiment.config, workdir=workdir)
    experiment = dataclasses.replace(experiment, config=config)
    data = experiment.data
    trainer = experiment.trainer(callbacks)
    if experiment.warm_start and checkpoint_lib.latest(os.path.join(workdir, "checkpoints")):
        logging.info("resuming: the run's own checkpoint replaces the warm-started weights")
    run = FitInputs(
        experiment.model,
        data.train_examples,
        data.eval_examples,
        experiment.phases,
        config.data.batch_size,
        config.data.eval_batch,
    )
    report = experiment.warm_start
    header = {
        "restarts": restarts,  # by the supervisor, before this process
        # The supervisor restarted it with oneDNN off after that known crash (supervise.py).
        "restarted_without_onednn": os.environ.get(supervise.WITHOUT_ONEDNN_ENV) == "1",
        "class_names": list(data.class_names),
        "skipped_images": list(data.skipped_files),
        "skipped_reasons": dict(data.skipped_files),
        "data_storage": dict(data.storage),
        "init_checkpoint": dataclasses.asdict(report) if report else None,
        "recipe": experiment.recipe.to_json() if experiment.recipe else None,
    }
    hparams = config_lib.hparams(config)
    found = experiment.found_rate
    if found:
        header["found_rate"] = found.to_json()
        hparams[f"{found.phase}_lr"] = found.rate
        if is_chief(experiment.strategy) and not found.reused:
            write_json(os.path.join(workdir, FOUND_RATE_FILE), found.to_json())
    return trainer.run(
        run,
        stop=stop,
        flags_text=flags_text,
        hparams=hparams,
        header=header,
        texts=[("init_checkpoint", report.to_text())] if report else [],
        scalars={"restarts": float(restarts)} if restarts else None,
    )
