"""A researcher's script on the Python API, run in a subprocess by test_api_process.py.

    python tests/api_script.py WORKDIR [--replicas=2] [--stream]

Trains a model tlloop did not build (a conv + BatchNorm backbone, a Dropout head, a random-flip
augment submodule) on in-memory arrays (or, with --stream, a tf.data pipeline) with
deterministic ops and a checkpoint every step, and prints one JSON line: each phase's
evaluation example count, a standalone evaluation's count and the final weights' SHA-256.
"""

from __future__ import annotations

import argparse
import json

import tensorflow as tf

parser = argparse.ArgumentParser()
parser.add_argument("workdir")
parser.add_argument("--replicas", type=int, default=1)
parser.add_argument("--stream", action="store_true")
args = parser.parse_args()
if args.replicas > 1:  # before TensorFlow initialises its devices
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tlloop  # noqa: E402

keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
labels = rng.integers(0, 3, 61).astype("int32")
images = rng.uniform(0, 120, (61, 12, 12, 3)).astype("float32")
images[np.arange(61), :, :, labels] += 100.0
train, evaluation = (images[:48], labels[:48]), (images[48:], labels[48:])  # 13 to evaluate
if args.stream:
    evaluation = tf.data.Dataset.from_tensor_slices(evaluation)

strategy = (
    tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(args.replicas)])
    if args.replicas > 1
    else tf.distribute.get_strategy()
)
with strategy.scope():
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(6, 3, name="conv")(keras.layers.Rescaling(1 / 255)(inputs))
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn")(x))
    backbone = keras.Model(inputs, x, name="backbone")
    augment = keras.Sequential([keras.layers.RandomFlip("horizontal", seed=1)], name="augment")
    model = tlloop.TransferModel(
        backbone, tlloop.classification_head(backbone, 3, dropout=0.3), augment
    )

trainer = tlloop.Trainer(
    args.workdir,
    phases=[
        tlloop.Phase("head", 3, 3e-2, tlloop.Unfreeze("none")),
        tlloop.Phase("finetune", 3, 1e-2, tlloop.Unfreeze("all")),
    ],
    task=tlloop.Classification(3),
    strategy=strategy,
    deterministic=True,
    checkpoint=tlloop.CheckpointConfig(every_steps=1, export="last"),
    logging=tlloop.LoggingConfig(log_every_steps=1, quiet=True),
)
results = trainer.fit(model, train, evaluation, batch_size=8, eval_batch_size=4)
evaluated = tlloop.evaluate(model, evaluation, batch_size=4, strategy=strategy)
print(
    json.dumps(
        {
            "eval_examples": [p["eval"]["examples"] for p in results.phases],
            "evaluate_examples": evaluated["examples"],
            "replicas": results["replicas"],
            "weights_sha256": results.weights_sha256,
        }
    )
)
