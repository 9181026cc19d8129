"""Models: backbones, heads, the augmentation submodule, the mode table and TransferModel."""

from __future__ import annotations

import contextlib

import keras
import numpy as np

from tlloop.config import AugmentOp, ConfigError
from tlloop.models.augment import build_augment
from tlloop.models.backbones import build_backbone
from tlloop.models.heads import build_head
from tlloop.models.modes import INFERENCE, Modes, ModeTable
from tlloop.models.transfer import TransferModel

__all__ = [
    "INFERENCE",
    "TEXT_FINETUNE_MODES",
    "ModeTable",
    "Modes",
    "TransferModel",
    "build_text_transfer_model",
    "build_transfer_model",
]

# A BERT-style text encoder has no BatchNorm but has Dropout, and is fine-tuned with that
# Dropout on: the train row of a phase that trains its weights runs it in training mode
# (a frozen phase keeps the default, inference mode, so its features can be cached).
TEXT_FINETUNE_MODES = ModeTable().with_backbone_training(True)


def build_transfer_model(
    num_outputs: int,
    *,
    source: str,
    weights: str,
    image_size: int,
    dropout: float,
    augment: tuple[AugmentOp, ...] = (),
    layer: str = "",
    channels: str = "",
    value_range: str = "",
    safe_mode: bool = True,
    mixed_precision: str = "",
    seed: int = 0,
    standardized: tuple[np.ndarray, np.ndarray] | None = None,
) -> TransferModel:
    """A TransferModel of images: the backbone `source` (see `backbones.build_backbone`, which
    `weights`, `layer`, `channels`, `value_range` and `safe_mode` go to) at `image_size`, a head
    of `num_outputs` outputs (classes, labels, or regression targets: with `standardized`
    (mean, std) the head predicts in the targets' units, see `heads.build_head`) behind
    `dropout`, and the `augment` operations in front.

    With `mixed_precision` ("float16" or "bfloat16"), its layers are made under Keras' mixed
    policy (the global policy is put back afterwards) and the head ends in a float32 layer.
    """
    with _dtype_policy(f"mixed_{mixed_precision}" if mixed_precision else None):
        backbone = build_backbone(
            source,
            weights,
            image_size,
            safe_mode=safe_mode,
            layer=layer,
            channels=channels,
            value_range=value_range,
        )
        feature_shape = tuple(backbone.outputs[0].shape[1:])
        head = build_head(
            feature_shape,
            num_outputs,
            dropout,
            float32_output=bool(mixed_precision),
            standardized=standardized,
        )
        model = TransferModel(
            backbone, head, build_augment(augment, image_size, seed), name="transfer_model"
        )
    model.build((None, image_size, image_size, 3))
    return model


@contextlib.contextmanager
def _dtype_policy(name: str | None):
    if name is None:
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_text_transfer_model(
    num_outputs: int, *, source: str, weights: str, dropout: float, seed: int = 0
) -> TransferModel:
    """A TransferModel of raw strings: the KerasHub text preset `source` (its tokenizer
    inside, see `hub.text_backbone`; `weights` "" for the preset's, "none" for random
    initialisation) and a head of `num_outputs` logits behind `dropout`."""
    from tlloop.models import hub

    if weights not in ("", "none"):
        raise ConfigError(
            "weights",
            repr(weights),
            "a KerasHub preset brings its own weights",
            "'' (the preset's) or none (random initialisation)",
        )
    if not hub.is_preset(source):
        raise ConfigError(
            "source",
            repr(source),
            "text examples need a KerasHub text preset",
            "a local preset directory (backbone and preprocessor saved with save_to_preset) or "
            "a handle (hf://..., kaggle://...)",
        )
    keras.utils.set_random_seed(seed)
    backbone = hub.text_backbone(source, load_weights=weights != "none")
    head = build_head(tuple(backbone.outputs[0].shape[1:]), num_outputs, dropout)
    return TransferModel(backbone, head, name="transfer_model")
