"""TransferModel: the augment, backbone and head submodules, called one by one."""

from __future__ import annotations

import keras

from tlloop.models.modes import INFERENCE, Modes, ModeTable


@keras.saving.register_keras_serializable(package="tlloop")
class TransferModel(keras.Model):
    """Three named submodules: `augment` -> `backbone` -> `head`, pixels in, logits out.

    `forward` calls each submodule with the `training` value its `Modes` row gives. It never
    relies on a nested `training=False`: Keras 3 lets an outer `training=True` override that.
    `call(x)` (and so `predict` and the exported model) runs the inference row.
    """

    def __init__(self, augment: keras.Model, backbone: keras.Model, head: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.augment = augment
        self.backbone = backbone
        self.head = head

    def forward(self, images, modes: Modes):
        """Logits for raw pixel `images`, each submodule in the mode `modes` gives it."""
        x = self.augment(images, training=modes.augment)
        x = self.backbone(x, training=modes.backbone)
        return self.head(x, training=modes.head)

    def call(self, inputs, training: bool = False):
        return self.forward(inputs, ModeTable().train if training else INFERENCE)

    def build(self, input_shape) -> None:
        # The submodules are built functional models; nothing to create here.
        self.built = True

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            **{
                name: keras.saving.serialize_keras_object(getattr(self, name))
                for name in ("augment", "backbone", "head")
            },
        }

    @classmethod
    def from_config(cls, config: dict) -> TransferModel:
        config = dict(config)
        parts = {
            name: keras.saving.deserialize_keras_object(config.pop(name))
            for name in ("augment", "backbone", "head")
        }
        return cls(**parts, **config)
