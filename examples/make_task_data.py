"""Writes the data of the task experiments (experiments/multilabel_digits.flags,
regression_digits.flags, text_reviews.flags), offline, from tlloop's embedded UCI digits.

    python examples/make_task_data.py [--out=runs/task_data]

- OUT/mosaics/: 16 x 16 PNG mosaics of a 2 x 2 grid, each cell one digit 5-9 or blank
  (the digits of train*.csv come from tlloop's training split of the digits, those of val*.csv
  from its evaluation split); train.csv / val.csv: path,labels (the digits present, ";"
  separated: multi-label); train_targets.csv / val_targets.csv: path,digit_sum,ink (the sum of
  the digits shown, and the mean pixel value: regression targets in two units).
- OUT/reviews/{negative,positive}/*.txt: short generated reviews whose classes differ by words.
- OUT/bert_tiny/: a 2-layer BERT with its preprocessor, randomly initialised (there is no
  network here to fetch a pretrained one), saved with save_to_preset.

Prints the baselines of each task on the evaluation files as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

WORDS = {
    "negative": ["bad", "awful", "boring", "dull", "weak", "poor"],
    "positive": ["good", "great", "fun", "superb", "lovely", "strong"],
}
FILLER = [
    "the",
    "a",
    "movie",
    "film",
    "plot",
    "actor",
    "scene",
    "and",
    "was",
    "is",
    "very",
    "quite",
    "it",
    "this",
    "story",
    "cast",
]


def mosaics(images, labels, count: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`count` 16 x 16 mosaics of 2 x 2 cells, each one of `images` (digits 5-9) with
    probability 0.7, else blank; the multi-hot rows of the digits 5-9 shown, and the digit
    of each cell (-1: blank)."""
    pixels = np.zeros((count, 16, 16, 3), np.uint8)
    present = np.zeros((count, 5), np.float32)
    shown = np.full((count, 4), -1)
    for i in range(count):
        for cell in range(4):
            if rng.uniform() < 0.7:
                k = rng.integers(len(images))
                row, column = divmod(cell, 2)
                pixels[i, 8 * row : 8 * row + 8, 8 * column : 8 * column + 8] = images[k]
                present[i, labels[k] - 5] = 1.0
                shown[i, cell] = labels[k]
    return pixels, present, shown


def write_mosaics(out: str, seed: int) -> dict:
    import tensorflow as tf

    from tlloop.cli.config import DataConfig, parse_classes
    from tlloop.cli.data import load_source

    source = load_source(DataConfig(classes=parse_classes("5-9")))
    rng = np.random.default_rng(seed)
    folder = os.path.join(out, "mosaics")
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    baselines = {}
    for name, split, count in (("train", source.train, 800), ("val", source.eval, 400)):
        digits = np.asarray(source.class_names, int)[split.labels]
        pixels, present, shown = mosaics(split.images, digits, count, rng)
        paths = []
        for i, image in enumerate(pixels):
            path = f"images/{name}_{i:04d}.png"
            tf.io.write_file(os.path.join(folder, path), tf.io.encode_png(image))
            paths.append(path)
        digit_sum = np.where(shown >= 0, shown, 0).sum(1)
        ink = pixels.astype(np.float64).mean(axis=(1, 2, 3))
        label_rows = [";".join(str(d + 5) for d in np.flatnonzero(row)) for row in present]
        _write(folder, f"{name}.csv", ["path,labels"], zip(paths, label_rows, strict=True))
        rows = [(p, f"{s:d}", f"{k:.4f}") for p, s, k in zip(paths, digit_sum, ink, strict=True)]
        _write(folder, f"{name}_targets.csv", ["path,digit_sum,ink"], rows)
        if name == "train":
            train_targets = np.stack([digit_sum, ink], 1)
        else:
            targets = np.stack([digit_sum, ink], 1)
            error = targets - train_targets.mean(0)
            positives = float(present.mean())
            baselines = {
                "multilabel_all_positive_micro_f1": round(2 * positives / (1 + positives), 4),
                "multilabel_all_negative_micro_f1": 0.0,
                "regression_constant_rmse": round(float(np.sqrt(np.mean(error**2))), 4),
                "regression_constant_rmse_per_target": np.sqrt((error**2).mean(0))
                .round(4)
                .tolist(),
            }
    return baselines


def write_reviews(out: str, seed: int, per_class: int = 200) -> None:
    rng = np.random.default_rng(seed)
    for name, own in WORDS.items():
        folder = os.path.join(out, "reviews", name)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            words = [*rng.choice(FILLER, rng.integers(5, 10)), *rng.choice(own, 2)]
            rng.shuffle(words)
            with open(os.path.join(folder, f"{i:04d}.txt"), "w", encoding="utf-8") as file:
                file.write(" ".join(words) + "\n")


def write_bert(out: str, seed: int) -> None:
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocabulary += sorted({*FILLER, *WORDS["negative"], *WORDS["positive"]})
    folder = os.path.join(out, "bert_tiny")
    os.makedirs(folder, exist_ok=True)
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)
    keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=16).save_to_preset(
        folder
    )
    keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary),
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=16,
        dropout=0.1,
    ).save_to_preset(folder)


def _write(folder: str, name: str, header: list[str], rows) -> None:
    lines = header + [",".join(row) for row in rows]
    with open(os.path.join(folder, name), "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/task_data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    baselines = write_mosaics(args.out, args.seed)
    write_reviews(args.out, args.seed)
    write_bert(args.out, args.seed)
    print(json.dumps({**baselines, "text_chance_accuracy": 0.5}))


if __name__ == "__main__":
    main()
