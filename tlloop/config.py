"""The library's option objects: phases, training, checkpoints, logging, and what they parse.

`PhaseConfig` (public `tlloop.Phase`), `Unfreeze`, `TrainingConfig`, `CheckpointConfig`,
`LoggingConfig` and `BestMetric` are what `tlloop.Trainer` takes; the command line fills the
same objects from its flags (`tlloop.cli.config.RunConfig` holds them with its own sections).
Each option is defined once, on the dataclass field that holds it (`option`): its default, its
help text, its check, and how its flag's text becomes the value (`parse`) and back (`format`).
Each value is validated when its dataclass is made; a `ConfigError` names the argument, says
what is wrong and what would be accepted. This module imports no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Callable
from typing import Any

from tlloop.errors import ConfigError

REGRESSION_LOSSES = ("mse", "huber", "mae")
BN_MODES = ("frozen", "train", "adapt")
AUGMENT_OPS = ("flip", "rotate", "zoom", "contrast", "translate", "crop")
BAD_IMAGES = ("fail", "skip")
RESIZE_MODES = ("squash", "crop", "pad")
NAN_POLICIES = ("stop", "skip_step")
EXPORTS = ("best", "last")
OPTIMIZERS = ("adam", "adamw", "sgd", "lamb")
LR_SCHEDULES = ("constant", "cosine", "linear", "step")
FEATURE_CACHE = ("auto", "off")
TFLITE_FORMATS = ("float32", "dynamic", "int8")
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


def require(ok: bool, argument: str, value: object, problem: str, accepted: str) -> None:
    """Raises ConfigError(argument, repr(value), problem, accepted) unless `ok`."""
    if not ok:
        raise ConfigError(argument, repr(value), problem, accepted)


# ---------------------------------------------------------------------------------------------
# Option metadata: one command-line option per dataclass field.

_OPTION = "tlloop.option"  # field metadata key: the field is set by its own flag


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
    `owner` (the dataclass, with its module) and `default` (the flag's default) are filled in
    by `options()`.
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


def option_of(field: dataclasses.Field) -> Option | None:
    """The Option of a dataclass field made by `option()`; None for any other field."""
    return field.metadata.get(_OPTION)


def check_options(config: Any) -> None:
    """Runs every option field's own check (choices, `check`) on `config`."""
    for field in dataclasses.fields(config):
        meta = option_of(field)
        if meta is None:
            continue
        flag, value = meta.flag or field.name, getattr(config, field.name)
        if meta.choices:
            require(value in meta.choices, flag, value, "unknown", ", ".join(meta.choices))
        if meta.check is not None:
            require(meta.check(value), flag, value, meta.problem, meta.accepted)


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
            require(match is not None, "unfreeze", spec, "N is not a number", accepted)
            require(int(argument) >= 1, "unfreeze", spec, "N must be at least 1", accepted)
            return cls(kind, int(argument))
        if kind in ("from", "regex"):
            require(bool(argument), "unfreeze", spec, f"{kind}: needs a value", accepted)
            if kind == "regex":
                try:
                    re.compile(argument)
                except re.error as error:
                    require(False, "unfreeze", spec, f"bad regular expression ({error})", accepted)
            return cls(kind, value=argument)
        require(False, "unfreeze", spec, "not an unfreeze policy", accepted)
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
        require(name in AUGMENT_OPS, "augment", spec, f"unknown operation {name!r}", accepted)
        if name == "flip":
            require(not factor, "augment", spec, "flip takes no factor", accepted)
            ops.append(AugmentOp(name))
            continue
        try:
            value = float(factor)
        except ValueError:
            value = -1.0
        require(0 < value <= 1, "augment", spec, f"{name} needs a factor in (0, 1]", accepted)
        ops.append(AugmentOp(name, value))
    return tuple(ops)


def format_augment(ops: tuple[AugmentOp, ...]) -> str:
    """The `--augment` text of `ops`: `parse_augment(format_augment(ops)) == ops`."""
    return ",".join(op.name if op.name == "flip" else f"{op.name}:{op.factor!r}" for op in ops)


def parse_profile_steps(spec: str) -> tuple[int, ...]:
    """Parses `--profile_steps=START,END` (global steps, 1 <= START <= END); empty: no profile."""
    if not spec:
        return ()
    accepted = "START,END with 1 <= START <= END (global steps), or empty"
    match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", spec)
    require(match is not None, "profile_steps", spec, "not two step numbers", accepted)
    start, end = int(match.group(1)), int(match.group(2))
    require(1 <= start <= end, "profile_steps", spec, "not an ordered range", accepted)
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
        require(name in TFLITE_FORMATS, "export_tflite", text, f"unknown format {name!r}", accepted)
    require(len(set(formats)) == len(formats), "export_tflite", text, "a format twice", accepted)
    # find_spec imports nothing: the check costs no TensorFlow start-up.
    require(
        not formats or importlib.util.find_spec("ai_edge_litert") is not None,
        "export_tflite",
        text,
        "the LiteRT interpreter that verifies each file is not installed",
        'pip install "tlloop[tflite]" (ai-edge-litert), or no $export_tflite',
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
        require(0 <= alpha <= 1, "wise_ft", ",".join(texts), f"{text!r} is not in [0, 1]", accepted)
        alphas.append(alpha)
    require(len(set(alphas)) == len(alphas), "wise_ft", ",".join(texts), "a value twice", accepted)
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
    require(
        alpha == alpha,
        "wise_ft_export",
        value,
        "not best or a number",
        "best, or a $wise_ft value",
    )
    return alpha


def parse_steps_per_loop(value: Any, name: str = "steps_per_loop") -> int | str:
    """--steps_per_loop's value: "auto", or a whole number >= 1 (given as text or int)."""
    if value == "auto":
        return "auto"
    text = str(value).strip()
    require(
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
        require(
            False,
            name,
            value,
            "the range test runs before training, with a fresh head on the pretrained "
            "backbone, so it can suggest only $head_lr",
            "a rate > 0 (python -m tlloop.lr_find for the finetune phase suggests one)",
        )
    try:
        rate = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        rate = float("nan")
    require(rate > 0, name, value, "not a positive number", accepted)
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
        require(
            self.direction in ("", "max", "min"),
            "best_metric",
            str(self),
            "unknown direction",
            accepted,
        )
        if self.name == AUTO_METRIC:
            require(
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
        require(
            re.fullmatch(r"[A-Za-z0-9_/]+", name) is not None,
            "best_metric",
            spec,
            "not a metric name",
            accepted,
        )
        require(
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


# ---------------------------------------------------------------------------------------------
# The library's configuration, one dataclass per concern; the order of fields is the order of
# flags.txt.


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
        require(
            self.gradual >= 0,
            "unfreeze_schedule",
            f"gradual:{self.gradual}",
            "K must be positive",
            "gradual:K with K >= 1, or empty",
        )
        require(
            not (self.gradual and self.unfreeze.kind == "none"),
            "unfreeze_schedule",
            f"gradual:{self.gradual}",
            "with $unfreeze=none no backbone layer would ever train",
            "$unfreeze=all, top:N, blocks:N, from:LAYER_NAME or regex:PATTERN with it, or no "
            "$unfreeze_schedule",
        )
        require(self.epochs >= 0, f"{self.name}_epochs", self.epochs, "negative", ">= 0")
        require(
            (self.learning_rate is None) != (self.optimizer is None),
            f"{self.name}_lr",
            self.learning_rate,
            "give a learning rate or an optimizer, not both or neither",
            "a rate > 0, or optimizer=keras.optimizers.X(...) and no learning_rate",
        )
        require(
            self.learning_rate is None
            or self.learning_rate == AUTO_RATE
            or (not isinstance(self.learning_rate, str) and self.learning_rate > 0),
            f"{self.name}_lr",
            self.learning_rate,
            "not positive",
            "> 0",
        )
        require(self.bn_mode in BN_MODES, "bn_mode", self.bn_mode, "unknown", ", ".join(BN_MODES))
        require(
            self.modes is None or self.bn_mode != "train",
            "bn_mode",
            self.bn_mode,
            "given together with a mode table, which already says the backbone's mode",
            "one of the two",
        )
        # The default mode table runs the backbone in training mode only when something in it
        # trains (phases.plan_phases): with nothing unfrozen, "train" would change nothing.
        require(
            not (self.bn_mode == "train" and self.unfreeze.kind == "none"),
            "bn_mode",
            self.bn_mode,
            "with $unfreeze=none no backbone layer trains and the backbone stays in inference "
            "mode, so it would change nothing",
            "frozen, or train with an $unfreeze policy that trains backbone layers (a "
            "ModeTable sets the backbone's mode directly)",
        )


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
        "from Beta(alpha, alpha), with soft labels; with $mixup, each batch takes one of the "
        "two at random; 0: off.",
        check=lambda value: 0 <= value <= 10,
        problem="out of range",
        accepted="0 (off) or an alpha in (0, 10], e.g. 1.0",
    )
    mix_prob: float = option(
        1.0,
        "Probability that a training batch is mixed by $mixup or $cutmix.",
        check=lambda value: 0 < value <= 1,
        problem="out of range",
        accepted="0 < p <= 1",
    )

    def __post_init__(self) -> None:
        check_options(self)
        require(
            self.mix_prob == 1.0 or bool(self.mixing),
            "mix_prob",
            self.mix_prob,
            "there is no $mixup or $cutmix to apply",
            "$mix_prob with $mixup=ALPHA or $cutmix=ALPHA, or no $mix_prob",
        )
        require(
            not (self.warmup_steps and self.warmup_epochs),
            "warmup_steps",
            self.warmup_steps,
            "given together with $warmup_epochs",
            "one of the two",
        )
        # Decoupled decay pulls the same weights toward 0 that L2-SP pulls toward w0.
        require(
            not (self.weight_decay and (self.l2sp or self.l2sp_head)),
            "weight_decay",
            self.weight_decay,
            f"given together with ${'l2sp' if self.l2sp else 'l2sp_head'}, which regularises "
            "the same weights",
            "one of the two ($l2sp_head is the L2 of the head's kernels)",
        )

    @property
    def mixing(self) -> str:
        """The batch mixing asked for: "mixup" (when both are, MixUp names the choice),
        "cutmix", or "" for none. Whether it may run on a task and its inputs is
        `tlloop.trainer`'s check (the task's `mixable`, images)."""
        return "mixup" if self.mixup else "cutmix" if self.cutmix else ""


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
        "$nosummaries writes neither (results.json and the export are still written).",
        hparam=False,
    )

    def __post_init__(self) -> None:
        check_options(self)
        # The trace goes to the TensorBoard directory: without summaries nothing may be written.
        require(
            not (self.profile_steps and not self.summaries),
            "profile_steps",
            ",".join(map(str, self.profile_steps)),
            "$nosummaries writes nothing, a profile neither",
            "no $profile_steps with $nosummaries, or summaries on",
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
        "End a phase after this many evaluations without a better $best_metric than the "
        "phase's best so far; 0: never.",
        check=lambda value: value >= 0,
        problem="negative",
        accepted="0 (off) or a number of evaluations",
    )
    export: str = option(
        "best",
        "Weights to export at the end: best (of $best_metric) or last.",
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
        "The $wise_ft a whose interpolation is exported: best (by $best_metric) or one of "
        "$wise_ft's values.",
        parse=parse_wise_ft_export,
        format=lambda value: value if isinstance(value, str) else repr(value),
    )

    def __post_init__(self) -> None:
        check_options(self)
        # A Python caller may give the formats as text or any sequence: checked the same way.
        object.__setattr__(self, "export_tflite", parse_tflite_formats(self.export_tflite))
        object.__setattr__(self, "wise_ft", parse_wise_ft(self.wise_ft))
        object.__setattr__(self, "wise_ft_export", parse_wise_ft_export(self.wise_ft_export))
        chosen = self.wise_ft_export
        require(
            chosen == "best" or chosen in self.wise_ft,
            "wise_ft_export",
            chosen,
            f"not among $wise_ft={','.join(repr(a) for a in self.wise_ft)}",
            "best, or one of $wise_ft's values",
        )
