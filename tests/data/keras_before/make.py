"""Writes model.keras and expected.npz here; they were made with tlloop at commit 24302fb, before
the library/command-line split moved modules (issue 26).

Run from a checkout of a tlloop commit: `PYTHONPATH=. python tests/data/keras_before/make.py`.
The model holds every Keras class tlloop registers for its models (TransferModel,
ApplicationPreprocess, InputAdapter, RandomResizedCrop, Destandardize); test_structure.py
loads it with today's code and compares its outputs.
"""

import os

import keras
import numpy as np

import tlloop
from tlloop.config import parse_augment
from tlloop.models.adapters import InputAdapter
from tlloop.models.augment import build_augment
from tlloop.models.backbones import ApplicationPreprocess
from tlloop.tasks import Regression

HERE = os.path.dirname(os.path.abspath(__file__))
keras.utils.set_random_seed(0)
pixels = keras.Input((12, 12, 3), name="pixels")
x = InputAdapter(channels="grayscale", scale=1 / 255, offset=0.0, size=(8, 8))(pixels)
x = keras.layers.Concatenate()([x, x, x])
x = keras.layers.Rescaling(255.0)(x)
x = ApplicationPreprocess("MobileNetV2")(x)
x = keras.layers.Conv2D(4, 3, name="conv")(x)
x = keras.layers.BatchNormalization(name="bn")(x)
backbone = keras.Model(pixels, x, name="backbone")
task = Regression(2, targets=np.array([[1.0, 10.0], [3.0, 30.0]]))
head = tlloop.regression_head(backbone, task)
augment = build_augment(parse_augment("crop:0.2,flip"), 12, seed=1)
model = tlloop.TransferModel(backbone, head, augment=augment)
inputs = np.random.default_rng(0).uniform(0, 255, (3, 12, 12, 3)).astype("float32")
outputs = np.asarray(model(inputs, training=False))
model.save(os.path.join(HERE, "model.keras"))
np.savez(os.path.join(HERE, "expected.npz"), inputs=inputs, outputs=outputs)
