"""Labelled examples (`Split`, `Source`) and the one place that splits them, selects classes
and applies few-shot limits.

Splits use a fixed seed of their own, so the evaluation set is the same whatever seed a run
shuffles with. Errors name the library argument at fault (`val_split`, `classes`, ...).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from tlloop.data.images import shown
from tlloop.errors import NO_VALUE, ConfigError

if TYPE_CHECKING:
    from tlloop.data.streaming import RecordRefs

SPLIT_SEED = 20261123


@dataclasses.dataclass(frozen=True)
class Split:
    """Images: (N, H, W, 3) uint8, a list of file paths, a list of encoded images (bytes) or
    where TFRecord records lie (`RecordRefs`), or texts (a list of strings); labels: int32
    class indices (N,), or float32 multi-hot rows or regression targets (N, K); and for
    encoded images, where each came from (for error messages)."""

    images: np.ndarray | list[str] | list[bytes] | RecordRefs
    labels: np.ndarray
    origins: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> Split:
        if not isinstance(self.images, list):
            return Split(self.images[index], self.labels[index])
        origins = None if self.origins is None else [self.origins[i] for i in index]
        return Split([self.images[i] for i in index], self.labels[index], origins)


@dataclasses.dataclass(frozen=True)
class Source:
    """Class names in label order, the two splits, and the files found but not used, each
    with the reason (printable path: reason)."""

    class_names: tuple[str, ...]
    train: Split
    eval: Split
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


def stratified_split(
    split: Split,
    val_split: float,
    names: tuple[str, ...] = (),
    argument: str = "the examples",
    value: Any = NO_VALUE,
    classes: tuple[str, ...] = (),
) -> tuple[Split, Split]:
    """(train, eval): `val_split` of each class (at least one example) goes to evaluation.
    ConfigError naming `argument` (=`value`: where the examples come from) and the class of
    `names` if one would keep no training example (a class of one example), unless the
    selected `classes` leave it out."""
    rng = np.random.default_rng(SPLIT_SEED)
    train_index, eval_index = [], []
    for label in np.unique(split.labels):
        index = rng.permutation(np.flatnonzero(split.labels == label))
        count = max(1, round(len(index) * val_split))
        name = names[label] if label < len(names) else str(label)
        if count >= len(index) and (not classes or name in classes):
            raise ConfigError(
                argument,
                value,
                f"class {shown(name)!r} has {len(index)} example(s), too few to keep one for "
                f"training and split one off for evaluation ($val_split={val_split:g})",
                "at least 2 per class, or $val_dir",
            )
        eval_index.append(index[:count])
        train_index.append(index[count:])
    return split.take(np.sort(np.concatenate(train_index))), split.take(
        np.sort(np.concatenate(eval_index))
    )


def random_split(split: Split, val_split: float) -> tuple[Split, Split]:
    """(train, eval): `val_split` of the examples (at least one) to evaluation, with the
    splits' fixed seed: multi-hot rows and targets have no class to stratify by."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(split))
    count = max(1, round(len(split) * val_split))
    return split.take(np.sort(order[count:])), split.take(np.sort(order[:count]))


def select_classes(
    names: tuple[str, ...], train: Split, evaluation: Split, classes: tuple[str, ...]
) -> tuple[tuple[str, ...], Split, Split]:
    """Only the `classes` named (in that order, relabelled 0, 1, ...); all when empty.
    ConfigError naming `classes` for a name the source does not have."""
    if not classes:
        return names, train, evaluation
    unknown = [name for name in classes if name not in names]
    if unknown:
        raise ConfigError(
            "classes", NO_VALUE, f"unknown classes {unknown}", f"names from {', '.join(names)}"
        )
    old_to_new = np.full(len(names), -1, np.int32)
    for new, name in enumerate(classes):
        old_to_new[names.index(name)] = new

    def relabel(split: Split) -> Split:
        kept = split.take(np.flatnonzero(old_to_new[split.labels] >= 0))
        return Split(kept.images, old_to_new[kept.labels])

    return classes, relabel(train), relabel(evaluation)


def limit_per_class(split: Split, per_class: int, num_classes: int) -> Split:
    """The first `per_class` examples of each class in a fixed shuffled order (0: all)."""
    if per_class == 0:
        return split
    rng = np.random.default_rng(SPLIT_SEED + 1)
    index = [
        rng.permutation(np.flatnonzero(split.labels == label))[:per_class]
        for label in range(num_classes)
    ]
    return split.take(np.sort(np.concatenate(index)))


def labelled_source(
    names: tuple[str, ...],
    train: Split,
    evaluation: Split,
    *,
    classes: tuple[str, ...] = (),
    train_examples_per_class: int = 0,
    skipped: dict[str, str] | None = None,
) -> Source:
    """The Source of class-index splits: the `classes` selected (`select_classes`), then the
    few-shot limit applied to training (`limit_per_class`)."""
    names, train, evaluation = select_classes(names, train, evaluation, classes)
    train = limit_per_class(train, train_examples_per_class, len(names))
    return Source(names, train, evaluation, dict(skipped or {}))
