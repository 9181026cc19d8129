"""The model the flags describe: ModelConfig -> the library's model builders' arguments."""

from __future__ import annotations

import dataclasses

import numpy as np

from tlloop.cli.config import ModelConfig
from tlloop.models import TransferModel, build_text_transfer_model, build_transfer_model


def build_model(
    config: ModelConfig,
    num_classes: int,
    seed: int = 0,
    *,
    standardized: tuple[np.ndarray, np.ndarray] | None = None,
) -> TransferModel:
    """The image TransferModel `config` describes, with a head of `num_classes` outputs (see
    `tlloop.models.build_transfer_model`)."""
    return build_transfer_model(
        num_classes,
        source=config.backbone,
        weights=config.weights,
        image_size=config.image_size,
        dropout=config.dropout,
        augment=config.augment,
        layer=config.backbone_layer,
        channels=config.backbone_channels,
        value_range=config.backbone_range,
        safe_mode=not config.unsafe_deserialization,
        mixed_precision=config.mixed_precision,
        seed=seed,
        standardized=standardized,
    )


def build_text_model(config: ModelConfig, num_outputs: int, seed: int = 0) -> TransferModel:
    """The text TransferModel `config` describes: its --backbone a KerasHub text preset (see
    `tlloop.models.build_text_transfer_model`)."""
    return build_text_transfer_model(
        num_outputs,
        source=config.backbone,
        weights=config.weights,
        dropout=config.dropout,
        seed=seed,
    )


def restorable_model(config: ModelConfig, num_classes: int) -> TransferModel:
    """The model `config` describes, to restore a checkpoint into: without the weights the
    checkpoint overwrites (none downloaded for a keras.applications backbone) or a warm start."""
    application = not config.backbone.endswith(".keras")
    config = dataclasses.replace(
        config, weights="none" if application else config.weights, init_checkpoint=""
    )
    return build_model(config, num_classes)
