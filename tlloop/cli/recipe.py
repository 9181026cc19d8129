"""The default recipe: training choices made from the data and the backbone (`--recipe=auto`).

`--recipe=guide` keeps the Keras transfer-learning guide's numbers, the flags' own defaults
(Adam 1e-3 for 5 head epochs, 1e-5 for 5 fine-tune epochs, a constant rate, no augmentation).
`--recipe=auto` (the default) chooses the values in `TABLE` from the number of training
examples (its size band, as BiT's HyperRule does), the number of classes and the backbone's
kind; a flag given explicitly always wins, and a group of flags that make one choice together
(`GROUPS`: warm-up in steps or epochs; MixUp, CutMix and their probability) is left whole to
the user when any of its flags is given. docs/defaults.md shows `table_markdown()`.

`choose` is a table look-up; `backbone_kind` loads `tlloop.models` only to recognise a
KerasHub preset.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from tlloop.cli import config as config_lib
from tlloop.cli.config import RECIPES, ConfigError, RunConfig  # noqa: F401  RECIPES: re-exported

# Size bands by training examples: (name, the first size that is not in the band).
BANDS = (("tiny", 1_000), ("small", 20_000), ("large", None))
BACKBONE_KINDS = ("application", "file", "small_cnn", "hub")
# The optimizers whose rates the table's learning rates are for.
ADAM_LIKE = ("adam", "adamw")


# Rates that grow with the steps of an epoch: in the tiny band, for the backbone kinds where
# that was measured (the shipped small CNN, a `file`: the sweep's best rate was 1x, 4x, 8x and
# 16x the table's at 1, 4, 8 and 16 steps per epoch), the rates are the table's times the
# steps per epoch, at most MAX_STEP_SCALE. Not measured for other kinds (no pretrained
# ImageNet or KerasHub weights offline): their rates are the table's.
STEP_SCALED_KINDS = ("file",)
MAX_STEP_SCALE = 16


def step_scale(band: int, kind: str, steps_per_epoch: int) -> int:
    """What the rates of a run in band `band` with a `kind` backbone and `steps_per_epoch` are
    multiplied by (see STEP_SCALED_KINDS)."""
    if band != 0 or kind not in STEP_SCALED_KINDS:
        return 1
    return max(1, min(steps_per_epoch, MAX_STEP_SCALE))


@dataclasses.dataclass(frozen=True)
class Row:
    """One choice of the recipe: the flag it sets, its value per size band (`by_band`) or per
    backbone kind (`by_kind`), and why (shown in docs/defaults.md). A `scaled` row (a rate) is
    multiplied by `step_scale`."""

    flag: str
    why: str
    by_band: tuple[Any, ...] | None = None
    by_kind: Mapping[str, Any] | None = None
    binary: Any = None  # the value with 2 classes, when it differs
    scaled: bool = False

    def value(self, band: int, kind: str, classes: int, scale: int = 1) -> Any:
        if self.binary is not None and classes <= 2:
            return self.binary
        value = self.by_kind[kind] if self.by_kind is not None else self.by_band[band]
        return value * scale if self.scaled and scale != 1 else value


# The recipe. Values are as the flags take them (text for --augment).
TABLE = (
    Row(
        "head_epochs",
        "few examples: more passes for the same number of updates",
        by_band=(30, 10, 5),
    ),
    Row(
        "head_lr",
        "a fresh linear head under Adam; few updates need a higher rate (tiny: measured on the "
        "digits, 3 seeds: 0.731 / 0.779 / 0.796 at 1e-2 / 2e-2 / 3e-2 with 1 step per epoch; "
        "a sweep on real transfers put the best head rate at 3x the guide's or more)",
        by_band=(3e-2, 3e-3, 1e-3),
        scaled=True,
    ),
    Row("finetune_epochs", "as the head phase", by_band=(30, 10, 5)),
    Row(
        "finetune_lr",
        "by backbone: ImageNet BatchNorm networks 1e-4 (the guide's 1e-5 lands under a "
        "sweep's best), a saved model 3e-4 (the quickstart's), the from-scratch demo CNN "
        "1e-3, KerasHub transformers 3e-5",
        by_kind={"application": 1e-4, "file": 3e-4, "small_cnn": 1e-3, "hub": 3e-5},
        scaled=True,
    ),
    Row(
        "lr_schedule",
        "cosine decay to 0 over each phase (fastai, timm, BiT decay)",
        by_band=("cosine",) * 3,
    ),
    Row(
        "warmup_epochs",
        "linear warm-up, about a tenth of a phase",
        by_band=(3, 1, 0),
    ),
    Row(
        "warmup_steps",
        "BiT's 500 warm-up steps for large data, at most a tenth of the shortest phase's "
        "optimizer steps",
        by_band=(0, 0, 500),
    ),
    Row(
        "augment",
        "a small random shift: no flips (digits, text and many objects are not mirror images)",
        by_band=("translate:0.1",) * 3,
    ),
    Row(
        "label_smoothing",
        "timm's 0.1; none with 2 classes (a thresholded probability would top out at 0.95)",
        by_band=(0.1, 0.1, 0.1),
        binary=0.0,
    ),
    Row("mixup", "BiT: MixUp 0.1 only from 20,000 examples", by_band=(0.0, 0.0, 0.1)),
    Row(
        "ema_decay",
        "weight averages over about 1,000 steps, only where a phase has several thousand",
        by_band=(0.0, 0.0, 0.999),
    ),
)
# The recipe's --warmup_steps is at most this fraction of the shortest phase's optimizer steps.
WARMUP_FRACTION = 0.1
# Flags that make one choice together: the recipe sets none of them when any is given.
GROUPS = (("warmup_epochs", "warmup_steps"), ("mixup", "cutmix", "mix_prob"))


def band_of(train_examples: int) -> int:
    """The index in BANDS of a training set of `train_examples`."""
    for index, (_, end) in enumerate(BANDS):
        if end is None or train_examples < end:
            return index
    raise AssertionError  # the last band has no end


def backbone_kind(backbone: str) -> str:
    """The kind of a --backbone value: small_cnn, file (.keras/.h5/.hdf5), hub (a KerasHub
    preset) or application (a keras.applications class name)."""
    if backbone == "small_cnn":
        return "small_cnn"
    if backbone.lower().endswith((".keras", ".h5", ".hdf5")):
        return "file"
    from tlloop.models import hub  # a preset check only; no TensorFlow work

    return "hub" if hub.is_preset(backbone) else "application"


def choose(
    train_examples: int, classes: int, kind: str, steps_per_epoch: int = 1
) -> dict[str, Any]:
    """The recipe's value of every flag in TABLE for this data, backbone kind and number of
    optimizer steps per epoch (training examples over the global batch, rounded up)."""
    if kind not in BACKBONE_KINDS:
        raise ValueError(f"kind={kind!r}: accepted: {', '.join(BACKBONE_KINDS)}")
    band = band_of(train_examples)
    scale = step_scale(band, kind, steps_per_epoch)
    return {row.flag: row.value(band, kind, classes, scale) for row in TABLE}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a run's recipe decided: its `name`, the data it looked at, the values it set
    (`chosen`, by flag) and the flags of the table it left to the user (`given`: each with the
    flag given that decided it, itself or one of its group)."""

    name: str
    train_examples: int = 0
    classes: int = 0
    backbone_kind: str = ""
    band: str = ""
    chosen: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    given: Mapping[str, str] = dataclasses.field(default_factory=dict)
    step_scale: int = 1  # the scaled rates' multiplier (see `step_scale`)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "train_examples": self.train_examples,
            "classes": self.classes,
            "backbone_kind": self.backbone_kind,
            "band": self.band,
            "chosen": dict(self.chosen),
            "given": dict(self.given),
            "step_scale": self.step_scale,
        }

    def lines(self) -> list[str]:
        """What the run logs at its start: one line per value."""
        if self.name == "guide":
            return ["recipe guide: the flags' defaults (the Keras guide's numbers)"]
        head = (
            f"recipe auto: {self.train_examples} training examples ({self.band}), "
            f"{self.classes} classes, {self.backbone_kind} backbone"
            + (f", rates x{self.step_scale} (steps per epoch)" if self.step_scale != 1 else "")
        )
        chosen = [f"recipe: --{flag}={value}" for flag, value in self.chosen.items()]
        given = [
            f"recipe: --{flag} given, kept" if by == flag else f"recipe: --{flag} left to --{by}"
            for flag, by in self.given.items()
        ]
        return [head, *chosen, *given]


def applies(flag: str, task: str, text: bool) -> bool:
    """Whether the recipe's row for `flag` applies to a run of `task` on texts (`text`) or
    images: augmentation and mixing are for images, label smoothing for single-label
    classes, and mixing targets is not mixing their losses (regression)."""
    if text and flag in ("augment", "mixup"):
        return False
    if task != "classification" and flag == "label_smoothing":
        return False
    return not (task == "regression" and flag == "mixup")


def resolve(
    config: RunConfig,
    train_examples: int,
    classes: int,
    *,
    task: str = "classification",
    text: bool = False,
) -> tuple[RunConfig, Recipe]:
    """`config` with the recipe's values for the flags its user did not give
    (`config_lib.given_flags`) and that apply to its task and inputs (`applies`), and what was
    decided. Raises ConfigError when the recipe cannot act: its learning rates are Adam's, so
    another --optimizer needs both rates given."""
    if config.recipe == "guide":
        return config, Recipe("guide")
    given = set(config_lib.given_flags(config))
    kind = backbone_kind(config.model.backbone)
    missing = [flag for flag in ("head_lr", "finetune_lr") if flag not in given]
    if config.training.optimizer not in ADAM_LIKE and missing:
        raise ConfigError(
            "optimizer",
            config.training.optimizer,
            f"$recipe=auto's learning rates are Adam's and ${missing[0]} is not given",
            "$head_lr and $finetune_lr with it, $optimizer=adam or adamw, or $recipe=guide",
        )
    decided_by = {flag: flag for flag in given}
    for group in GROUPS:
        by = [flag for flag in group if flag in given]
        if by:  # one choice made of several flags: the user's, whole
            for flag in group:
                decided_by.setdefault(flag, by[0])
    values = config_lib.flag_values(config)
    chosen, kept = {}, {}
    steps_per_epoch = math.ceil(train_examples / config.data.batch_size)
    for flag, value in choose(train_examples, classes, kind, steps_per_epoch).items():
        if not applies(flag, task, text):
            continue
        if flag in decided_by:
            kept[flag] = decided_by[flag]
            continue
        values[flag] = value
        chosen[flag] = value
    if chosen.get("warmup_steps"):
        # A fixed count would outlast a short phase: it would never reach its peak rate.
        steps = [
            values[epochs] * steps_per_epoch // values["grad_accum_steps"]
            for epochs in ("head_epochs", "finetune_epochs")
            if values[epochs]
        ]
        capped = min(chosen["warmup_steps"], int(min(steps) * WARMUP_FRACTION))
        values["warmup_steps"] = chosen["warmup_steps"] = capped
    resolved = config_lib.from_flags(values, given=given)
    recipe = Recipe(
        "auto",
        train_examples,
        classes,
        kind,
        BANDS[band_of(train_examples)][0],
        chosen,
        kept,
        step_scale(band_of(train_examples), kind, steps_per_epoch),
    )
    return resolved, recipe


def table_markdown() -> str:
    """The recipe as the Markdown table of docs/defaults.md (a test checks the page holds it)."""
    names = [
        f"{name} (< {end:,})" if end else f"{name} (>= {BANDS[i - 1][1]:,})"
        for i, (name, end) in enumerate(BANDS)
    ]
    lines = [
        f"| flag | {' | '.join(names)} | why |",
        "|---|" + "---|" * len(BANDS) + "---|",
    ]
    for row in TABLE:
        if row.by_kind is not None:
            cells = [
                "; ".join(
                    f"{kind} {_cell(value)}{_scaled(row, band, kind)}"
                    for kind, value in row.by_kind.items()
                )
                for band in range(len(BANDS))
            ]
        else:
            cells = [_cell(value) for value in row.by_band]
            if row.scaled:
                kinds = ", ".join(STEP_SCALED_KINDS)
                cells[0] += f" ({kinds}: x S)"
        if row.binary is not None:
            cells = [f"{cell} ({_cell(row.binary)} with 2 classes)" for cell in cells]
        lines.append(f"| `--{row.flag}` | {' | '.join(cells)} | {row.why} |")
    return "\n".join(lines)


def _scaled(row: Row, band: int, kind: str) -> str:
    """ " x S" where the row's value for `kind` in `band` is multiplied by `step_scale`."""
    return " x S" if row.scaled and step_scale(band, kind, 2) != 1 else ""


def _cell(value: Any) -> str:
    """A value as the table shows it: small rates as 3e-4, other numbers plainly."""
    if isinstance(value, float) and 0 < abs(value) < 0.01:
        mantissa, exponent = f"{value:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != "" else "(none)"
