"""The typed, frozen configuration of one tlloop run, and the command-line options it defines.

Everything below the entry point reads these dataclasses, never absl flags. Each option is
defined once, on the dataclass field that holds it (`option`): its default, its help text, its
check, and how its flag's text becomes the value (`parse`) and back (`format`). `tlloop.flags`
makes the absl flags from these fields, `from_flags` builds a RunConfig from flag values, and
`flag_values` / `hparams` read one back. Each value is validated when its dataclass is made; a
`ConfigError` names the flag that carries the value, says what is wrong and what would be
accepted. This module imports no TensorFlow, so bad flags are refused before TensorFlow is even
loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

from tlloop.errors import ConfigError

DATASETS = ("digits", "folder", "tfrecord", "csv", "text_folder", "tfds:NAME")
TASKS = ("classification", "multilabel", "regression")
REGRESSION_LOSSES = ("mse", "huber", "mae")
BN_MODES = ("frozen", "train", "adapt")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker")
AUGMENT_OPS = ("flip", "rotate", "zoom", "contrast", "translate", "crop")
BAD_IMAGES = ("fail", "skip")
RESIZE_MODES = ("squash", "crop", "pad")
NAN_POLICIES = ("stop", "skip_step")
EXPORTS = ("best", "last")
OPTIMIZERS = ("adam", "adamw", "sgd", "lamb")
LR_SCHEDULES = ("constant", "cosine", "linear", "step")
FEATURE_CACHE = ("auto", "off")
RECIPES = ("auto", "guide")
MIXED_PRECISION = ("", "float16", "bfloat16")
TFLITE_FORMATS = ("float32", "dynamic", "int8")
BACKBONE_CHANNELS = ("", "rgb", "grayscale")
BACKBONE_RANGES = {"0:255": (1.0, 0.0), "0:1": (1 / 255, 0.0), "-1:1": (1 / 127.5, -1.0)}


def parse_backbone_range(text: str) -> tuple[float, float] | str | None:
    """--backbone_range's value as (scale, offset), "imagenet", "" (the source's own), or None
    when it is not one."""
    if text in ("", "imagenet"):
        return text
    if text in BACKBONE_RANGES:
        return BACKBONE_RANGES[text]
    parts = text.split(":")
    try:
        scale, offset = (float(part) for part in parts)
    except ValueError:
        return None
    return (scale, offset) if len(parts) == 2 else None


def _require(ok: bool, flag: str, value: object, problem: str, accepted: str) -> None:
    if not ok:
        raise ConfigError(flag, repr(value), problem, accepted)


# ---------------------------------------------------------------------------------------------
# Option metadata: one command-line option per dataclass field.

_OPTION = "tlloop.option"  # field metadata key: the field is set by its own flag
_FOLLOWS = "tlloop.follows"  # field metadata key: the field takes another field's flag value
_SECTION = "tlloop.section"  # field metadata key: the field is a dataclass of options
_GIVEN = "tlloop.given"  # field metadata key: the flags given explicitly (not an option)


@dataclasses.dataclass(frozen=True)
class Option:
    """How one config field is set from the command line.

    `flag` is the flag's name (the field's name unless given). The flag's type follows from
    its default as text (`format` of the field's default): bool, int, float, list or str; a str
    with `choices` is an enum flag. `parse` turns the flag's value into the field's (and raises
    ConfigError naming the flag), `format` turns a field value back into the flag's, so that
    `parse(format(v)) == v`. `check` must hold for every value, else ConfigError with `problem`
    and `accepted`. `hparam` False marks plumbing that does not change what a run learns (paths
    of its own outputs, cadences, devices). `evaluation` marks the flags that say which examples
    a run is evaluated on: `tlloop.evaluate` takes these to evaluate on other data.
    `owner` (the dataclass) and `default` (the flag's default) are filled in by `options()`.
    """

    help: str
    flag: str = ""
    parse: Callable[[Any], Any] | None = None
    format: Callable[[Any], Any] | None = None
    choices: tuple[str, ...] = ()
    check: Callable[[Any], bool] | None = None
    problem: str = ""
    accepted: str = ""
    hparam: bool = True
    evaluation: bool = False
    owner: str = ""
    default: Any = None

    @property
    def kind(self) -> str:
        """The absl flag type: bool, integer, float, list, enum or string."""
        if isinstance(self.default, bool):
            return "bool"
        if isinstance(self.default, int):
            return "integer"
        if isinstance(self.default, float):
            return "float"
        if isinstance(self.default, list):
            return "list"
        return "enum" if self.choices else "string"

    def to_value(self, flag_value: Any) -> Any:
        """The field value of this flag's value (as absl holds it)."""
        return self.parse(flag_value) if self.parse else flag_value

    def to_flag(self, value: Any) -> Any:
        """This flag's value (as absl holds it) for the field value `value`."""
        return self.format(value) if self.format else value


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    **kw: Any,
) -> Any:
    """A dataclass field that is a command-line option; `kw` are `Option`'s fields.

    A field without a default makes a flag whose default is None (a required flag)."""
    return dataclasses.field(default=default, metadata={_OPTION: Option(help, **kw)})


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


def _check_options(config: Any) -> None:
    """Runs every option field's own check (choices, `check`) on `config`."""
    for field in dataclasses.fields(config):
        meta = field.metadata.get(_OPTION)
        if meta is None:
            continue
        flag, value = meta.flag or field.name, getattr(config, field.name)
        if meta.choices:
            _require(value in meta.choices, flag, value, "unknown", ", ".join(meta.choices))
        if meta.check is not None:
            _require(meta.check(value), flag, value, meta.problem, meta.accepted)


# ---------------------------------------------------------------------------------------------
# Values parsed from a flag's text.


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


def format_augment(ops: tuple[AugmentOp, ...]) -> str:
    """The `--augment` text of `ops`: `parse_augment(format_augment(ops)) == ops`."""
    return ",".join(op.name if op.name == "flip" else f"{op.name}:{op.factor!r}" for op in ops)


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


def parse_tflite_formats(spec: Any) -> tuple[str, ...]:
    """Parses `--export_tflite`: a comma list (or list) of float32, dynamic, int8 in any order,
    each once; empty: no TFLite export. Needs the LiteRT interpreter (`ai-edge-litert`, the
    `tflite` extra), which checks every file: refused here when it is not installed."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    formats = tuple(filter(None, (str(item).strip() for item in items)))
    text = ",".join(formats)
    accepted = "a comma list of float32, dynamic, int8 (each once), or empty"
    for name in formats:
        _require(
            name in TFLITE_FORMATS, "export_tflite", text, f"unknown format {name!r}", accepted
        )
    _require(len(set(formats)) == len(formats), "export_tflite", text, "a format twice", accepted)
    # find_spec imports nothing: the check costs no TensorFlow start-up.
    _require(
        not formats or importlib.util.find_spec("ai_edge_litert") is not None,
        "export_tflite",
        text,
        "the LiteRT interpreter that verifies each file is not installed",
        'pip install "tlloop[tflite]" (ai-edge-litert), or no --export_tflite',
    )
    return formats


def parse_wise_ft(spec: Any) -> tuple[float, ...]:
    """Parses `--wise_ft`: a comma list (or sequence) of interpolation weights a in [0, 1],
    each once, in the order given; empty: no WiSE-FT."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    texts = [str(item).strip() for item in items if str(item).strip()]
    accepted = "a comma list of numbers in [0, 1], each once (e.g. 0,0.25,0.5,0.75,1), or empty"
    alphas = []
    for text in texts:
        try:
            alpha = float(text)
        except ValueError:
            alpha = float("nan")
        _require(
            0 <= alpha <= 1, "wise_ft", ",".join(texts), f"{text!r} is not in [0, 1]", accepted
        )
        alphas.append(alpha)
    _require(len(set(alphas)) == len(alphas), "wise_ft", ",".join(texts), "a value twice", accepted)
    return tuple(alphas)


def parse_wise_ft_export(value: Any) -> str | float:
    """Parses `--wise_ft_export`: "best", or a number (one of --wise_ft's values, which
    CheckpointConfig checks)."""
    if value == "best":
        return "best"
    try:
        alpha = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        alpha = float("nan")
    _require(
        alpha == alpha,
        "wise_ft_export",
        value,
        "not best or a number",
        "best, or a --wise_ft value",
    )
    return alpha


def parse_steps_per_loop(value: Any, name: str = "steps_per_loop") -> int | str:
    """--steps_per_loop's value: "auto", or a whole number >= 1 (given as text or int)."""
    if value == "auto":
        return "auto"
    text = str(value).strip()
    _require(
        not isinstance(value, bool)
        and re.fullmatch(r"[0-9]+", text) is not None
        and int(text) >= 1,
        name,
        value,
        "not auto or a step count",
        "auto, or a whole number of steps >= 1",
    )
    return int(text)


AUTO_RATE = "auto"
# The learning-rate range test's first and last rates and its steps: python -m tlloop.lr_find's
# defaults, and what --head_lr=auto runs.
RANGE_TEST = (1e-7, 10.0, 100)


def parse_rate(value: Any, name: str, auto: bool = False) -> float | str:
    """A learning rate flag's value: a number > 0 (given as text or number), or, where `auto`,
    "auto" (the learning-rate range test's suggestion, found before training starts)."""
    if auto and value == AUTO_RATE:
        return AUTO_RATE
    accepted = "a rate > 0" + (", or auto (the range test's suggestion)" if auto else "")
    if value == AUTO_RATE:
        _require(
            False,
            name,
            value,
            "the range test runs before training, with a fresh head on the pretrained "
            "backbone, so it can suggest only --head_lr",
            "a rate > 0 (python -m tlloop.lr_find --phase=finetune suggests one)",
        )
    try:
        rate = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        rate = float("nan")
    _require(rate > 0, name, value, "not a positive number", accepted)
    return rate


def _lower_direction(name: str) -> bool:
    """Whether lower is better for metric `name` by default: losses and errors."""
    return name.endswith(("loss", "error"))


AUTO_METRIC = "auto"


@dataclasses.dataclass(frozen=True)
class BestMetric:
    """The evaluation metric whose best value the run keeps a checkpoint of.

    `name` "auto" (the default) is the task's own (`Task.best_metric`: accuracy for
    classification, micro_f1 for multilabel, root_mean_squared_error:min for regression),
    chosen when the run starts; results.json names the one used. `direction` "max" or "min";
    empty: min for loss and names ending in loss or error, else max. Any metric name is taken
    here; whether the run's evaluation reports it is checked when the run starts."""

    name: str = AUTO_METRIC
    direction: str = ""

    def __post_init__(self) -> None:
        accepted = "max, min, or empty (min for losses and errors, else max)"
        _require(
            self.direction in ("", "max", "min"),
            "best_metric",
            str(self),
            "unknown direction",
            accepted,
        )
        if self.name == AUTO_METRIC:
            _require(
                not self.direction,
                "best_metric",
                str(self),
                "auto's direction is the task's",
                "auto alone",
            )
        elif not self.direction:
            object.__setattr__(self, "direction", "min" if _lower_direction(self.name) else "max")

    @classmethod
    def parse(cls, spec: str) -> BestMetric:
        """Parses `--best_metric`: auto, or a metric name (letters, digits, _, /), optionally
        :max or :min; the default direction is min for loss and names ending in loss or error,
        else max."""
        accepted = (
            "a metric name (letters, digits, _, /) such as accuracy or loss, optionally with "
            ":max or :min (e.g. loss:min), or auto (the task's)"
        )
        name, colon, direction = spec.partition(":")
        _require(
            re.fullmatch(r"[A-Za-z0-9_/]+", name) is not None,
            "best_metric",
            spec,
            "not a metric name",
            accepted,
        )
        _require(
            not colon or direction in ("max", "min"),
            "best_metric",
            spec,
            "unknown direction" if name != AUTO_METRIC else "auto's direction is the task's",
            accepted,
        )
        return cls(name, direction)

    def to_flag(self) -> str:
        """The `--best_metric` text: the name alone when the direction is its default."""
        if self.name == AUTO_METRIC:
            return AUTO_METRIC
        default = "min" if _lower_direction(self.name) else "max"
        return self.name if self.direction == default else str(self)

    def resolved(self, default: tuple[str, str]) -> BestMetric:
        """This metric, or for "auto" the task's `default` (name, direction)."""
        return BestMetric(*default) if self.name == AUTO_METRIC else self

    def better(self, value: float, than: float) -> bool:
        """True if `value` is strictly better than `than` (anything beats NaN, the unset)."""
        if self.name == AUTO_METRIC:
            raise ValueError("best_metric='auto': resolve it with the task first (resolved())")
        if than != than:
            return value == value
        return value > than if self.direction == "max" else value < than

    def __str__(self) -> str:
        return f"{self.name}:{self.direction}" if self.direction else self.name


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
        _check_options(self)
        if self.dataset == "csv":
            _require(
                bool(self.train_csv),
                "train_csv",
                self.train_csv,
                "--dataset=csv needs it",
                "a CSV file with a header (path or text, then labels or targets)",
            )
        _require(
            not self.val_csv or self.dataset == "csv",
            "val_csv",
            self.val_csv,
            f"--dataset={self.dataset} does not read it",
            "--val_csv only with --dataset=csv",
        )
        if self.dataset == "tfrecord":
            _require(
                bool(self.train_files),
                "train_files",
                self.train_files,
                "--dataset=tfrecord needs it",
                "a glob of TFRecord files of tf.train.Example records",
            )
        if self.dataset in ("folder", "text_folder"):
            _require(
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
            _require(
                not getattr(self, flag) or self.dataset in readers,
                flag,
                getattr(self, flag),
                f"--dataset={self.dataset} does not read it",
                f"--{flag} only with --dataset={' or '.join(readers)}",
            )
        _require(
            not self.data_cache or self.dataset in ("folder", "tfrecord", "csv"),
            "data_cache",
            self.data_cache,
            f"--dataset={self.dataset} is decoded in memory, not read from files",
            "--data_cache only with --dataset=folder, tfrecord or csv (of images)",
        )
        _require(
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
            _require(
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
        _check_options(self)


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
    """One training phase: its length, its learning rate (or its own Keras optimizer), what in
    the backbone trains, and in which mode the backbone runs.

    `unfreeze` is an Unfreeze or its text ("none", the default: the backbone is frozen; "all",
    "top:2", "blocks:3", "from:NAME", "regex:PATTERN"). `bn_mode` "frozen" keeps the backbone in
    inference mode with its BatchNormalization layers untrainable; "train" runs the backbone
    with training=True (batch statistics, moving averages updated, Dropout active) and trains
    the BatchNormalization scales and offsets it unfreezes; "adapt" (AdaBN, `tlloop.adabn`) is
    "frozen" after every backbone BatchNorm took the training images' statistics, once before
    the run's first phase. `gradual` K > 0: epoch e trains
    only the top K x (e + 1) blocks or layers of `unfreeze`. `optimizer`, a Keras optimizer
    (with its own learning rate or schedule), replaces the run's optimizer settings for this
    phase; a fresh copy is made for each trainable set. Give `learning_rate` or `optimizer`.
    `modes`, a `ModeTable`, sets the `training` value of each submodule in the train step
    directly (e.g. a text encoder's Dropout on while its BatchNorm-free layers fine-tune);
    default: the backbone in training mode only with bn_mode "train". `learning_rate` "auto"
    (--head_lr=auto) is for `build_experiment`, which replaces it with the range test's
    suggestion; a Trainer refuses it.
    """

    name: str
    epochs: int
    learning_rate: float | str | None = None
    unfreeze: Unfreeze = Unfreeze("none")
    bn_mode: str = "frozen"
    gradual: int = 0
    optimizer: Any = dataclasses.field(default=None, compare=False)
    modes: Any = None  # a tlloop.ModeTable (models/modes.py: this module imports no TF)

    def __post_init__(self) -> None:
        if isinstance(self.unfreeze, str):
            object.__setattr__(self, "unfreeze", Unfreeze.parse(self.unfreeze))
        _require(
            self.gradual >= 0,
            "unfreeze_schedule",
            f"gradual:{self.gradual}",
            "K must be positive",
            "gradual:K with K >= 1, or empty",
        )
        _require(
            not (self.gradual and self.unfreeze.kind == "none"),
            "unfreeze_schedule",
            f"gradual:{self.gradual}",
            "with --unfreeze=none no backbone layer would ever train",
            "--unfreeze=all, top:N, blocks:N, from:LAYER_NAME or regex:PATTERN with it, or no "
            "--unfreeze_schedule",
        )
        _require(self.epochs >= 0, f"{self.name}_epochs", self.epochs, "negative", ">= 0")
        _require(
            (self.learning_rate is None) != (self.optimizer is None),
            f"{self.name}_lr",
            self.learning_rate,
            "give a learning rate or an optimizer, not both or neither",
            "a rate > 0, or optimizer=keras.optimizers.X(...) and no learning_rate",
        )
        _require(
            self.learning_rate is None
            or self.learning_rate == AUTO_RATE
            or (not isinstance(self.learning_rate, str) and self.learning_rate > 0),
            f"{self.name}_lr",
            self.learning_rate,
            "not positive",
            "> 0",
        )
        _require(self.bn_mode in BN_MODES, "bn_mode", self.bn_mode, "unknown", ", ".join(BN_MODES))
        _require(
            self.modes is None or self.bn_mode != "train",
            "bn_mode",
            self.bn_mode,
            "given together with a mode table, which already says the backbone's mode",
            "one of the two",
        )
        # The default mode table runs the backbone in training mode only when something in it
        # trains (phases.plan_phases): with nothing unfrozen, "train" would change nothing.
        _require(
            not (self.bn_mode == "train" and self.unfreeze.kind == "none"),
            "bn_mode",
            self.bn_mode,
            "with --unfreeze=none no backbone layer trains and the backbone stays in inference "
            "mode, so it would change nothing",
            "frozen, or train with an --unfreeze policy that trains backbone layers (a "
            "ModeTable sets the backbone's mode directly)",
        )


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
        _check_options(self)
        # A Python caller may give a number or text: checked as the flag's text is.
        object.__setattr__(self, "head_lr", parse_rate(self.head_lr, "head_lr", auto=True))
        object.__setattr__(self, "finetune_lr", parse_rate(self.finetune_lr, "finetune_lr"))
        _require(
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
        _check_options(self)


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
    export use them. `layer_lr_decay` R in (0, 1]: each backbone block/layer down gets R x the
    rate of the one above. `l2sp` and `l2sp_head` add L2-SP's penalty (see `tlloop.anchors`).
    """

    optimizer: str = option(
        "adam",
        "Optimizer of every phase (a fresh one per phase): adam, adamw, sgd (momentum 0.9), lamb.",
        choices=OPTIMIZERS,
    )
    weight_decay: float = option(
        0.0,
        "Decoupled weight decay; never applied to biases or BatchNorm weights; 0: none.",
        check=lambda value: 0 <= value < 1,
        problem="out of range",
        accepted="[0, 1)",
    )
    lr_schedule: str = option(
        "constant",
        "Learning rate over each phase's optimizer steps: constant, cosine (to 0), linear (to "
        "0), step (x0.1 at 50% and 75%).",
        choices=LR_SCHEDULES,
    )
    warmup_steps: int = option(
        0,
        "Linear warmup from 0, optimizer steps.",
        check=lambda value: value >= 0,
        problem="negative",
        accepted="0 (none) or a count",
    )
    warmup_epochs: int = option(
        0,
        "Linear warmup from 0, in epochs.",
        check=lambda value: value >= 0,
        problem="negative",
        accepted="0 (none) or a count",
    )
    clip_grad_norm: float = option(
        0.0,
        "Clip the global batch's gradient to this global norm; 0: off.",
        check=lambda value: value >= 0,
        problem="negative",
        accepted="0 (off) or a norm > 0",
    )
    grad_accum_steps: int = option(
        1,
        "Batches per optimizer step (gradients averaged): a k-times larger effective batch.",
        check=lambda value: value >= 1,
        problem="too small",
        accepted="1 (off) or more batches per optimizer step",
    )
    label_smoothing: float = option(
        0.0,
        "Label smoothing of the training loss.",
        check=lambda value: 0 <= value < 1,
        problem="out of range",
        accepted="0 <= x < 1",
    )
    layer_lr_decay: float = option(
        0.0,
        "Discriminative learning rates: the top backbone block (or layer) trains at R x the "
        "phase's rate, the next at R^2, ...; the head at the rate; 0: off.",
        check=lambda value: 0 <= value <= 1,
        problem="out of range",
        accepted="0 (off) or 0 < R <= 1",
    )
    ema_decay: float = option(
        0.0,
        "Keep exponential moving averages of the weights (e.g. 0.999); evaluations, the best "
        "checkpoint and the export use them; 0: off.",
        check=lambda value: 0 <= value < 1,
        problem="out of range",
        accepted="[0, 1)",
    )
    l2sp: float = option(
        0.0,
        "L2-SP (Li et al., 2018): add ALPHA/2 x ||w - w0||^2 over the trainable backbone "
        "weights, w0 their values at the run's start (kept in the checkpoint); 0: off.",
        check=lambda value: value >= 0,
        problem="negative",
        accepted="0 (off) or ALPHA > 0, e.g. 0.01",
    )
    l2sp_head: float = option(
        0.0,
        "L2-SP's second term: add BETA/2 x ||w||^2 over the head's kernels (not its biases "
        "or BatchNorm weights); 0: off.",
        check=lambda value: value >= 0,
        problem="negative",
        accepted="0 (off) or BETA > 0, e.g. 0.01",
    )
    class_weights: str = option(
        "",
        "auto: weigh each training example's loss inversely to its class's frequency.",
        check=lambda value: value in ("", "auto"),
        problem="unknown",
        accepted="auto, or empty for none",
    )
    mixup: float = option(
        0.0,
        "MixUp alpha: each training batch is blended with a permutation of itself, with a "
        "fraction drawn from Beta(alpha, alpha) and soft labels; 0: off.",
        check=lambda value: 0 <= value <= 10,
        problem="out of range",
        accepted="0 (off) or an alpha in (0, 10], e.g. 0.2",
    )
    cutmix: float = option(
        0.0,
        "CutMix alpha: a box of each training image is replaced by its partner's, its area "
        "from Beta(alpha, alpha), with soft labels; with --mixup, each batch takes one of the "
        "two at random; 0: off.",
        check=lambda value: 0 <= value <= 10,
        problem="out of range",
        accepted="0 (off) or an alpha in (0, 10], e.g. 1.0",
    )
    mix_prob: float = option(
        1.0,
        "Probability that a training batch is mixed by --mixup or --cutmix.",
        check=lambda value: 0 < value <= 1,
        problem="out of range",
        accepted="0 < p <= 1",
    )

    def __post_init__(self) -> None:
        _check_options(self)
        _require(
            self.mix_prob == 1.0 or bool(self.mixup or self.cutmix),
            "mix_prob",
            self.mix_prob,
            "there is no --mixup or --cutmix to apply",
            "--mix_prob with --mixup=ALPHA or --cutmix=ALPHA, or no --mix_prob",
        )
        _require(
            not (self.warmup_steps and self.warmup_epochs),
            "warmup_steps",
            self.warmup_steps,
            "given together with --warmup_epochs",
            "one of the two",
        )
        # Decoupled decay pulls the same weights toward 0 that L2-SP pulls toward w0.
        _require(
            not (self.weight_decay and (self.l2sp or self.l2sp_head)),
            "weight_decay",
            self.weight_decay,
            f"given together with --{'l2sp' if self.l2sp else 'l2sp_head'}, which regularises "
            "the same weights",
            "one of the two (--l2sp_head is the L2 of the head's kernels)",
        )


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
        _check_options(self)
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


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """What is logged, how often, and whether the console shows a progress bar.

    `log_every_steps` and `histogram_every_steps` count global steps, 0 turns them off;
    `profile_steps` is () or (START, END): the profiler traces global steps START to END.
    """

    log_every_steps: int = option(
        10,
        "Write train loss, accuracy, learning "
        "rate and gradient norm every this many global steps; 0: never.",
        check=lambda value: value >= 0,
        problem="negative",
        accepted="0 (off) or a step count >= 1",
        hparam=False,
    )
    histogram_every_steps: int = option(
        0,
        "Write histograms of trainable "
        "weights and their gradients every this many global steps; 0: never.",
        check=lambda value: value >= 0,
        problem="negative",
        accepted="0 (off) or a step count >= 1",
        hparam=False,
    )
    profile_steps: tuple[int, ...] = option(
        (),
        "START,END: trace global steps START to END "
        "with the TensorFlow profiler (TensorBoard's profile tab).",
        parse=parse_profile_steps,
        format=lambda steps: ",".join(map(str, steps)),
        hparam=False,
    )
    quiet: bool = option(False, "No progress bar: log lines only.", hparam=False)
    summaries: bool = option(
        True,
        "Write TensorBoard summaries and metrics.jsonl; "
        "--nosummaries writes neither (results.json and the export are still written).",
        hparam=False,
    )

    def __post_init__(self) -> None:
        _check_options(self)
        # The trace goes to the TensorBoard directory: without summaries nothing may be written.
        _require(
            not (self.profile_steps and not self.summaries),
            "profile_steps",
            ",".join(map(str, self.profile_steps)),
            "--nosummaries writes nothing, a profile neither",
            "no --profile_steps with --nosummaries, or summaries on",
        )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When the run saves a checkpoint (besides each phase start, the end and on SIGTERM),
    which evaluation is the best, when a phase stops early, and what is exported.

    `every_secs` applies to single-host runs only: tasks of a cluster would not agree on time.
    `early_stopping_patience` > 0 ends a phase after that many evaluations without a better
    `best_metric` than the phase's best so far. `export` "best" exports the weights of the best
    evaluation, "last" those at the end.
    """

    every_steps: int = option(
        0,
        "Save a checkpoint every this many "
        "global steps; 0: only by time, at phase starts, at the end and on SIGTERM.",
        flag="checkpoint_every_steps",
        check=lambda value: value >= 0,
        problem="negative",
        accepted="0 (off) or a step count",
        hparam=False,
    )
    every_secs: float = option(
        600.0,
        "Save a checkpoint when this many "
        "seconds have passed since the last (single-host runs); 0: never by time.",
        flag="checkpoint_every_secs",
        check=lambda value: value >= 0,
        problem="negative",
        accepted="0 (off) or seconds",
        hparam=False,
    )
    keep: int = option(
        3,
        "Checkpoints kept in WORKDIR/checkpoints.",
        flag="keep_checkpoints",
        check=lambda value: value >= 1,
        problem="too small",
        accepted=">= 1",
        hparam=False,
    )
    best_metric: BestMetric = option(  # noqa: RUF009  option() returns a dataclasses.field
        BestMetric(),
        "Evaluation metric whose best value is kept in WORKDIR/checkpoints/best: auto (the "
        "task's: accuracy for classification, micro_f1 for multilabel, "
        "root_mean_squared_error:min for regression; results.json names it), loss or another "
        "metric's name, optionally :max or :min (default: min for loss and names ending in "
        "loss or error, else max).",
        parse=BestMetric.parse,
        format=BestMetric.to_flag,
    )
    early_stopping_patience: int = option(
        0,
        "End a phase after this many evaluations without a better --best_metric than the "
        "phase's best so far; 0: never.",
        check=lambda value: value >= 0,
        problem="negative",
        accepted="0 (off) or a number of evaluations",
    )
    export: str = option(
        "best",
        "Weights to export at the end: best (of --best_metric) or last.",
        choices=EXPORTS,
    )
    export_tflite: tuple[str, ...] = option(
        (),
        "Also export TFLite files (export/model_FORMAT.tflite; signatures serving_uint8 and "
        "serving_default, float32, as the SavedModel's) in these formats: float32, dynamic "
        "(dynamic-range int8 weights), int8 (full integer, calibrated on the training images); "
        "each is checked against the Keras model on the evaluation images with the LiteRT "
        "interpreter (the tflite extra); empty: none.",
        parse=parse_tflite_formats,
        format=list,
        hparam=False,
    )
    tflite_min_agreement: float = option(
        0.99,
        "Export fails if a float32 or dynamic TFLite file's top-1 class agrees with the Keras "
        "model's on fewer than this fraction of evaluation images.",
        check=lambda value: 0 <= value <= 1,
        problem="not a fraction",
        accepted="0 <= x <= 1",
        hparam=False,
    )
    tflite_min_agreement_int8: float = option(
        0.97,
        "The same threshold for the int8 TFLite file.",
        check=lambda value: 0 <= value <= 1,
        problem="not a fraction",
        accepted="0 <= x <= 1",
        hparam=False,
    )
    tflite_calibration_images: int = option(
        300,
        "Training images the int8 TFLite conversion calibrates its quantization on (the "
        "first ones, unaugmented; fewer if the training set is smaller).",
        check=lambda value: value >= 1,
        problem="too small",
        accepted=">= 1",
        hparam=False,
    )

    wise_ft: tuple[float, ...] = option(
        (),
        "WiSE-FT: after fine-tuning, evaluate the weight-space interpolations "
        "(1 - a) * (the model at the end of the phase before the first that trains the "
        "backbone) + a * (the weights the export would hold), BatchNorm statistics included, "
        "for each a of this comma list in [0, 1], and export the best a's; empty: off.",
        parse=parse_wise_ft,
        format=lambda alphas: [repr(a) for a in alphas],
    )
    wise_ft_export: str | float = option(
        "best",
        "The --wise_ft a whose interpolation is exported: best (by --best_metric) or one of "
        "--wise_ft's values.",
        parse=parse_wise_ft_export,
        format=lambda value: value if isinstance(value, str) else repr(value),
    )

    def __post_init__(self) -> None:
        _check_options(self)
        # A Python caller may give the formats as text or any sequence: checked the same way.
        object.__setattr__(self, "export_tflite", parse_tflite_formats(self.export_tflite))
        object.__setattr__(self, "wise_ft", parse_wise_ft(self.wise_ft))
        object.__setattr__(self, "wise_ft_export", parse_wise_ft_export(self.wise_ft_export))
        chosen = self.wise_ft_export
        _require(
            chosen == "best" or chosen in self.wise_ft,
            "wise_ft_export",
            chosen,
            f"not among --wise_ft={','.join(repr(a) for a in self.wise_ft)}",
            "best, or one of --wise_ft's values",
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
        "README's Defaults table; logged, and written to flags.txt and results.json); a flag "
        "given explicitly wins. guide: the flags' own defaults, the Keras guide's numbers.",
        choices=RECIPES,
    )
    # The flags the user gave explicitly (the recipe leaves them alone); not itself a flag.
    # None (a RunConfig made in Python): those whose values differ from their defaults.
    given: frozenset[str] | None = dataclasses.field(
        default=None, compare=False, repr=False, metadata={_GIVEN: True}
    )

    def __post_init__(self) -> None:
        _check_options(self)
        # A Python caller may give a number or "auto": checked as the flag's text is.
        object.__setattr__(self, "steps_per_loop", parse_steps_per_loop(self.steps_per_loop))
        _require(
            self.supervise or not self.max_restarts,
            "max_restarts",
            self.max_restarts,
            "--nosupervise trains in this process, which cannot restart itself",
            "--supervise (the default) with --max_restarts, or no restarts",
        )
        # Values that --image_size and --seed give to two places each must agree.
        _require(
            self.data.image_size == self.model.image_size,
            "image_size",
            self.model.image_size,
            "data and model disagree",
            "one value",
        )
        _require(
            self.data.seed == self.seed, "seed", self.seed, "data and run disagree", "one value"
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


# ---------------------------------------------------------------------------------------------
# From flag values to a RunConfig and back, all read off the fields above.


def _walk(kind: type) -> Iterator[tuple[type, dataclasses.Field]]:
    """(owner, field) for every option field under `kind`, in field order."""
    for field in dataclasses.fields(kind):
        if _OPTION in field.metadata:
            yield kind, field
        elif _SECTION in field.metadata:
            yield from _walk(field.metadata[_SECTION].kind)


def options() -> tuple[Option, ...]:
    """Every option of a RunConfig, in flags.txt order, with `flag`, `owner` and `default`
    (the flag's default: None for a field without one) filled in."""
    found = []
    for owner, field in _walk(RunConfig):
        meta = field.metadata[_OPTION]
        missing = field.default is dataclasses.MISSING
        found.append(
            dataclasses.replace(
                meta,
                flag=meta.flag or field.name,
                owner=owner.__name__,
                default=None if missing else meta.to_flag(field.default),
            )
        )
    return tuple(found)


def _build(kind: type, values: Mapping[str, Any], by_flag: Mapping[str, Option]) -> Any:
    kwargs = {}
    for field in dataclasses.fields(kind):
        if _OPTION in field.metadata:
            flag = field.metadata[_OPTION].flag or field.name
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
        raise ConfigError(f"{unknown}: not tlloop flags; accepted: {', '.join(by_flag)}")
    config = _build(RunConfig, values, by_flag)
    object.__setattr__(config, "given", frozenset(values if given is None else given))
    return config


def _read(config: Any, out: dict[str, Any]) -> dict[str, Any]:
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if _OPTION in field.metadata:
            meta = field.metadata[_OPTION]
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
