"""A backbone that does not take pixels: transfer a small text encoder with tlloop's API.

    python examples/text_backbone.py [--workdir=runs/text] [--epochs=4]

The encoder takes a dict of token ids ({"tokens": int32 (batch, 12)}). It is pretrained with
plain Keras on a source task (which of six word groups was planted in a sentence), then
transferred with tlloop to a target task with few labels (which of three topics, each two of
those groups, a sentence is about): the head trains with the encoder frozen, then everything
is fine-tuned, with the encoder's Dropout in training mode while it is fine-tuned (the mode
table says so). Prints one JSON line: the evaluation accuracy after each phase and the chance
level.
"""

from __future__ import annotations

import argparse
import json

import keras
import numpy as np

import tlloop

VOCABULARY, LENGTH = 64, 12
GROUPS = [range(4 + 4 * g, 8 + 4 * g) for g in range(6)]  # six groups of four words
FILLER = range(30, VOCABULARY)  # words of no group


def sentences(count: int, seed: int):
    """Sentences of filler words with three words of one group planted; the source label is
    the group, the target label its topic (groups 0-1, 2-3, 4-5)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(FILLER.start, FILLER.stop, (count, LENGTH)).astype("int32")
    group = rng.integers(0, len(GROUPS), count)
    for row, g in zip(tokens, group, strict=True):
        row[rng.choice(LENGTH, 3, replace=False)] = rng.choice(list(GROUPS[g]), 3)
    return {"tokens": tokens}, group.astype("int32"), (group // 2).astype("int32")


def encoder() -> keras.Model:
    tokens = keras.Input((LENGTH,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(VOCABULARY, 24, name="embedding")(tokens)
    x = keras.layers.Dropout(0.1, name="embedding_dropout")(x)
    x = keras.layers.Conv1D(32, 3, padding="same", activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    x = keras.layers.Dense(32, activation="relu", name="dense")(x)
    return keras.Model({"tokens": tokens}, x, name="backbone")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/text")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)

    backbone = encoder()
    source_x, source_y, _ = sentences(2000, seed=1)
    tokens = {"tokens": keras.Input((LENGTH,), dtype="int32", name="tokens")}
    pretraining = keras.Model(tokens, keras.layers.Dense(len(GROUPS))(backbone(tokens)))
    pretraining.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pretraining.fit(source_x, source_y, epochs=3, batch_size=64, verbose=0)

    train_x, _, train_y = sentences(90, seed=2)
    eval_x, _, eval_y = sentences(301, seed=3)
    model = tlloop.TransferModel(backbone, tlloop.classification_head(backbone, 3, dropout=0.1))
    trainer = tlloop.Trainer(
        args.workdir,
        phases=[
            tlloop.Phase("head", args.epochs, 3e-2, tlloop.Unfreeze("none")),
            # A text encoder is fine-tuned with its Dropout on: bn_mode="train" runs the
            # backbone with training=True in the train step (it has no BatchNorm to protect).
            tlloop.Phase("finetune", args.epochs, 1e-3, tlloop.Unfreeze("all"), bn_mode="train"),
        ],
        task=tlloop.Classification(3),
        logging=tlloop.LoggingConfig(quiet=True),
        overwrite=True,
    )
    modes = trainer.describe(model)  # each phase's mode table and trainability
    results = trainer.fit(model, (train_x, train_y), (eval_x, eval_y), batch_size=16)
    print(
        json.dumps(
            {
                "eval_accuracy": {p["name"]: p["eval"]["accuracy"] for p in results.phases},
                "eval_examples": results.phases[-1]["eval"]["examples"],
                "chance": float(np.bincount(eval_y).max() / len(eval_y)),
                "modes": modes,
                "saved_model": results.export["saved_model"],
            }
        )
    )


if __name__ == "__main__":
    main()
