"""Writes experiments/pretrained/gray_digits0-4.h5: a small grayscale classifier of UCI digits
0-4 that takes 32x32x1 images scaled to [-1, 1], saved in the legacy HDF5 layout, as someone
else's pretrained network would come (see experiments/h5_grayscale_cut.flags).

    python examples/pretrain_grayscale_h5.py   # about 30 s on 2 CPU cores
"""

from __future__ import annotations

import os

import keras
import numpy as np

from tlloop.cli import config as config_lib
from tlloop.cli.data import load_data

OUT = os.path.join(os.path.dirname(__file__), "..", "experiments", "pretrained")


def grayscale_minus_one_to_one(pixels: np.ndarray) -> np.ndarray:
    """RGB pixels in [0, 255] -> luma in [-1, 1], the input this network was trained on."""
    luma = np.asarray(pixels, np.float32) @ np.array([0.2989, 0.5870, 0.1140], np.float32)
    return luma[..., None] / 127.5 - 1.0


def main() -> None:
    keras.utils.set_random_seed(0)
    flags = {"workdir": "unused", "dataset": "digits", "classes": "0-4", "image_size": 32}
    data = load_data(config_lib.from_flags(flags).data)
    x_train = grayscale_minus_one_to_one(data.train_examples.inputs)
    x_eval = grayscale_minus_one_to_one(data.eval_examples.inputs)
    inputs = keras.Input((32, 32, 1), name="gray")
    x = inputs
    for i, filters in enumerate((16, 32, 64), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(5, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs, name="gray_digits")
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, data.train_examples.labels, epochs=20, batch_size=32, verbose=0)
    _, accuracy = model.evaluate(x_eval, data.eval_examples.labels, verbose=0)
    print(f"eval accuracy on digits 0-4: {accuracy:.3f}")
    os.makedirs(OUT, exist_ok=True)
    model.save(os.path.join(OUT, "gray_digits0-4.h5"))


if __name__ == "__main__":
    main()
