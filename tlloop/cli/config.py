"""The command line's configuration: a RunConfig of every flag of `python -m tlloop.run`.

The sections only the command line describes (DataConfig, ModelConfig, TaskConfig, TwoPhases,
DistributeConfig) live here, with RunConfig over them and the library's option objects
(`tlloop.config`: TrainingConfig, CheckpointConfig, LoggingConfig). `options()` lists every
flag off the option fields, `from_flags` builds a RunConfig from flag values, `flag_values` /
`given_flags` / `hparams` read one back. Each value is checked when its dataclass is made; a
ConfigError names the argument, which the command line prints as its flag. This module imports
no TensorFlow, so bad flags are refused before TensorFlow is even loaded.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

from tlloop.config import (
    AUTO_RATE,
    BAD_IMAGES,
    BN_MODES,
    FEATURE_CACHE,
    NAN_POLICIES,
    REGRESSION_LOSSES,
    RESIZE_MODES,
    AugmentOp,
    CheckpointConfig,
    ConfigError,
    LoggingConfig,
    Option,
    PhaseConfig,
    TrainingConfig,
    Unfreeze,
    check_options,
    format_augment,
    option,
    option_of,
    parse_augment,
    parse_backbone_range,
    parse_rate,
    parse_steps_per_loop,
    require,
)

DATASETS = ("digits", "folder", "tfrecord", "csv", "text_folder", "tfds:NAME")
TASKS = ("classification", "multilabel", "regression")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker")
RECIPES = ("auto", "guide")
MIXED_PRECISION = ("", "float16", "bfloat16")
BACKBONE_CHANNELS = ("", "rgb", "grayscale")

_FOLLOWS = "tlloop.follows"  # field metadata key: the field takes another field's flag value
_SECTION = "tlloop.section"  # field metadata key: the field is a dataclass of options
_GIVEN = "tlloop.given"  # field metadata key: the flags given explicitly (not an option)


def follows(flag: str, default: Any) -> Any:
    """A dataclass field with no flag of its own: `from_flags` gives it the value of `flag`,
    which another field defines (e.g. the model's image size is --image_size, the data's)."""
    return dataclasses.field(default=default, metadata={_FOLLOWS: flag})


@dataclasses.dataclass(frozen=True)
class _Section:
    kind: type
    build: Callable[[Any], Any] | None = None  # options dataclass -> the field's value
    read: Callable[[Any], Any] | None = None  # the field's value -> options dataclass


def section(kind: type, build: Callable | None = None, read: Callable | None = None) -> Any:
    """A dataclass field holding a dataclass of options (`kind`). With `build` and `read`, the
    field holds a value derived from the options dataclass (`build(options)`) instead, and
    `read(value)` gives the options back (e.g. RunConfig.phases from TwoPhases)."""
    factory = kind if build is None else (lambda: build(kind()))
    return dataclasses.field(
        default_factory=factory, metadata={_SECTION: _Section(kind, build, read)}
    )


def parse_classes(spec: str) -> tuple[str, ...]:
    """Parses `--classes`: class names separated by commas, integer ranges like 5-9 expanded."""
    names: list[str] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        match = re.fullmatch(r"(\d+)-(\d+)", item)
        if match:
            low, high = int(match.group(1)), int(match.group(2))
            require(low <= high, "classes", spec, f"empty range {item}", "e.g. 5-9 or cat,dog")
            names.extend(str(i) for i in range(low, high + 1))
        else:
            names.append(item)
    require(
        len(set(names)) == len(names), "classes", spec, "a class is named twice", "distinct names"
    )
    return tuple(names)


def parse_unfreeze_schedule(spec: str) -> int:
    """Parses `--unfreeze_schedule`: "gradual:K" gives K, empty gives 0 (all at once)."""
    if not spec:
        return 0
    match = re.fullmatch(r"gradual:(\d+)", spec)
    require(
        match is not None and int(match.group(1)) >= 1,
        "unfreeze_schedule",
        spec,
        "not a schedule",
        "gradual:K with K >= 1 (K more blocks or layers each epoch), or empty",
    )
    return int(match.group(1))


def _known_dataset(name: str) -> bool:
    return name in DATASETS[:-1] or re.fullmatch(r"tfds:\S+", name) is not None


# ---------------------------------------------------------------------------------------------
# The configuration, one dataclass per concern; the order of fields is the order of flags.txt.


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where examples come from and how they are batched.

    `classes` selects and orders classes (empty: all the source has); `train_examples_per_class`
    keeps the first N shuffled training examples of each class (0: all).
    """

    dataset: str = option(
        "digits",
        "Examples: digits (embedded UCI optical digits), folder (--data_dir with one sub-folder "
        "per class), tfrecord (--train_files of tf.train.Example records), csv (--train_csv: "
        "image paths or texts with their labels or targets), text_folder (--data_dir with one "
        "sub-folder of .txt files per class) or tfds:NAME (a TensorFlow Datasets dataset "
        "already in --tfds_dir; needs tensorflow-datasets).",
        check=_known_dataset,
        problem="unknown",
        accepted=", ".join(DATASETS),
        evaluation=True,
    )
    data_dir: str = option("", "For --dataset=folder: one sub-folder per class.", evaluation=True)
    train_files: str = option(
        "", "For --dataset=tfrecord: glob(s) of TFRecord files, comma-separated.", evaluation=True
    )
    val_files: str = option(
        "",
        "For --dataset=tfrecord: evaluation TFRecord glob(s); empty: hold out --val_split.",
        evaluation=True,
    )
    image_feature: str = option(
        "image/encoded",
        "For --dataset=tfrecord: the feature holding the encoded image (JPEG, PNG, ...).",
        evaluation=True,
    )
    label_feature: str = option(
        "image/class/label",
        "For --dataset=tfrecord: the int64 feature holding the class index (--task=multilabel: "
        "a list of label indices, or a float multi-hot row).",
        evaluation=True,
    )
    tfds_dir: str = option(
        "",
        "For --dataset=tfds:NAME: the TensorFlow Datasets data directory; empty: its default.",
        evaluation=True,
    )
    val_dir: str = option(
        "",
        "For --dataset=folder: evaluation images, same layout as --data_dir; "
        "empty: hold out --val_split of the training data.",
        evaluation=True,
    )
    val_split: float = option(
        0.3,
        "Fraction of each class held out for evaluation when there is no --val_dir (folder) or "
        "--val_files (tfrecord); a fixed split, the same for every --seed.",
        check=lambda value: 0 <= value < 1,
        problem="out of range",
        accepted="0 <= x < 1",
        evaluation=True,
    )
    classes: tuple[str, ...] = option(
        (),
        "Classes to use, in label order, e.g. 5-9 or cat,dog; empty: all.",
        parse=parse_classes,
        format=",".join,
        evaluation=True,
    )
    train_examples_per_class: int = option(
        0,
        "Keep this many training examples per class (few-shot); 0: all.",
        check=lambda value: value >= 0,
        problem="negative",
        accepted="0 (all) or a positive count",
    )
    bad_images: str = option(
        "fail",
        "An image that cannot be read or decoded: fail (the run stops naming it: before "
        "training, or for a streamed image that starts like an image, when it is first read, "
        "with the last checkpoint intact) or skip (every image is checked before training; "
        "skipped ones are logged and counted in results.json).",
        choices=BAD_IMAGES,
        evaluation=True,
    )
    data_memory: str = option(
        "auto",
        "Decoded images held in memory, in MiB: a split (evaluation first) whose decoded "
        "images fit what is left is decoded once at load; a larger one streams from its files "
        "or records, decoded as batches are read. auto: half the memory available at start; "
        "0: always stream.",
        check=lambda value: value == "auto" or value.isdigit(),
        problem="not a size",
        accepted="auto or a whole number of MiB (0: always stream)",
        hparam=False,
    )
    data_cache: str = option(
        "",
        "A folder where the images are decoded and resized once, into a file of pixels per "
        "split (named by the files, size and resize mode), read from then on instead of the "
        "image files; empty: none.",
        hparam=False,
    )
    resize: str = option(
        "squash",
        "How images become --image_size squares: squash (ignore the aspect ratio), crop (scale "
        "the short side, crop the centre) or pad (scale the long side, pad with black).",
        choices=RESIZE_MODES,
    )
    image_size: int = option(
        32,
        "Images are resized to this square size.",
        check=lambda value: value >= 8,
        problem="too small",
        accepted="an integer >= 8",
    )
    batch_size: int = option(
        32,
        "Global training batch size.",
        check=lambda value: value >= 1,
        problem="too small",
        accepted=">= 1",
    )
    eval_batch_size: int = option(
        0,
        "Evaluation batch size; 0: --batch_size.",
        check=lambda value: value >= 0,
        problem="negative",
        accepted="0 (same as --batch_size) or >= 1",
        hparam=False,
        evaluation=True,
    )
    seed: int = follows("seed", 0)  # the shuffle's seed; splits have a fixed seed of their own
    train_csv: str = option(
        "",
        "For --dataset=csv: a CSV file with a header; its first column is path (an image file, "
        "relative to the CSV's folder) or text, the next the label (classification), the "
        "labels separated by --label_delimiter (multilabel), or one column per target "
        "(regression).",
        evaluation=True,
    )
    val_csv: str = option(
        "",
        "For --dataset=csv: the evaluation CSV, same columns; empty: hold out --val_split.",
        evaluation=True,
    )
    label_delimiter: str = option(
        ";",
        "For --dataset=csv with --task=multilabel: what separates the labels of one example.",
        check=lambda value: len(value) == 1 and value not in ',"\r\n',
        problem="not one character other than a comma, a quote or a line break",
        accepted="one character, e.g. ; or |",
        evaluation=True,
    )
    task: str = follows("task", "classification")  # what a CSV's label columns hold

    def __post_init__(self) -> None:
        check_options(self)
        if self.dataset == "csv":
            require(
                bool(self.train_csv),
                "train_csv",
                self.train_csv,
                "--dataset=csv needs it",
                "a CSV file with a header (path or text, then labels or targets)",
            )
        require(
            not self.val_csv or self.dataset == "csv",
            "val_csv",
            self.val_csv,
            f"--dataset={self.dataset} does not read it",
            "--val_csv only with --dataset=csv",
        )
        if self.dataset == "tfrecord":
            require(
                bool(self.train_files),
                "train_files",
                self.train_files,
                "--dataset=tfrecord needs it",
                "a glob of TFRecord files of tf.train.Example records",
            )
        if self.dataset in ("folder", "text_folder"):
            require(
                bool(self.data_dir),
                "data_dir",
                self.data_dir,
                f"--dataset={self.dataset} needs it",
                "a folder with one sub-folder of "
                + ("images" if self.dataset == "folder" else ".txt files")
                + " per class",
            )
        # Separate evaluation data is read by one dataset each; given to another, it would be
        # ignored without a word (and --val_split=0 would evaluate on almost nothing).
        for flag, readers in (("val_dir", ("folder", "text_folder")), ("val_files", ("tfrecord",))):
            require(
                not getattr(self, flag) or self.dataset in readers,
                flag,
                getattr(self, flag),
                f"--dataset={self.dataset} does not read it",
                f"--{flag} only with --dataset={' or '.join(readers)}",
            )
        require(
            not self.data_cache or self.dataset in ("folder", "tfrecord", "csv"),
            "data_cache",
            self.data_cache,
            f"--dataset={self.dataset} is decoded in memory, not read from files",
            "--data_cache only with --dataset=folder, tfrecord or csv (of images)",
        )
        require(
            self.data_memory == "auto" or self.dataset not in ("digits", "text_folder"),
            "data_memory",
            self.data_memory,
            f"--dataset={self.dataset} is always held in memory",
            "auto with this dataset",
        )
        separate = {
            "folder": "val_dir",
            "text_folder": "val_dir",
            "tfrecord": "val_files",
            "csv": "val_csv",
        }.get(self.dataset, "")
        if not (separate and getattr(self, separate)):
            require(
                self.val_split > 0,
                "val_split",
                self.val_split,
                f"no evaluation data without --{separate}" if separate else "no evaluation data",
                f"0 < x < 1, or set --{separate}" if separate else "0 < x < 1",
            )

    @property
    def eval_batch(self) -> int:
        return self.eval_batch_size or self.batch_size


def _default(kind: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(kind) if f.name == name)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The backbone to load, the head to put on it, and the augmentation in front of it.

    `backbone` is a keras.applications class name, "small_cnn", a path to a .keras/.h5 model, or
    a KerasHub preset; `backbone_layer`, `backbone_channels` and `backbone_range` adapt it.
    `weights` is "imagenet", "none", a weights file path, or "" for the backbone's own default.
    """

    backbone: str = option(
        "small_cnn",
        "A keras.applications class name (MobileNetV2, EfficientNetB0, ResNet50, ...), "
        "small_cnn, a saved full model (.keras, or .h5/.hdf5 from Keras 2 or 3), or a KerasHub "
        "preset (hf://..., kaggle://..., a preset name, or a local preset directory; needs "
        'pip install -e ".[hub]"). --backbone_layer, --backbone_channels and --backbone_range '
        "adapt other models; python -m tlloop.backbone SOURCE lists layers and cut points.",
        check=bool,
        problem="empty",
        accepted="a name or a path",
    )
    backbone_layer: str = option(
        "",
        "Cut the backbone at this layer's output (a classifier becomes a feature extractor): "
        "a top-level layer name, or -N for the N-th layer from the end (-1 the last); empty: "
        "the whole model. The output must be a feature map or a vector.",
    )
    backbone_channels: str = option(
        "",
        "The channels the backbone takes: rgb or grayscale (tlloop converts its RGB pixels "
        "inside the saved model); empty: what the model's input has (1: grayscale, 3: rgb).",
        check=lambda value: value in BACKBONE_CHANNELS,
        problem="unknown",
        accepted="rgb, grayscale, or empty for the model's own",
    )
    backbone_range: str = option(
        "",
        "The pixel range or normalisation the backbone expects, applied inside the saved model "
        "to tlloop's pixels in [0, 255]: 0:255, 0:1, -1:1, imagenet ((x/255 - mean) / std), or "
        "SCALE:OFFSET (x * SCALE + OFFSET); empty: 0:255 for a model file, the preset's own "
        "preprocessing for a KerasHub preset (and the application's for keras.applications).",
        check=lambda value: parse_backbone_range(value) is not None,
        problem="not a range",
        accepted="0:255, 0:1, -1:1, imagenet, SCALE:OFFSET (two numbers), or empty",
    )
    weights: str = option(
        "",
        "Backbone weights: imagenet, none, or a weights "
        "file; empty: imagenet for keras.applications, none for small_cnn, the file's own "
        "for a .keras backbone.",
    )
    image_size: int = follows("image_size", _default(DataConfig, "image_size"))
    dropout: float = option(
        0.2,
        "Dropout rate before the head's Dense layer.",
        check=lambda value: 0 <= value < 1,
        problem="out of range",
        accepted="0 <= x < 1",
    )
    augment: tuple[AugmentOp, ...] = option(
        (),
        "Training augmentation, e.g. "
        "flip,rotate:0.1,zoom:0.1,contrast:0.2,translate:0.1,crop:0.2 (a random square of "
        "0.8..1 of the side, resized back); empty: none.",
        parse=parse_augment,
        format=format_augment,
    )
    unsafe_deserialization: bool = option(
        False,
        "Allow a .keras backbone to run "
        "code (Lambda layers) when loaded. Only for files you trust.",
        hparam=False,
    )
    init_checkpoint: str = option(
        "",
        "Warm start: load the backbone's weights from another tlloop run (its workdir: the "
        "best checkpoint, else the latest), a checkpoint directory or a checkpoint path; a "
        "report lists matched, unmatched and missing variables. Not applied when resuming.",
    )
    mixed_precision: str = option(
        "",
        "float16 (with dynamic loss scaling) or bfloat16: compute in it, keep weights and the "
        "head's output in float32 (keras.applications and small_cnn backbones; a .keras "
        "backbone keeps the dtypes it was saved with); empty: float32.",
        check=lambda value: value in MIXED_PRECISION,
        problem="unknown",
        accepted="float16, bfloat16, or empty for float32",
    )

    def __post_init__(self) -> None:
        check_options(self)


@dataclasses.dataclass(frozen=True)
class TwoPhases:
    """The phases the command line describes: a head phase (backbone frozen), then a fine-tune
    phase. RunConfig holds them as `phases` (`to_phases()`); `of(phases)` reads them back.
    Each value is checked by the PhaseConfig it goes into, which names its flag."""

    head_epochs: int = option(5, "Epochs of the head phase (backbone frozen).")
    head_lr: float | str = option(
        1e-3,
        "Learning rate of the head phase, or auto: run the learning-rate range test (as "
        "python -m tlloop.lr_find) before training and use its suggestion (its cost is logged "
        "and written to results.json).",
        parse=lambda value: parse_rate(value, "head_lr", auto=True),
        format=str,
    )
    finetune_epochs: int = option(5, "Epochs of the fine-tune phase.")
    finetune_lr: float = option(
        1e-5,
        "Learning rate of the fine-tune phase.",
        parse=lambda value: parse_rate(value, "finetune_lr"),
        format=str,
    )
    unfreeze: Unfreeze = option(  # noqa: RUF009  option() returns a dataclasses.field
        Unfreeze("all"),
        "Backbone layers that train in fine-tune: all, none, top:N (the last N layers with "
        "weights, BatchNorm not counted), blocks:N (the last N blocks of a keras.applications "
        "family), from:LAYER_NAME (that layer and all after it), regex:PATTERN (layers whose "
        "name matches).",
        parse=Unfreeze.parse,
        format=str,
    )
    unfreeze_schedule: int = option(
        0,
        "gradual:K: in fine-tune, epoch e trains only the top K x (e + 1) blocks (blocks:N) or "
        "layers of --unfreeze (ULMFiT); empty: all at once.",
        parse=parse_unfreeze_schedule,
        format=lambda k: f"gradual:{k}" if k else "",
    )
    bn_mode: str = option(
        "frozen",
        "Backbone BatchNorm in fine-tune: frozen "
        "(inference mode, statistics untouched), train (the backbone runs with "
        "training=True: batch statistics, moving averages updated) or adapt (AdaBN: before the "
        "first phase, every backbone BatchNorm takes the exact statistics of the training "
        "images, then stays frozen; the head phase trains on them too).",
        choices=BN_MODES,
    )

    def __post_init__(self) -> None:
        check_options(self)
        # A Python caller may give a number or text: checked as the flag's text is.
        object.__setattr__(self, "head_lr", parse_rate(self.head_lr, "head_lr", auto=True))
        object.__setattr__(self, "finetune_lr", parse_rate(self.finetune_lr, "finetune_lr"))
        require(
            self.head_lr != AUTO_RATE or self.head_epochs > 0,
            "head_lr",
            self.head_lr,
            "the range test is for the head phase, which has 0 epochs (--head_epochs=0)",
            "a rate > 0, or --head_epochs >= 1 with it",
        )
        self.to_phases()  # each PhaseConfig checks its values

    def to_phases(self) -> tuple[PhaseConfig, PhaseConfig]:
        """The head phase and the fine-tune phase, in order."""
        return (
            PhaseConfig(
                "head",
                self.head_epochs,
                self.head_lr,
                Unfreeze("none"),
                bn_mode="adapt" if self.bn_mode == "adapt" else "frozen",  # AdaBN: before phase 1
            ),
            PhaseConfig(
                "finetune",
                self.finetune_epochs,
                self.finetune_lr,
                self.unfreeze,
                bn_mode=self.bn_mode,
                gradual=self.unfreeze_schedule,
            ),
        )

    @classmethod
    def of(cls, phases: tuple[PhaseConfig, ...]) -> TwoPhases:
        """The flags' view of `phases`; a phase left out counts as 0 epochs. Raises ValueError
        for phases the flags cannot express (other names, a head phase that unfreezes)."""
        by_name = {phase.name: phase for phase in phases}
        head, finetune = by_name.get("head"), by_name.get("finetune")
        if set(by_name) - {"head", "finetune"} or len(by_name) != len(phases):
            raise ValueError(f"phases {[p.name for p in phases]}: not a head and a finetune phase")
        adapt = "adapt" if finetune and finetune.bn_mode == "adapt" else "frozen"
        if head and (head.unfreeze != Unfreeze("none") or head.bn_mode != adapt or head.gradual):
            raise ValueError(f"{head}: the flags' head phase keeps the backbone frozen")
        default = cls()
        values = {}
        if head:
            values.update(head_epochs=head.epochs, head_lr=head.learning_rate)
        else:
            values.update(head_epochs=0)
        if finetune:
            values.update(
                finetune_epochs=finetune.epochs,
                finetune_lr=finetune.learning_rate,
                unfreeze=finetune.unfreeze,
                unfreeze_schedule=finetune.gradual,
                bn_mode=finetune.bn_mode,
            )
        else:
            values.update(finetune_epochs=0)
        return dataclasses.replace(default, **values)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What the model learns: single-label classification, multi-label classification (a
    sigmoid per label, F1 at `threshold`) or regression (one output per target column, with
    `regression_loss` on standardised targets). Labels or targets of multilabel and regression
    come from --dataset=csv."""

    task: str = option(
        "classification",
        "classification (one class per example, softmax), multilabel (any number of labels "
        "per example, a sigmoid each; --dataset=csv) or regression (one or more targets; "
        "--dataset=csv).",
        choices=TASKS,
    )
    threshold: float = option(
        0.5,
        "--task=multilabel: a label is predicted when its probability is over this (F1 metrics, "
        "the served labels).",
        check=lambda value: 0 < value < 1,
        problem="out of range",
        accepted="0 < x < 1",
    )
    regression_loss: str = option(
        "mse",
        "--task=regression: mse, huber (delta 1 standard deviation) or mae, on targets "
        "standardised by the training targets' mean and standard deviation.",
        choices=REGRESSION_LOSSES,
    )

    def __post_init__(self) -> None:
        check_options(self)


@dataclasses.dataclass(frozen=True)
class DistributeConfig:
    """Which tf.distribute strategy runs the steps, on which devices.

    `logical_devices` > 0 splits the first GPU (or the CPU) into that many logical devices
    first, so multi-replica runs can be reproduced on one machine.
    """

    strategy: str = option(
        "auto",
        "auto (mirrored when more than one GPU is "
        "visible, else default), default, one_device, mirrored, or multi_worker (the cluster "
        "from TF_CONFIG).",
        choices=STRATEGIES,
    )
    devices: tuple[str, ...] = option(
        (),
        "Devices for mirrored or one_device, e.g. /gpu:0,/gpu:1; empty: every GPU, or the CPU(s).",
        parse=tuple,
        format=list,
        hparam=False,
    )
    logical_devices: int = option(
        0,
        "Split the first GPU (or the CPU) into this "
        "many logical devices before the strategy is made; 0: no split.",
        check=lambda value: value >= 0,
        problem="negative",
        accepted=">= 0",
        hparam=False,
    )
    logical_device_memory_mb: int = option(
        2048,
        "Memory of each logical GPU made by --logical_devices.",
        check=lambda value: value >= 1,
        problem="too small",
        accepted=">= 1",
        hparam=False,
    )
    cluster_timeout_secs: float = option(
        300.0,
        "multi_worker: give up, with an "
        "error, if the cluster of TF_CONFIG is not up after this many seconds.",
        check=lambda value: value > 0,
        problem="not positive",
        accepted="> 0",
        hparam=False,
    )

    def __post_init__(self) -> None:
        check_options(self)
        require(
            not self.devices or self.strategy in ("mirrored", "one_device"),
            "devices",
            ",".join(self.devices),
            f"does not apply to --strategy={self.strategy}",
            "--strategy=mirrored or one_device with --devices",
        )
        require(
            self.strategy != "one_device" or len(self.devices) <= 1,
            "devices",
            ",".join(self.devices),
            "one_device takes one device",
            "a single device name, e.g. /gpu:0",
        )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The whole run: data, model, the phases in order, and how steps are compiled."""

    workdir: str = option(
        help="Directory for this run's outputs.",
        check=bool,
        problem="empty",
        accepted="a directory path",
        hparam=False,
    )
    overwrite: bool = option(
        False,
        "Replace a previous run's outputs in --workdir (they are listed as removed).",
        hparam=False,
    )
    seed: int = option(0, "Seed for initialisation, shuffling and dropout.")
    # RUF009: section() and option() return dataclasses.field()s, as field specifiers do.
    data: DataConfig = section(DataConfig)  # noqa: RUF009
    model: ModelConfig = section(ModelConfig)  # noqa: RUF009
    task: TaskConfig = section(TaskConfig)  # noqa: RUF009
    phases: tuple[PhaseConfig, ...] = section(TwoPhases, TwoPhases.to_phases, TwoPhases.of)
    training: TrainingConfig = section(TrainingConfig)  # noqa: RUF009
    distribute: DistributeConfig = section(DistributeConfig)  # noqa: RUF009
    logging: LoggingConfig = section(LoggingConfig)  # noqa: RUF009
    checkpoint: CheckpointConfig = section(CheckpointConfig)  # noqa: RUF009
    nan_policy: str = option(
        "stop",
        "A NaN or Inf loss or gradient: stop (exit with an error naming the step; no "
        "checkpoint is written over the last good one) or skip_step (no update; counted).",
        choices=NAN_POLICIES,
    )
    deterministic: bool = option(
        False,
        "Deterministic ops "
        "(tf.config.experimental.enable_op_determinism): with the same seed, a run killed "
        "and resumed ends bit-identical to one that was not.",
        hparam=False,
    )
    jit_compile: bool = option(
        False,
        "Compile the train step with XLA: on one device the whole step where every op has an "
        "XLA kernel, else the loss and gradients only (the choice and its reason are logged).",
    )
    feature_cache: str = option(
        "auto",
        "auto: a phase with the backbone frozen and no augmentation computes backbone features "
        "once and trains the head on them (logged per phase); off: never.",
        choices=FEATURE_CACHE,
        hparam=False,
    )
    steps_per_loop: int | str = option(
        "auto",
        "Train steps per host call (a tf.while_loop inside one tf.function call): a number, "
        "or auto: as many as fit before the next logged step, checkpoint, evaluation or "
        "profiler boundary, with calls of about a second (same batches and logged rows as 1).",
        parse=lambda text: parse_steps_per_loop(text, "steps_per_loop"),
        format=str,
        hparam=False,
    )
    supervise: bool = option(
        True,
        "Train in a child process this one supervises: a death (SIGSEGV, the OOM killer) is "
        "reported in one line with the step, the intact checkpoint and a known remedy; "
        "--nosupervise trains in this process (for a debugger).",
        hparam=False,
    )
    max_restarts: int = option(
        0,
        "Restart a training process that died, from its last checkpoint, up to this many "
        "times (with a back-off; not when it died at the same step as before).",
        check=lambda value: value >= 0,
        problem="negative",
        accepted="0 (report and stop) or a number of restarts",
        hparam=False,
    )
    recipe: str = option(
        "auto",
        "auto: learning rates, epochs, schedule and warm-up, augmentation, label smoothing, "
        "MixUp and EMA chosen from the training examples, classes and backbone kind (the "
        "table in docs/defaults.md; logged, and written to flags.txt and results.json); a flag "
        "given explicitly wins. guide: the flags' own defaults, the Keras guide's numbers.",
        choices=RECIPES,
    )
    # The flags the user gave explicitly (the recipe leaves them alone); not itself a flag.
    # None (a RunConfig made in Python): those whose values differ from their defaults.
    given: frozenset[str] | None = dataclasses.field(
        default=None, compare=False, repr=False, metadata={_GIVEN: True}
    )

    def __post_init__(self) -> None:
        check_options(self)
        # A Python caller may give a number or "auto": checked as the flag's text is.
        object.__setattr__(self, "steps_per_loop", parse_steps_per_loop(self.steps_per_loop))
        require(
            self.supervise or not self.max_restarts,
            "max_restarts",
            self.max_restarts,
            "--nosupervise trains in this process, which cannot restart itself",
            "--supervise (the default) with --max_restarts, or no restarts",
        )
        # Values that --image_size and --seed give to two places each must agree.
        require(
            self.data.image_size == self.model.image_size,
            "image_size",
            self.model.image_size,
            "data and model disagree",
            "one value",
        )
        require(
            self.data.seed == self.seed, "seed", self.seed, "data and run disagree", "one value"
        )
        require(
            not (self.model.mixed_precision == "float16" and self.training.layer_lr_decay),
            "mixed_precision",
            self.model.mixed_precision,
            "float16 loss scaling and --layer_lr_decay do not combine",
            "bfloat16 (no loss scaling), or no --layer_lr_decay",
        )
        require(
            any(phase.epochs for phase in self.phases),
            "head_epochs",
            tuple(phase.epochs for phase in self.phases),
            "every phase has 0 epochs, nothing would train",
            "at least one of --head_epochs, --finetune_epochs >= 1",
        )


# ---------------------------------------------------------------------------------------------
# From flag values to a RunConfig and back, all read off the fields above.


def _walk(kind: type) -> Iterator[tuple[type, dataclasses.Field]]:
    """(owner, field) for every option field under `kind`, in field order."""
    for field in dataclasses.fields(kind):
        if option_of(field) is not None:
            yield kind, field
        elif _SECTION in field.metadata:
            yield from _walk(field.metadata[_SECTION].kind)


def options() -> tuple[Option, ...]:
    """Every option of a RunConfig, in flags.txt order, with `flag`, `owner` and `default`
    (the flag's default: None for a field without one) filled in."""
    found = []
    for owner, field in _walk(RunConfig):
        meta = option_of(field)
        missing = field.default is dataclasses.MISSING
        found.append(
            dataclasses.replace(
                meta,
                flag=meta.flag or field.name,
                owner=f"{owner.__module__}.{owner.__name__}",
                default=None if missing else meta.to_flag(field.default),
            )
        )
    return tuple(found)


def _build(kind: type, values: Mapping[str, Any], by_flag: Mapping[str, Option]) -> Any:
    kwargs = {}
    for field in dataclasses.fields(kind):
        if option_of(field) is not None:
            flag = option_of(field).flag or field.name
        elif _FOLLOWS in field.metadata:
            flag = field.metadata[_FOLLOWS]
        elif _SECTION in field.metadata:
            meta = field.metadata[_SECTION]
            built = _build(meta.kind, values, by_flag)
            kwargs[field.name] = meta.build(built) if meta.build else built
            continue
        else:
            continue
        if flag in values:
            kwargs[field.name] = by_flag[flag].to_value(values[flag])
    return kind(**kwargs)


def from_flags(values: Mapping[str, Any], given: Collection[str] | None = None) -> RunConfig:
    """The RunConfig that `values` (flag name -> value as absl holds it: text for --classes,
    --augment, --unfreeze, ...) describe; flags left out keep their defaults. `given` names
    the flags the user set explicitly (default: those in `values`), which --recipe=auto
    leaves alone. Raises ConfigError naming the first bad flag, or the names that are not
    flags."""
    by_flag = {meta.flag: meta for meta in options()}
    unknown = sorted(set(values) - set(by_flag))
    if unknown:
        raise ConfigError(str(unknown), problem="not tlloop flags", accepted=", ".join(by_flag))
    config = _build(RunConfig, values, by_flag)
    object.__setattr__(config, "given", frozenset(values if given is None else given))
    return config


def _read(config: Any, out: dict[str, Any]) -> dict[str, Any]:
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if option_of(field) is not None:
            meta = option_of(field)
            out[meta.flag or field.name] = meta.to_flag(value)
        elif _SECTION in field.metadata:
            meta = field.metadata[_SECTION]
            _read(meta.read(value) if meta.read else value, out)
    return out


def flag_values(config: RunConfig) -> dict[str, Any]:
    """Every flag's value (as absl holds it) for `config`, in flags.txt order:
    `from_flags(flag_values(config)) == config` for any config the flags can express.
    Raises ValueError for phases they cannot (see `TwoPhases.of`)."""
    return _read(config, {})


def given_flags(config: RunConfig) -> frozenset[str]:
    """The flags `config`'s user gave: `config.given`, or, for a RunConfig made in Python
    (given None), every flag whose value differs from its default."""
    if config.given is not None:
        return config.given
    values = flag_values(config)
    return frozenset(meta.flag for meta in options() if values[meta.flag] != meta.default)


def hparams(config: RunConfig) -> dict[str, str | int | float | bool]:
    """The run's hyperparameters for the HParams dashboard: every option that can change what
    the run learns (plumbing such as paths of outputs, cadences and devices left out), by flag
    name, as flat values; structured values as their flag text."""
    values = flag_values(config)
    flat = {}
    for meta in options():
        if not meta.hparam:
            continue
        value = values[meta.flag]
        if isinstance(value, list):
            value = ",".join(value)
        elif meta.parse is not None and isinstance(value, str):
            parsed = meta.to_value(value)  # a rate given as text ("auto" or a number)
            if isinstance(parsed, float):
                value = parsed
        flat[meta.flag] = value
    return flat
