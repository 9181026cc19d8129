"""The embedded UCI optical digits (8x8, 16 grey levels): tlloop's offline demo data."""

from __future__ import annotations

from importlib import resources

import numpy as np

from tlloop.data.splits import Source, Split, labelled_source, stratified_split


def read_digits() -> tuple[tuple[str, ...], Split]:
    """(class names "0".."9", every digit as RGB uint8 in [0, 255])."""
    with resources.files("tlloop.data").joinpath("digits.npz").open("rb") as file:
        arrays = np.load(file)
        grey = arrays["images"].astype(np.float32) * (255.0 / 16.0)
        labels = arrays["labels"].astype(np.int32)
    images = np.repeat(np.round(grey).astype(np.uint8)[..., None], 3, axis=-1)
    return tuple(str(i) for i in range(10)), Split(images, labels)


def digits_source(
    *, val_split: float, classes: tuple[str, ...] = (), train_examples_per_class: int = 0
) -> Source:
    """The digits, `val_split` of each class held out for evaluation, the `classes` selected
    and the few-shot limit applied (see `splits`)."""
    names, everything = read_digits()
    train, evaluation = stratified_split(everything, val_split, names, "dataset", "digits", classes)
    return labelled_source(
        names,
        train,
        evaluation,
        classes=classes,
        train_examples_per_class=train_examples_per_class,
    )
