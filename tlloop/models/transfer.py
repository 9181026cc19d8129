"""TransferModel: the augment, backbone and head submodules, called one by one."""

from __future__ import annotations

import keras

from tlloop.models.modes import INFERENCE, Modes, ModeTable


@keras.saving.register_keras_serializable(package="tlloop")
class TransferModel(keras.Model):
    """Three named submodules: `augment` -> `backbone` -> `head`.

    Any Keras models (or layers) will do: the backbone's inputs may be images, token ids, a
    dict of tensors; the head takes what the backbone returns. Without `augment`, an identity
    layer stands in. `forward` calls each submodule with the `training` value its `Modes` row
    gives. It never relies on a nested `training=False`: Keras 3 lets an outer
    `training=True` override that. `call(x)` (and so `predict` and the exported model) runs the
    inference row.
    """

    def __init__(
        self,
        backbone: keras.layers.Layer,
        head: keras.layers.Layer,
        augment: keras.layers.Layer | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, part in (("backbone", backbone), ("head", head), ("augment", augment)):
            if part is not None and not isinstance(part, keras.layers.Layer):
                raise TypeError(
                    f"{name}: {type(part).__name__} is not a Keras model or layer; accepted: a "
                    "keras.Model (functional, Sequential or subclassed) or keras.layers.Layer"
                )
        self.augment = augment if augment is not None else keras.layers.Identity(name="augment")
        self.backbone = backbone
        self.head = head
        # Built submodules (functional models are) make a built model: it can be exported and
        # checkpointed before it is ever called.
        self.built = backbone.built and head.built

    def forward(self, inputs, modes: Modes):
        """The head's outputs for `inputs`, each submodule in the mode `modes` gives it."""
        x = self.augment(inputs, training=modes.augment)
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
