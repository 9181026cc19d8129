"""Models: backbones, heads, the augmentation submodule, the mode table and TransferModel."""

from __future__ import annotations

import contextlib

import keras
import numpy as np

from tlloop.config import ConfigError, ModelConfig
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
    "build_model",
    "build_text_model",
]

# A BERT-style text encoder has no BatchNorm but has Dropout, and is fine-tuned with that
# Dropout on: the train row of a phase that trains its weights runs it in training mode
# (a frozen phase keeps the default, inference mode, so its features can be cached).
TEXT_FINETUNE_MODES = ModeTable().with_backbone_training(True)


def build_model(
    config: ModelConfig,
    num_classes: int,
    seed: int = 0,
    *,
    standardized: tuple[np.ndarray, np.ndarray] | None = None,
) -> TransferModel:
    """The TransferModel `config` describes, with a head of `num_classes` outputs (classes,
    labels, or regression targets: with `standardized` (mean, std) the head predicts in the
    targets' units, see `heads.build_head`).

    With `config.mixed_precision`, its layers are made under Keras' mixed policy (the global
    policy is put back afterwards) and the head ends in a float32 layer.
    """
    with _dtype_policy(f"mixed_{config.mixed_precision}" if config.mixed_precision else None):
        backbone = build_backbone(
            config.backbone,
            config.weights,
            config.image_size,
            safe_mode=not config.unsafe_deserialization,
            layer=config.backbone_layer,
            channels=config.backbone_channels,
            value_range=config.backbone_range,
        )
        feature_shape = tuple(backbone.outputs[0].shape[1:])
        head = build_head(
            feature_shape,
            num_classes,
            config.dropout,
            float32_output=bool(config.mixed_precision),
            standardized=standardized,
        )
        augment = build_augment(config.augment, config.image_size, seed)
        model = TransferModel(backbone, head, augment, name="transfer_model")
    model.build((None, config.image_size, config.image_size, 3))
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


def build_text_model(config: ModelConfig, num_outputs: int, seed: int = 0) -> TransferModel:
    """A TransferModel of raw strings: the KerasHub text preset `config.backbone` (its
    tokenizer inside, see `hub.text_backbone`) and a head of `num_outputs` logits."""
    from tlloop.models import hub

    if config.weights not in ("", "none"):
        raise ConfigError(
            f"--weights={config.weights!r}: a KerasHub preset brings its own weights; accepted: "
            "'' (the preset's) or none (random initialisation)"
        )
    if not hub.is_preset(config.backbone):
        raise ConfigError(
            f"--backbone={config.backbone!r}: text examples need a KerasHub text preset; "
            "accepted: a local preset directory (backbone and preprocessor saved with "
            "save_to_preset) or a handle (hf://..., kaggle://...)"
        )
    keras.utils.set_random_seed(seed)
    backbone = hub.build_text_backbone(config.backbone, load_weights=config.weights != "none")
    head = build_head(tuple(backbone.outputs[0].shape[1:]), num_outputs, config.dropout)
    return TransferModel(backbone, head, name="transfer_model")
