"""The mode table: the `training` value of each submodule for each kind of step.

This is the one place where tlloop decides whether BatchNormalization, Dropout and augmentation
run in training or inference mode. Steps look their row up here; no step passes a literal.
"""

from __future__ import annotations

import dataclasses

SUBMODULES = ("augment", "backbone", "head")
STEP_KINDS = ("train", "eval", "predict")


@dataclasses.dataclass(frozen=True)
class Modes:
    """The `training` argument each submodule is called with in one kind of step."""

    augment: bool
    backbone: bool
    head: bool


INFERENCE = Modes(augment=False, backbone=False, head=False)


@dataclasses.dataclass(frozen=True)
class ModeTable:
    """One `Modes` row per step kind.

    The default keeps the backbone in inference mode even while its weights train, so its
    BatchNormalization statistics never move; only the augment and head submodules train.
    """

    train: Modes = Modes(augment=True, backbone=False, head=True)
    eval: Modes = INFERENCE
    predict: Modes = INFERENCE

    def __post_init__(self) -> None:
        # Evaluation and prediction must be deterministic and leave every statistic alone.
        if self.eval != INFERENCE or self.predict != INFERENCE:
            raise ValueError("eval and predict steps run every submodule with training=False")

    def row(self, kind: str) -> Modes:
        if kind not in STEP_KINDS:
            raise ValueError(f"unknown step kind {kind!r}; known: {', '.join(STEP_KINDS)}")
        return getattr(self, kind)

    def with_backbone_training(self, training: bool) -> ModeTable:
        """This table with the backbone's train-step mode set to `training`."""
        return dataclasses.replace(self, train=dataclasses.replace(self.train, backbone=training))

    def to_text(self) -> str:
        """A Markdown table: rows are step kinds, columns submodules, cells `training=...`."""
        lines = ["| step | " + " | ".join(SUBMODULES) + " |", "|---" * (len(SUBMODULES) + 1) + "|"]
        for kind in STEP_KINDS:
            row = self.row(kind)
            cells = (f"training={getattr(row, name)}" for name in SUBMODULES)
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        return "\n".join(lines)
