"""The typed, frozen configuration of one tlloop run.

Everything below the entry point reads these dataclasses, never absl flags. Each value is
validated when its dataclass is made; a `ConfigError` names the flag that carries the value,
says what is wrong and what would be accepted. This module imports no TensorFlow, so bad flags
are refused before TensorFlow is even loaded.
"""

from __future__ import annotations

import dataclasses
import re

DATASETS = ("digits", "folder", "tfrecord", "tfds:NAME")
BN_MODES = ("frozen", "train")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker")
AUGMENT_OPS = ("flip", "rotate", "zoom", "contrast", "translate", "crop")
BAD_IMAGES = ("fail", "skip")
RESIZE_MODES = ("squash", "crop", "pad")
NAN_POLICIES = ("stop", "skip_step")
EXPORTS = ("best", "last")
OPTIMIZERS = ("adam", "adamw", "sgd", "lamb")
LR_SCHEDULES = ("constant", "cosine", "linear", "step")
# Evaluation metrics a run can track as its best, with the direction that is better.
BEST_METRICS = {"accuracy": "max", "loss": "min"}


class ConfigError(ValueError):
    """A user-facing configuration error; its message names the flag or file at fault."""


def _require(ok: bool, flag: str, value: object, problem: str, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"--{flag}={value!r}: {problem}; accepted: {accepted}")


@dataclasses.dataclass(frozen=True)
class Unfreeze:
    """Which backbone layers train in the fine-tune phase.

    kind "all": every layer; "none": no layer; "top": the last `count` layers that hold
    weights (BatchNormalization layers are not counted: `--bn_mode` decides them); "from":
    the layer named `value` and every layer after it; "blocks": the last `count` blocks of a
    keras.applications family (with the layers above them); "regex": the layers whose name
    matches the regular expression `value`.
    """

    kind: str
    count: int = 0
    value: str = ""

    @classmethod
    def parse(cls, spec: str) -> Unfreeze:
        accepted = "all, none, top:N, blocks:N (N >= 1), from:LAYER_NAME, regex:PATTERN"
        if spec in ("all", "none"):
            return cls(spec)
        kind, _, argument = spec.partition(":")
        if kind in ("top", "blocks"):
            match = re.fullmatch(r"\d+", argument)
            _require(match is not None, "unfreeze", spec, "N is not a number", accepted)
            _require(int(argument) >= 1, "unfreeze", spec, "N must be at least 1", accepted)
            return cls(kind, int(argument))
        if kind in ("from", "regex"):
            _require(bool(argument), "unfreeze", spec, f"{kind}: needs a value", accepted)
            if kind == "regex":
                try:
                    re.compile(argument)
                except re.error as error:
                    _require(False, "unfreeze", spec, f"bad regular expression ({error})", accepted)
            return cls(kind, value=argument)
        _require(False, "unfreeze", spec, "not an unfreeze policy", accepted)
        raise AssertionError  # unreachable: _require raised

    def __str__(self) -> str:
        if self.kind in ("top", "blocks"):
            return f"{self.kind}:{self.count}"
        return f"{self.kind}:{self.value}" if self.value else self.kind


@dataclasses.dataclass(frozen=True)
class AugmentOp:
    """One augmentation layer: a name from AUGMENT_OPS and its strength (0 if it takes none)."""

    name: str
    factor: float = 0.0


def parse_augment(spec: str) -> tuple[AugmentOp, ...]:
    """Parses `--augment`, e.g. "flip,rotate:0.1,zoom:0.1,crop:0.2"; empty: no augmentation.

    crop:F crops a random square of side (1 - F)..1 of the image and resizes it back."""
    accepted = (
        "a comma list of flip, rotate:F, zoom:F, contrast:F, translate:F, crop:F with 0 < F <= 1"
    )
    ops = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, factor = item.partition(":")
        _require(name in AUGMENT_OPS, "augment", spec, f"unknown operation {name!r}", accepted)
        if name == "flip":
            _require(not factor, "augment", spec, "flip takes no factor", accepted)
            ops.append(AugmentOp(name))
            continue
        try:
            value = float(factor)
        except ValueError:
            value = -1.0
        _require(0 < value <= 1, "augment", spec, f"{name} needs a factor in (0, 1]", accepted)
        ops.append(AugmentOp(name, value))
    return tuple(ops)


def parse_classes(spec: str) -> tuple[str, ...]:
    """Parses `--classes`: class names separated by commas, integer ranges like 5-9 expanded."""
    names: list[str] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        match = re.fullmatch(r"(\d+)-(\d+)", item)
        if match:
            low, high = int(match.group(1)), int(match.group(2))
            _require(low <= high, "classes", spec, f"empty range {item}", "e.g. 5-9 or cat,dog")
            names.extend(str(i) for i in range(low, high + 1))
        else:
            names.append(item)
    _require(
        len(set(names)) == len(names), "classes", spec, "a class is named twice", "distinct names"
    )
    return tuple(names)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where examples come from and how they are batched.

    `classes` selects and orders classes (empty: all the source has); `train_examples_per_class`
    keeps the first N shuffled training examples of each class (0: all).
    """

    dataset: str = "digits"
    data_dir: str = ""
    val_dir: str = ""
    train_files: str = ""  # --dataset=tfrecord: globs, comma-separated
    val_files: str = ""
    image_feature: str = "image/encoded"
    label_feature: str = "image/class/label"
    tfds_dir: str = ""  # --dataset=tfds:NAME: the TFDS data directory ("": TFDS's default)
    val_split: float = 0.3
    classes: tuple[str, ...] = ()
    train_examples_per_class: int = 0
    image_size: int = 32
    batch_size: int = 32
    eval_batch_size: int = 0  # 0: the training batch size
    seed: int = 0
    bad_images: str = "fail"  # an unreadable image file: "fail" the run, or "skip" it
    resize: str = "squash"  # to the square size: squash, crop (centre) or pad (black borders)

    def __post_init__(self) -> None:
        _require(self.resize in RESIZE_MODES, "resize", self.resize, "unknown", "squash, crop, pad")
        known = self.dataset in DATASETS[:3] or re.fullmatch(r"tfds:\S+", self.dataset)
        _require(bool(known), "dataset", self.dataset, "unknown", ", ".join(DATASETS))
        _require(
            self.bad_images in BAD_IMAGES, "bad_images", self.bad_images, "unknown", "fail, skip"
        )
        if self.dataset == "tfrecord":
            _require(
                bool(self.train_files),
                "train_files",
                self.train_files,
                "--dataset=tfrecord needs it",
                "a glob of TFRecord files of tf.train.Example records",
            )
        if self.dataset == "folder":
            _require(
                bool(self.data_dir),
                "data_dir",
                self.data_dir,
                "--dataset=folder needs it",
                "a folder with one sub-folder of images per class",
            )
        _require(0 <= self.val_split < 1, "val_split", self.val_split, "out of range", "0 <= x < 1")
        if not (self.val_dir or self.val_files):
            _require(
                self.val_split > 0,
                "val_split",
                self.val_split,
                "no evaluation data without --val_dir",
                "0 < x < 1, or set --val_dir",
            )
        _require(
            self.train_examples_per_class >= 0,
            "train_examples_per_class",
            self.train_examples_per_class,
            "negative",
            "0 (all) or a positive count",
        )
        _require(
            self.image_size >= 8, "image_size", self.image_size, "too small", "an integer >= 8"
        )
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "too small", ">= 1")
        _require(
            self.eval_batch_size >= 0,
            "eval_batch_size",
            self.eval_batch_size,
            "negative",
            "0 (same as --batch_size) or >= 1",
        )

    @property
    def eval_batch(self) -> int:
        return self.eval_batch_size or self.batch_size


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The backbone to load, the head to put on it, and the augmentation in front of it.

    `backbone` is a keras.applications class name, "small_cnn", or a path to a .keras file.
    `weights` is "imagenet", "none", a weights file path, or "" for the backbone's own default.
    """

    backbone: str = "small_cnn"
    weights: str = ""
    image_size: int = 32
    dropout: float = 0.2
    augment: tuple[AugmentOp, ...] = ()
    unsafe_deserialization: bool = False
    init_checkpoint: str = ""  # warm start: the backbone's weights from this checkpoint
    mixed_precision: str = ""  # "float16" or "bfloat16": compute in it, keep float32 weights

    def __post_init__(self) -> None:
        _require(bool(self.backbone), "backbone", self.backbone, "empty", "a name or a path")
        _require(0 <= self.dropout < 1, "dropout", self.dropout, "out of range", "0 <= x < 1")
        _require(
            self.mixed_precision in ("", "float16", "bfloat16"),
            "mixed_precision",
            self.mixed_precision,
            "unknown",
            "float16, bfloat16, or empty for float32",
        )


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
    """One training phase: its length, learning rate and what in the backbone trains.

    `bn_mode` "frozen" keeps the backbone in inference mode with its BatchNormalization layers
    untrainable; "train" runs the backbone with training=True (batch statistics, moving averages
    updated, Dropout active) and trains the BatchNormalization scales and offsets it unfreezes.
    """

    name: str
    epochs: int
    learning_rate: float
    unfreeze: Unfreeze
    bn_mode: str = "frozen"
    gradual: int = 0  # K > 0: epoch e trains only the top K x (e + 1) blocks/layers of `unfreeze`

    def __post_init__(self) -> None:
        _require(
            self.gradual >= 0,
            "unfreeze_schedule",
            f"gradual:{self.gradual}",
            "K must be positive",
            "gradual:K with K >= 1, or empty",
        )
        _require(self.epochs >= 0, f"{self.name}_epochs", self.epochs, "negative", ">= 0")
        _require(
            self.learning_rate > 0, f"{self.name}_lr", self.learning_rate, "not positive", "> 0"
        )
        _require(self.bn_mode in BN_MODES, "bn_mode", self.bn_mode, "unknown", "frozen, train")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """How every phase trains: optimizer, learning-rate schedule, gradients and loss.

    `weight_decay` is decoupled (Keras 3 applies it to the weights, scaled by the learning
    rate) and never applied to biases or BatchNormalization weights. The schedule runs over each
    phase's optimizer steps, after `warmup_steps` (or `warmup_epochs`) of linear warmup from 0.
    `clip_grad_norm` > 0 clips the global batch's gradient to that global norm.
    `grad_accum_steps` batches make one optimizer step. `class_weights` "auto" weighs each
    example's loss by N / (classes x count of its class) in the training data. `ema_decay` > 0
    keeps exponential moving averages of the weights; evaluations, the best checkpoint and the
    export use them.
    """

    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    warmup_epochs: int = 0
    clip_grad_norm: float = 0.0
    grad_accum_steps: int = 1
    label_smoothing: float = 0.0
    class_weights: str = ""
    ema_decay: float = 0.0  # > 0: evaluate and export moving averages of the weights
    layer_lr_decay: float = 0.0  # R in (0, 1): each backbone block/layer down gets R x the rate

    def __post_init__(self) -> None:
        _require(
            0 <= self.layer_lr_decay <= 1,
            "layer_lr_decay",
            self.layer_lr_decay,
            "out of range",
            "0 (off) or 0 < R <= 1",
        )
        _require(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "out of range", "[0, 1)")
        _require(
            self.optimizer in OPTIMIZERS,
            "optimizer",
            self.optimizer,
            "unknown",
            ", ".join(OPTIMIZERS),
        )
        _require(
            self.lr_schedule in LR_SCHEDULES,
            "lr_schedule",
            self.lr_schedule,
            "unknown",
            ", ".join(LR_SCHEDULES),
        )
        _require(
            0 <= self.weight_decay < 1, "weight_decay", self.weight_decay, "out of range", "[0, 1)"
        )
        for name in ("warmup_steps", "warmup_epochs"):
            value = getattr(self, name)
            _require(value >= 0, name, value, "negative", "0 (none) or a count")
        _require(
            not (self.warmup_steps and self.warmup_epochs),
            "warmup_steps",
            self.warmup_steps,
            "given together with --warmup_epochs",
            "one of the two",
        )
        _require(
            self.clip_grad_norm >= 0,
            "clip_grad_norm",
            self.clip_grad_norm,
            "negative",
            "0 (off) or a norm > 0",
        )
        _require(
            self.grad_accum_steps >= 1,
            "grad_accum_steps",
            self.grad_accum_steps,
            "too small",
            "1 (off) or more batches per optimizer step",
        )
        _require(
            0 <= self.label_smoothing < 1,
            "label_smoothing",
            self.label_smoothing,
            "out of range",
            "0 <= x < 1",
        )
        _require(
            self.class_weights in ("", "auto"),
            "class_weights",
            self.class_weights,
            "unknown",
            "auto, or empty for none",
        )


@dataclasses.dataclass(frozen=True)
class DistributeConfig:
    """Which tf.distribute strategy runs the steps, on which devices.

    `logical_devices` > 0 splits the first GPU (or the CPU) into that many logical devices
    first, so multi-replica runs can be reproduced on one machine.
    """

    strategy: str = "auto"
    devices: tuple[str, ...] = ()
    logical_devices: int = 0
    logical_device_memory_mb: int = 2048
    cluster_timeout_secs: float = 300.0

    def __post_init__(self) -> None:
        _require(
            self.strategy in STRATEGIES, "strategy", self.strategy, "unknown", ", ".join(STRATEGIES)
        )
        _require(
            not self.devices or self.strategy in ("mirrored", "one_device"),
            "devices",
            ",".join(self.devices),
            f"does not apply to --strategy={self.strategy}",
            "--strategy=mirrored or one_device with --devices",
        )
        _require(
            self.strategy != "one_device" or len(self.devices) <= 1,
            "devices",
            ",".join(self.devices),
            "one_device takes one device",
            "a single device name, e.g. /gpu:0",
        )
        _require(
            self.logical_devices >= 0, "logical_devices", self.logical_devices, "negative", ">= 0"
        )
        _require(
            self.logical_device_memory_mb >= 1,
            "logical_device_memory_mb",
            self.logical_device_memory_mb,
            "too small",
            ">= 1",
        )
        _require(
            self.cluster_timeout_secs > 0,
            "cluster_timeout_secs",
            self.cluster_timeout_secs,
            "not positive",
            "> 0",
        )


def parse_unfreeze_schedule(spec: str) -> int:
    """Parses `--unfreeze_schedule`: "gradual:K" gives K, empty gives 0 (all at once)."""
    if not spec:
        return 0
    match = re.fullmatch(r"gradual:(\d+)", spec)
    _require(
        match is not None and int(match.group(1)) >= 1,
        "unfreeze_schedule",
        spec,
        "not a schedule",
        "gradual:K with K >= 1 (K more blocks or layers each epoch), or empty",
    )
    return int(match.group(1))


def parse_profile_steps(spec: str) -> tuple[int, ...]:
    """Parses `--profile_steps=START,END` (global steps, 1 <= START <= END); empty: no profile."""
    if not spec:
        return ()
    accepted = "START,END with 1 <= START <= END (global steps), or empty"
    match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", spec)
    _require(match is not None, "profile_steps", spec, "not two step numbers", accepted)
    start, end = int(match.group(1)), int(match.group(2))
    _require(1 <= start <= end, "profile_steps", spec, "not an ordered range", accepted)
    return (start, end)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """What is logged, how often, and whether the console shows a progress bar.

    `log_every_steps` and `histogram_every_steps` count global steps, 0 turns them off;
    `profile_steps` is () or (START, END): the profiler traces global steps START to END.
    """

    log_every_steps: int = 10
    histogram_every_steps: int = 0
    profile_steps: tuple[int, ...] = ()
    quiet: bool = False
    summaries: bool = True  # False: no TensorBoard event files and no metrics.jsonl

    def __post_init__(self) -> None:
        for name in ("log_every_steps", "histogram_every_steps"):
            value = getattr(self, name)
            _require(value >= 0, name, value, "negative", "0 (off) or a step count >= 1")


@dataclasses.dataclass(frozen=True)
class BestMetric:
    """The evaluation metric whose best value the run keeps a checkpoint of."""

    name: str = "accuracy"
    direction: str = "max"

    @classmethod
    def parse(cls, spec: str) -> BestMetric:
        """Parses `--best_metric`: accuracy or loss, optionally :max or :min (default: the
        metric's natural direction)."""
        accepted = "accuracy, loss, optionally with :max or :min (e.g. loss:min)"
        name, _, direction = spec.partition(":")
        _require(name in BEST_METRICS, "best_metric", spec, "unknown metric", accepted)
        direction = direction or BEST_METRICS[name]
        _require(direction in ("max", "min"), "best_metric", spec, "unknown direction", accepted)
        return cls(name, direction)

    def better(self, value: float, than: float) -> bool:
        """True if `value` is strictly better than `than` (anything beats NaN, the unset)."""
        if than != than:
            return value == value
        return value > than if self.direction == "max" else value < than

    def __str__(self) -> str:
        return f"{self.name}:{self.direction}"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When the run saves a checkpoint (besides each phase start, the end and on SIGTERM),
    which evaluation is the best, when a phase stops early, and what is exported.

    `every_secs` applies to single-host runs only: tasks of a cluster would not agree on time.
    `early_stopping_patience` > 0 ends a phase after that many evaluations without a better
    `best_metric` than the phase's best so far. `export` "best" exports the weights of the best
    evaluation, "last" those at the end.
    """

    every_steps: int = 0
    every_secs: float = 600.0
    keep: int = 3
    best_metric: BestMetric = BestMetric()
    early_stopping_patience: int = 0
    export: str = "best"

    def __post_init__(self) -> None:
        _require(
            self.every_steps >= 0,
            "checkpoint_every_steps",
            self.every_steps,
            "negative",
            "0 (off) or a step count",
        )
        _require(
            self.every_secs >= 0,
            "checkpoint_every_secs",
            self.every_secs,
            "negative",
            "0 (off) or seconds",
        )
        _require(self.keep >= 1, "keep_checkpoints", self.keep, "too small", ">= 1")
        _require(
            self.early_stopping_patience >= 0,
            "early_stopping_patience",
            self.early_stopping_patience,
            "negative",
            "0 (off) or a number of evaluations",
        )
        _require(self.export in EXPORTS, "export", self.export, "unknown", "best, last")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The whole run: data, model, the phases in order, and how steps are compiled."""

    workdir: str
    data: DataConfig
    model: ModelConfig
    phases: tuple[PhaseConfig, ...]
    training: TrainingConfig = TrainingConfig()
    distribute: DistributeConfig = DistributeConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    deterministic: bool = False
    jit_compile: bool = False
    steps_per_loop: int = 1
    seed: int = 0
    overwrite: bool = False
    nan_policy: str = "stop"  # a NaN/Inf loss or gradient: "stop" the run, or "skip_step"
    feature_cache: str = "auto"  # a frozen phase without augmentation trains on cached features

    def __post_init__(self) -> None:
        _require(bool(self.workdir), "workdir", self.workdir, "empty", "a directory path")
        _require(
            self.nan_policy in NAN_POLICIES,
            "nan_policy",
            self.nan_policy,
            "unknown",
            "stop, skip_step",
        )
        _require(
            self.steps_per_loop >= 1, "steps_per_loop", self.steps_per_loop, "too small", ">= 1"
        )
        _require(
            self.data.image_size == self.model.image_size,
            "image_size",
            self.model.image_size,
            "data and model disagree",
            "one value",
        )
        _require(
            not (self.model.mixed_precision == "float16" and self.training.layer_lr_decay),
            "mixed_precision",
            self.model.mixed_precision,
            "float16 loss scaling and --layer_lr_decay do not combine",
            "bfloat16 (no loss scaling), or no --layer_lr_decay",
        )
        _require(
            any(phase.epochs for phase in self.phases),
            "head_epochs",
            tuple(phase.epochs for phase in self.phases),
            "every phase has 0 epochs, nothing would train",
            "at least one of --head_epochs, --finetune_epochs >= 1",
        )
