"""MixUp and CutMix: a training batch mixed with a permutation of itself, with soft labels.

A `Mixing` draws, for one replica's batch in one step, whether to mix (`prob`), which of MixUp
or CutMix (each with probability 1/2 when both are on), the mixing fraction `lam` from
Beta(alpha, alpha), a partner for each example (a random permutation of the batch) and, for
CutMix, a box. MixUp blends whole images: `lam * x + (1 - lam) * x[partner]`; CutMix pastes the
partner's pixels inside the box, and `lam` becomes the fraction of pixels left from `x` (the box
is clipped at the borders). The label of a mixed example is the soft label
`lam * onehot(y) + (1 - lam) * onehot(y[partner])` (`soft_labels`); the training loss is
`lam * loss(y) + (1 - lam) * loss(y[partner])` (`mixed_loss`), which for cross-entropy equals the
loss of that soft label, with label smoothing and class weights applied to each term.

Draws are stateless, from (seed, global step, replica): the same step mixes the same way after
a resume, and needs no state in the checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import tensorflow as tf


class Mixed(NamedTuple):
    """A mixed batch: the `inputs`, each example's `partner` index and its `lam`, the fraction
    of the example that is its own (1 for a batch left unmixed)."""

    inputs: tf.Tensor
    partner: tf.Tensor
    lam: tf.Tensor


@dataclasses.dataclass(frozen=True)
class Mixing:
    """MixUp with Beta(`mixup`, `mixup`) and CutMix with Beta(`cutmix`, `cutmix`) (0: off),
    applied to a batch with probability `prob`. Raises ValueError naming a bad argument."""

    mixup: float = 0.0
    cutmix: float = 0.0
    prob: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("mixup", "cutmix"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: accepted: alpha >= 0 (0: off)")
        if not 0 < self.prob <= 1:
            raise ValueError(f"mix_prob={self.prob!r}: accepted: 0 < p <= 1")

    @property
    def enabled(self) -> bool:
        return bool(self.mixup or self.cutmix)

    def describe(self) -> str:
        parts = [f"mixup {self.mixup}"] * bool(self.mixup) + [f"cutmix {self.cutmix}"] * bool(
            self.cutmix
        )
        return f"{' and '.join(parts)} (alpha), probability {self.prob}"

    def draw(self, inputs, step, replica=0) -> Mixed:
        """Mixes one replica's batch of images for global step `step` (tensors or ints)."""
        if not isinstance(inputs, tf.Tensor) or not (
            inputs.dtype.is_floating or inputs.dtype.is_integer
        ):
            raise ValueError(
                f"mixup/cutmix: the inputs are {type(inputs).__name__} "
                f"{getattr(inputs, 'dtype', '')}; accepted: a batch of images (one numeric tensor)"
            )
        if self.cutmix and inputs.shape.rank != 4:
            raise ValueError(
                f"cutmix: inputs of rank {inputs.shape.rank}; accepted: images (batch, height, "
                "width, channels), or mixup alone"
            )
        images = tf.cast(inputs, tf.float32)
        base = tf.stack([tf.cast(self.seed, tf.int64), tf.cast(step, tf.int64)])
        base = tf.stack([base[0] * 1_000_003 + tf.cast(replica, tf.int64), base[1]])
        seeds = tf.random.experimental.stateless_split(base, 8)
        batch = tf.shape(images)[0]
        partner = tf.argsort(tf.random.stateless_uniform([batch], seeds[0]), stable=True)
        partner = tf.cast(partner, tf.int32)
        others = tf.gather(images, partner)
        apply = tf.random.stateless_uniform([], seeds[1]) < self.prob
        if self.mixup and self.cutmix:
            use_cutmix = tf.random.stateless_uniform([], seeds[2]) < 0.5
        else:
            use_cutmix = tf.constant(bool(self.cutmix))
        mixed, lam = images, tf.constant(1.0)
        if self.mixup:
            lam_mixup = _beta(self.mixup, seeds[3], seeds[4])
            blended = lam_mixup * images + (1.0 - lam_mixup) * others
            mixed, lam = blended, lam_mixup
        if self.cutmix:
            lam_box = _beta(self.cutmix, seeds[5], seeds[6])
            pasted, lam_cut = _paste_box(images, others, lam_box, seeds[7])
            mixed = tf.where(use_cutmix, pasted, mixed)
            lam = tf.where(use_cutmix, lam_cut, lam)
        mixed = tf.where(apply, mixed, images)
        lam = tf.where(apply, lam, 1.0)
        return Mixed(mixed, partner, tf.fill([batch], lam))


def _beta(alpha: float, seed_x, seed_y):
    """A draw from Beta(alpha, alpha): X / (X + Y) for X, Y ~ Gamma(alpha)."""
    x = tf.random.stateless_gamma([], seed_x, alpha=alpha)
    y = tf.random.stateless_gamma([], seed_y, alpha=alpha)
    return x / tf.maximum(x + y, 1e-12)


def _paste_box(images, others, lam, seed):
    """`images` with a box of `others` pasted in, the box's side sqrt(1 - lam) of the image's
    around a uniform centre, clipped at the borders; and the fraction of pixels left."""
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    ratio = tf.sqrt(1.0 - lam)
    box_h = tf.cast(tf.round(tf.cast(height, tf.float32) * ratio), tf.int32)
    box_w = tf.cast(tf.round(tf.cast(width, tf.float32) * ratio), tf.int32)
    centre = tf.random.stateless_uniform([2], seed, minval=0, maxval=1 << 30, dtype=tf.int32)
    cy, cx = centre[0] % height, centre[1] % width
    y0, y1 = (
        tf.clip_by_value(cy - box_h // 2, 0, height),
        tf.clip_by_value(cy + (box_h + 1) // 2, 0, height),
    )
    x0, x1 = (
        tf.clip_by_value(cx - box_w // 2, 0, width),
        tf.clip_by_value(cx + (box_w + 1) // 2, 0, width),
    )
    rows, cols = tf.range(height), tf.range(width)
    inside = (
        tf.logical_and(rows >= y0, rows < y1)[:, None]
        & tf.logical_and(cols >= x0, cols < x1)[None, :]
    )
    pasted = tf.where(inside[None, :, :, None], others, images)
    area = tf.cast((y1 - y0) * (x1 - x0), tf.float32)
    return pasted, 1.0 - area / tf.cast(height * width, tf.float32)


def partner_labels(labels, partner):
    """Each example's partner's labels (any structure of per-example tensors)."""
    return tf.nest.map_structure(lambda value: tf.gather(value, partner), labels)


def mixed_loss(loss, labels, outputs, mixed: Mixed):
    """`lam * loss(labels, outputs) + (1 - lam) * loss(partner's labels, outputs)`, one value
    per example; `loss` is a task's per-example training loss."""
    own = loss(labels, outputs)
    other = loss(partner_labels(labels, mixed.partner), outputs)
    return mixed.lam * own + (1.0 - mixed.lam) * other


def soft_labels(labels, mixed: Mixed, num_classes: int):
    """The mixed examples' labels as class probabilities (batch, num_classes); each row sums
    to 1."""
    own = tf.one_hot(labels, num_classes)
    other = tf.one_hot(tf.gather(labels, mixed.partner), num_classes)
    lam = mixed.lam[:, None]
    return lam * own + (1.0 - lam) * other
