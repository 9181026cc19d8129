"""The feature-extraction fast path: a frozen phase trains the head on cached features.

When a phase leaves every backbone weight frozen and nothing upstream of the backbone is random
(no augmentation), the backbone maps each image to the same features in every epoch: they are
computed once, in inference mode, and the head trains on them (the Keras transfer-learning
guide's second workflow). The features line up batch for batch with the images the slow path
would see (`Data.stream`), and the head's Dropout draws from the same RNG state, so the head
ends where the slow path would, to float tolerance (features computed in other batch sizes).
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import tensorflow as tf

from tlloop.data import Data
from tlloop.models import TransferModel

MODES = ("auto", "off")
# Above this the cache is not made: features stay in memory.
MAX_BYTES = 2 * 1024**3


@dataclasses.dataclass(frozen=True)
class CachedFeatures:
    """Backbone features of the training examples (unshuffled: feed to `Data.stream`) and of
    the padded evaluation batches, with the seconds their computation took."""

    train: tf.data.Dataset
    eval: tf.data.Dataset
    seconds: float


def decide(mode: str, backbone_frozen: bool, augmenting: bool, model, data: Data):
    """(use the cache?, the reason, as logged)."""
    if mode == "off":
        return False, "off (--feature_cache=off)"
    if not backbone_frozen:
        return False, "off: backbone weights train in this phase"
    if augmenting:
        return False, "off: augmentation makes every epoch's images differ"
    shape = model.backbone.outputs[0].shape[1:]
    examples = data.train_size + data.eval_steps * _eval_batch(data)
    size = examples * math.prod(shape) * 4
    if size > MAX_BYTES:
        return False, f"off: {size / 1024**3:.1f} GiB of features would not fit the 2 GiB budget"
    return True, f"on: backbone frozen and no augmentation ({size / 1024**2:.1f} MiB of features)"


def compute(model: TransferModel, data: Data, batch: int = 64) -> CachedFeatures:
    """Runs the backbone once, in inference mode, over the training and evaluation images."""
    started = time.perf_counter()
    backbone = tf.function(lambda images: model.backbone(images, training=False))
    train_features, labels = [], []
    for images, label in data.train_examples.batch(batch):
        train_features.append(backbone(images).numpy())
        labels.append(label.numpy())
    train = tf.data.Dataset.from_tensor_slices(
        (np.concatenate(train_features), np.concatenate(labels))
    )
    eval_batches = [(backbone(x).numpy(), y.numpy(), w.numpy()) for x, y, w in data.eval]
    evaluation = tf.data.Dataset.from_tensor_slices(
        tuple(np.stack(part) for part in zip(*eval_batches, strict=True))
    )
    return CachedFeatures(train.cache(), evaluation.cache(), time.perf_counter() - started)


def _eval_batch(data: Data) -> int:
    return int(data.eval.element_spec[0].shape[0] or 1)
