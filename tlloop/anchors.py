"""The backbone's weights at the run's start (w0), and what tlloop measures against them.

`Anchors` keeps a copy of every backbone weight as it was when the run started (after the
pretrained or warm-started weights were loaded, before any step): non-trainable `tf.Variable`s
made under the strategy's scope and saved in every checkpoint, so a resumed run measures against
the same w0 as the run it resumes. Two things use them:

- L2-SP (Li, Grandvalet and Davoine, ICML 2018, "Explicit Inductive Bias for Transfer Learning
  with Convolutional Networks"): `Penalty` adds ALPHA/2 x ||w - w0||^2 over the trainable backbone
  weights (every one: kernels, biases and BatchNorm scales; the starting point is the prior for
  all of them) and BETA/2 x ||w||^2 over the head's kernels (the new weights have no starting
  point to pull toward; biases and BatchNorm weights are left alone, as weight decay leaves them).
- Where fine-tuning moved the weights: `Anchors.drift` gives, per backbone layer that owns
  weights (at any depth), ||w - w0|| / ||w0|| over the weights the layer owns (BatchNorm's moving
  statistics included: they move under `bn_mode=train`).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tlloop.models.walk import all_layers, own_weights
from tlloop.phases import no_decay_variables


def _layer_name(weights: list) -> str:
    """A layer's name as its weights' paths give it ("outer/inner/conv"), unique in a model
    where layer names alone are not (two nested models may each hold a "conv")."""
    return weights[0].path.rsplit("/", 1)[0]


class Anchors:
    """A copy (w0) of every weight of `backbone` as it is now; create it under the strategy's
    scope at the run's start and checkpoint `variables`."""

    def __init__(self, backbone: keras.Layer) -> None:
        self.layers: dict[str, list[tuple]] = {}  # layer name -> [(weight, its w0)]
        self._of: dict[int, tf.Variable] = {}
        for layer in all_layers(backbone, include_self=True):
            # Random-number state is not a weight.
            weights = [w for w in own_weights(layer) if "seed_generator" not in w.path]
            if not weights:
                continue
            name = base = _layer_name(weights)
            count = 1
            while name in self.layers:  # a layer with no path of its own: keep each apart
                count += 1
                name = f"{base}_{count}"
            pairs = []
            for weight in weights:
                anchor = tf.Variable(
                    tf.convert_to_tensor(weight), trainable=False, name="w0_" + weight.name
                )
                self._of[id(weight)] = anchor
                pairs.append((weight, anchor))
            self.layers[name] = pairs

    @property
    def variables(self) -> list[tf.Variable]:
        """The w0 variables, in a fixed order: what the checkpoint holds."""
        return [anchor for pairs in self.layers.values() for _, anchor in pairs]

    def of(self, weight) -> tf.Variable | None:
        """The w0 of `weight`, or None if it is not a backbone weight."""
        return self._of.get(id(weight))

    def drift(self) -> dict[str, float]:
        """Per backbone layer with weights, ||w - w0|| / ||w0|| over the weights it owns (in
        float64; ||w - w0|| itself for a layer whose w0 is all zeros). A layer nothing updated
        reports exactly 0."""
        drift = {}
        for name, pairs in self.layers.items():
            moved = total = 0.0
            for weight, anchor in pairs:
                now = np.asarray(weight.numpy(), np.float64)
                start = np.asarray(anchor.numpy(), np.float64)
                moved += float(np.sum(np.square(now - start)))
                total += float(np.sum(np.square(start)))
            drift[name] = float(np.sqrt(moved / total) if total else np.sqrt(moved))
        return drift


class Penalty:
    """L2-SP's penalty for one trainable set (`variables`, the train step's): ALPHA/2 x
    ||w - w0||^2 over those that are backbone weights (`l2sp`, w0 from `anchors`) and BETA/2 x
    ||w||^2 over those that are the head's kernels (`l2sp_head`). `columns` names the terms
    logged, one per coefficient > 0; a term over no variable (a frozen backbone) is 0."""

    def __init__(
        self,
        model,
        variables: list,
        anchors: Anchors | None,
        *,
        l2sp: float = 0.0,
        l2sp_head: float = 0.0,
    ) -> None:
        self.l2sp, self.l2sp_head = float(l2sp), float(l2sp_head)
        self.pulled = []
        if l2sp:
            if anchors is None:
                raise ValueError("l2sp: the backbone's starting weights (Anchors) are needed")
            found = ((v, anchors.of(v)) for v in variables)
            self.pulled = [(v, a) for v, a in found if a is not None]
        self.decayed = []
        if l2sp_head:
            spared = {id(v) for v in no_decay_variables(model)}
            head = {id(v) for v in model.head.trainable_variables}
            self.decayed = [v for v in variables if id(v) in head and id(v) not in spared]
        self.columns = ("l2sp",) * bool(l2sp) + ("l2sp_head",) * bool(l2sp_head)

    @property
    def enabled(self) -> bool:
        return bool(self.columns)

    def terms(self) -> list:
        """The terms named by `columns`, as float32 scalars of the current weights (in replica
        context: this replica's copy, equal on every replica)."""
        terms = []
        if self.l2sp:
            squares = [tf.reduce_sum(tf.square(_read(v) - _read(a))) for v, a in self.pulled]
            terms.append(self.l2sp / 2 * _total(squares))
        if self.l2sp_head:
            squares = [tf.reduce_sum(tf.square(_read(v))) for v in self.decayed]
            terms.append(self.l2sp_head / 2 * _total(squares))
        return terms


def _read(variable) -> tf.Tensor:
    return tf.cast(tf.convert_to_tensor(variable), tf.float32)


def _total(values: list) -> tf.Tensor:
    return tf.add_n(values) if values else tf.constant(0.0)
