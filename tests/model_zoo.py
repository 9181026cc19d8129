"""Models shaped the way researchers write them, each as a tlloop.TransferModel with data it
learns from and an unfreeze policy with the backbone layers it must (and alone may) train.

Every member has BatchNorm layers whose moving statistics sit far from their initial values
(as a pretrained network's do) and Dropout in its backbone, so a BatchNorm that trains, runs in
training mode, or a random state that is not checkpointed all show as changed numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np

import tlloop

SIZE, CLASSES = 8, 3


@dataclasses.dataclass(frozen=True)
class Member:
    """A zoo member: `build()` gives a fresh model with the same weights every time; `data(n,
    seed)` (inputs, labels); `unfreeze` the fine-tune policy; `trains` the names of the
    backbone layers it must train (and alone may change); `unused` the layers with weights the
    backbone holds but never calls."""

    name: str
    build: Callable[[], tlloop.TransferModel]
    data: Callable[[int, int], tuple]
    unfreeze: str
    trains: frozenset[str]
    unused: frozenset[str] = frozenset()


def images(count: int, seed: int):
    """Images whose class is the brightest colour channel: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, count).astype("int32")
    pixels = rng.uniform(0, 1, (count, SIZE, SIZE, 3)).astype("float32")
    pixels[np.arange(count), :, :, labels] += 1.0
    return pixels, labels


def dict_inputs(count: int, seed: int):
    pixels, labels = images(count, seed)
    extra = np.random.default_rng(seed + 7).normal(size=(count, 4)).astype("float32")
    return {"image": pixels, "extra": extra}, labels


def all_layers(layer) -> list:
    """Every layer at any depth, by Keras' own walk (independent of tlloop's)."""
    return layer._flatten_layers(include_self=True, recursive=True)


def pretrained_statistics(backbone: keras.Layer, seed: int = 0) -> None:
    """Moves every BatchNorm's moving statistics (at any depth) away from 0 and 1."""
    rng = np.random.default_rng(seed)
    for layer in all_layers(backbone):
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.uniform(-0.3, 0.3, shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape).astype("float32"))
            layer.gamma.assign(rng.uniform(0.8, 1.2, shape).astype("float32"))


# Registered, as a user must register the classes of a model whose .keras file is to load
# (tlloop refuses an unregistered one before training).
@keras.saving.register_keras_serializable(package="tlloop_zoo")
class ConvBlock(keras.layers.Layer):
    """A custom block: Conv, BatchNorm, ReLU, Dropout, called with the `training` it gets."""

    def __init__(self, filters: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(filters, 3, padding="same", name=f"{self.name}_conv")
        self.norm = keras.layers.BatchNormalization(name=f"{self.name}_bn")
        self.drop = keras.layers.Dropout(0.3, name=f"{self.name}_drop")

    def call(self, inputs, training=None):
        x = keras.ops.relu(self.norm(self.conv(inputs), training=training))
        return self.drop(x, training=training)


@keras.saving.register_keras_serializable(package="tlloop_zoo")
class DropoutDense(keras.layers.Layer):
    """A custom head layer: its Dropout (a random state) sits inside it."""

    def __init__(self, units: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.drop = keras.layers.Dropout(0.5, name="inner_drop")
        self.dense = keras.layers.Dense(units, name="inner_logits")

    def call(self, inputs, training=None):
        return self.dense(self.drop(inputs, training=training))


@keras.saving.register_keras_serializable(package="tlloop_zoo")
class CutNet(keras.Model):
    """A subclassed network cut by its `call`: it still holds the two classifier heads it was
    pretrained with, built, and never calls them."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stem = keras.layers.Conv2D(6, 3, padding="same", name="stem")
        self.norm = keras.layers.BatchNormalization(name="stem_bn")
        self.drop = keras.layers.Dropout(0.3, name="cut_drop")
        self.body = keras.layers.Conv2D(6, 3, padding="same", name="body")
        self.old_logits = keras.layers.Dense(10, name="old_logits")
        self.old_aux = keras.layers.Dense(5, name="old_aux")
        self.old_logits.build((None, 6))
        self.old_aux.build((None, 6))

    def call(self, inputs, training=None):
        x = keras.ops.relu(self.norm(self.stem(inputs), training=training))
        return self.body(self.drop(x, training=training))


def _head(features) -> keras.Model:
    return tlloop.classification_head(features, CLASSES, dropout=0.1)


def _finish(backbone, head=None) -> tlloop.TransferModel:
    pretrained_statistics(backbone)
    return tlloop.TransferModel(backbone, head if head is not None else _head(backbone))


def flat() -> tlloop.TransferModel:
    keras.utils.set_random_seed(1)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Dropout(0.3)(keras.layers.ReLU()(x))
    x = keras.layers.Conv2D(6, 3, padding="same", name="c2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    return _finish(keras.Model(inputs, keras.layers.ReLU()(x), name="flat"))


def nested() -> tlloop.TransferModel:
    """A functional model holding a Sequential and a functional model."""
    keras.utils.set_random_seed(2)
    sequential = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            keras.layers.Conv2D(6, 3, padding="same", name="s_conv"),
            keras.layers.BatchNormalization(name="s_bn"),
            keras.layers.ReLU(),
        ],
        name="stem",
    )
    inner_in = keras.Input((SIZE, SIZE, 6))
    x = keras.layers.Conv2D(6, 3, padding="same", name="i_conv")(inner_in)
    x = keras.layers.BatchNormalization(name="i_bn")(x)
    x = keras.layers.Dropout(0.3)(keras.layers.ReLU()(x))
    inner = keras.Model(inner_in, x, name="inner")
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(6, 1, name="top_conv")(inner(sequential(inputs)))
    return _finish(keras.Model(inputs, x, name="nested"))


def subclassed() -> tlloop.TransferModel:
    keras.utils.set_random_seed(3)
    backbone = CutNet(name="cut")
    backbone(np.zeros((1, SIZE, SIZE, 3), "float32"))  # as a loaded pretrained model is: built
    return _finish(backbone)


def custom() -> tlloop.TransferModel:
    """Custom blocks (Conv + BatchNorm + Dropout) in the backbone, a custom Dropout layer in
    the head."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = ConvBlock(6, name="block1")(inputs)
    x = ConvBlock(6, name="block2")(x)
    backbone = keras.Model(inputs, x, name="blocks")
    features = keras.Input((SIZE, SIZE, 6))
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    head = keras.Model(features, DropoutDense(CLASSES, name="drop_dense")(pooled), name="head")
    return _finish(backbone, head)


def shared() -> tlloop.TransferModel:
    """One Conv layer called twice."""
    keras.utils.set_random_seed(5)
    inputs = keras.Input((SIZE, SIZE, 3))
    twice = keras.layers.Conv2D(3, 3, padding="same", name="twice")
    x = keras.layers.ReLU()(twice(inputs))
    x = twice(keras.layers.Dropout(0.3)(x))
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Conv2D(6, 1, name="mix")(x)
    return _finish(keras.Model(inputs, x, name="shared"))


def dict_input() -> tlloop.TransferModel:
    keras.utils.set_random_seed(6)
    image = keras.Input((SIZE, SIZE, 3), name="image")
    extra = keras.Input((4,), name="extra")
    x = keras.layers.Conv2D(6, 3, padding="same", name="d_conv")(image)
    x = keras.layers.BatchNormalization(name="d_bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    y = keras.layers.Dense(4, name="extra_dense")(extra)
    x = keras.layers.Concatenate()([x, keras.layers.Dropout(0.3)(y)])
    x = keras.layers.Dense(8, name="joint")(x)
    return _finish(keras.Model({"image": image, "extra": extra}, x, name="dict"))


MEMBERS = {
    member.name: member
    for member in (
        Member("flat", flat, images, "top:1", frozenset({"c2"})),
        Member("nested", nested, images, "from:i_conv", frozenset({"i_conv", "top_conv"})),
        Member(
            "subclassed",
            subclassed,
            images,
            "all",
            frozenset({"stem", "body"}),
            frozenset({"old_logits", "old_aux"}),
        ),
        Member("custom", custom, images, "regex:block2", frozenset({"block2_conv"})),
        Member("shared", shared, images, "all", frozenset({"twice", "mix"})),
        Member("dict", dict_input, dict_inputs, "top:2", frozenset({"extra_dense", "joint"})),
    )
}


WORDS = ("good", "great", "fun", "bad", "awful", "dull", "the", "movie", "was", "plot")


def texts(count: int, seed: int):
    """Short sentences whose class is told by two of their five words."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, count).astype("int32")
    own = (("good", "great"), ("bad", "awful"), ("dull", "plot"))
    sentences = [
        " ".join([*rng.choice(WORDS[6:9], 3), *rng.choice(own[label], 2)]) for label in labels
    ]
    return np.array(sentences), labels


def text_member(directory: str) -> Member:
    """A one-layer KerasHub BERT (Dropout 0.1) saved with save_to_preset in `directory`,
    strings in."""
    from task_data import write_bert_preset

    preset = write_bert_preset(directory, WORDS, dropout=0.1)

    def build():
        keras.utils.set_random_seed(7)
        backbone = tlloop.text_backbone(preset)
        return tlloop.TransferModel(backbone, tlloop.classification_head(backbone, CLASSES))

    return Member(
        "text", build, texts, "top:2", frozenset({"feedforward_output_dense", "pooled_dense"})
    )


FINETUNE_MODES = tlloop.ModeTable().with_backbone_training(True)  # Dropout on, BN left alone


def zoo_trainer(
    workdir,
    member: Member,
    finetune_epochs: int = 1,
    modes=FINETUNE_MODES,
    checkpoint: tlloop.CheckpointConfig | None = None,
    **kwargs,
) -> tlloop.Trainer:
    """A head phase (1 epoch) then a fine-tune phase of `member`'s policy whose backbone runs
    in `modes`; quiet; by default the last weights exported."""
    return tlloop.Trainer(
        str(workdir),
        phases=[
            tlloop.Phase("head", 1, 3e-2),
            tlloop.Phase("finetune", finetune_epochs, 1e-2, unfreeze=member.unfreeze, modes=modes),
        ],
        task=tlloop.Classification(CLASSES),
        logging=tlloop.LoggingConfig(quiet=True),
        checkpoint=checkpoint or tlloop.CheckpointConfig(export="last"),
        **kwargs,
    )


def layer_of(backbone) -> dict[str, str]:
    """The name of the layer that owns each backbone variable, by variable path."""
    return {
        variable.path: layer.name
        for layer in all_layers(backbone)
        for variable in layer._trainable_variables + layer._non_trainable_variables
    }


def flags(model) -> tuple[list, list]:
    """Every layer's and variable's trainable flag (to see them left as they were)."""
    layers = all_layers(model)
    return [layer.trainable for layer in layers], [v.trainable for v in model.variables]
