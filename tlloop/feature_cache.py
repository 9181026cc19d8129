"""The feature-extraction fast path: a frozen phase trains the head on cached features.

When a phase leaves every backbone weight frozen, its mode table runs the backbone in inference
mode (training=False) in the train step, and nothing upstream of the backbone is random (no
augmentation), the backbone maps each example to the same features in every epoch: they are
computed once, in inference mode, and the head trains on them (the Keras transfer-learning
guide's second workflow). Cached features are in-memory examples in the same index order as
their inputs, so the seeded training order (`examples.example_index`) gives the same batches,
and the head's Dropout draws from the same RNG state: the head ends where the slow path would,
to float tolerance (features computed in other batch sizes).
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import tensorflow as tf

from tlloop.data.examples import Examples, InMemoryExamples
from tlloop.models import TransferModel

# Above this the cache is not made: features stay in memory.
MAX_BYTES = 2 * 1024**3


@dataclasses.dataclass(frozen=True)
class CachedFeatures:
    """Backbone features of the training and evaluation examples, in their index order, with
    the seconds their computation took."""

    train: InMemoryExamples
    eval: InMemoryExamples
    seconds: float


def decide(
    mode: str,
    *,
    backbone_frozen: bool,
    backbone_training: bool = False,
    augmenting: bool,
    mixing: str = "",
    model: TransferModel,
    train: Examples,
    eval_data: Examples,
    eval_batch_size: int,
):
    """(use the cache?, the reason, as logged). `backbone_training`: the `training` value the
    phase's mode table gives the backbone in the train step (the cache holds inference-mode
    features, so only a phase that runs it with training=False may use them). `mixing`
    describes the phase's MixUp/CutMix (empty: none)."""
    if mode == "off":
        return False, "off (feature_cache=off)"
    if not backbone_frozen:
        return False, "off: backbone weights train in this phase"
    if backbone_training:  # Dropout on (or BatchNorm on batch statistics): features vary
        return False, (
            "off: the mode table runs the backbone with training=True in the train step "
            "(its Dropout or batch statistics change the features every step)"
        )
    if augmenting:
        return False, "off: augmentation makes every epoch's images differ"
    if mixing:  # mixed batches differ every epoch, and mix pixels, not features
        return False, f"off: {mixing} mixes every epoch's images differently"
    if not (train.positionable and eval_data.positionable):
        return False, "off: the data is a stream in its own order, not examples tlloop orders"
    per_example = _feature_bytes(model, train)
    examples = train.size + eval_data.eval_steps(eval_batch_size) * eval_batch_size
    size = examples * per_example
    if size > MAX_BYTES:
        return False, f"off: {size / 1024**3:.1f} GiB of features would not fit the 2 GiB budget"
    return True, f"on: backbone frozen and no augmentation ({size / 1024**2:.1f} MiB of features)"


def _feature_bytes(model: TransferModel, train: Examples) -> int:
    """Bytes of one example's features: from the backbone's symbolic outputs when it has them
    (no forward pass), else from a forward pass on one example."""
    outputs = getattr(model.backbone, "outputs", None)
    if not outputs:
        first = next(iter(train.ordered().take(1).batch(1)))[0]
        outputs = tf.nest.flatten(model.backbone(first, training=False))
    return sum(math.prod(t.shape[1:]) * tf.as_dtype(t.dtype).size for t in outputs)


def compute(
    model: TransferModel, train: Examples, eval_data: Examples, batch: int = 64
) -> CachedFeatures:
    """Runs the backbone once, in inference mode, over the training and evaluation examples."""
    started = time.perf_counter()
    # One trace for full batches, one (relaxed) for the last partial batches of both sets.
    backbone = inference_call(model.backbone)
    train_features = features(backbone, train, batch)
    eval_features = features(backbone, eval_data, batch)
    return CachedFeatures(train_features, eval_features, time.perf_counter() - started)


def inference_call(backbone):
    """`backbone` called in inference mode, compiled once (relaxed for a partial last batch)."""
    return tf.function(lambda inputs: backbone(inputs, training=False), reduce_retracing=True)


def features(call, examples: Examples, batch: int = 64) -> InMemoryExamples:
    """The outputs of `call` (see `inference_call`) on every example once, in index order, with
    the examples' labels: one pass, streamed examples included."""
    parts, labels = [], []
    for inputs, label in examples.ordered().batch(batch):
        parts.append(tf.nest.map_structure(np.asarray, call(inputs)))
        labels.append(label.numpy())
    stacked = tf.nest.map_structure(lambda *a: np.concatenate(a), *parts)
    return InMemoryExamples(stacked, np.concatenate(labels))
