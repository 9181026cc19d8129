"""The README's central claim, kept honest against the installed Keras.

The Keras transfer-learning guide builds `x = base(inputs, training=False)` inside a functional
model so that, after `base.trainable = True`, BatchNormalization keeps running in inference
mode. On Keras 3.15 the outer `model.fit` (which calls the model with `training=True`) overrides
the nested `training=False`, and the backbone's moving statistics move. tlloop calls each
submodule itself with the mode table's value and leaves them untouched. If a Keras release
fixes the override, the first test below fails, and the README's claim must be revised.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from conftest import changed, snapshot

from tlloop import phases as phase_lib
from tlloop.cli.config import ModelConfig
from tlloop.cli.model import build_model
from tlloop.config import PhaseConfig, Unfreeze
from tlloop.models import ModeTable
from tlloop.models.backbones import small_cnn
from tlloop.optim import make_optimizer
from tlloop.steps import Metrics, StepOptions, compile_train

SIZE, CLASSES = 16, 3


def _data():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (16, SIZE, SIZE, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, 16).astype(np.int32)
    return images, labels


def _statistics(backbone) -> dict[str, np.ndarray]:
    values = {k: v for k, v in snapshot(backbone).items() if "moving_" in k}
    assert len(values) == 6  # bn1..bn3: moving_mean and moving_variance
    return values


def test_keras_guide_nested_training_false_does_not_protect_batchnorm_under_fit():
    keras.utils.set_random_seed(0)
    base = small_cnn(SIZE)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = base(inputs, training=False)  # the guide's recipe
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES)(x))
    base.trainable = True  # the guide's fine-tuning step, then compile again
    model.compile(
        optimizer=keras.optimizers.SGD(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = _statistics(base)
    images, labels = _data()
    model.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    # If this fails, Keras now honours the nested training=False under fit: the README's
    # "Trainable is not training" section and BUILD.md's benchmark notes must say so.
    assert changed(before, _statistics(base)) == set(before)


def test_tlloop_train_step_leaves_an_unfrozen_backbones_batchnorm_bit_identical():
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(backbone="small_cnn", image_size=SIZE, dropout=0.0), CLASSES)
    phase = phase_lib.PlannedPhase(
        0, PhaseConfig("finetune", 1, 1e-3, Unfreeze("all")), ModeTable()
    )
    phase_lib.apply_trainability(model, phase)
    optimizer = make_optimizer(phase.config, model.trainable_variables)
    step = compile_train(
        model,
        optimizer,
        phase.modes,
        Metrics(),
        tf.Variable(0, dtype=tf.int64),
        StepOptions(batch_size=8, eval_batch_size=8, log_every_steps=0),
    )
    before, statistics = snapshot(model.backbone), _statistics(model.backbone)
    images, labels = _data()
    step(iter(tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)), 2)
    after = snapshot(model.backbone)
    assert not changed(statistics, _statistics(model.backbone))
    assert {"conv1/kernel", "conv2/kernel", "conv3/kernel"} <= changed(before, after)
