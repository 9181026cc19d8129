"""Generated data sets for the task tests: images in a folder with a CSV beside them, and a
folder of text files whose classes differ by words."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

COLOURS = ("red", "green", "blue")


def write_image_csvs(root, count: int = 48, seed: int = 0, size: int = 16) -> dict:
    """PNG images under root/images; root/train.csv and root/val.csv (2:1) with columns
    path,labels (the colour channels brightened, ";"-separated, possibly none) and
    root/train_targets.csv / val_targets.csv with path,brightness,red_share (regression
    targets, known functions of the image). Returns the paths and the arrays."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    labels = (rng.uniform(size=(count, 3)) < 0.4).astype(np.float32)
    images = rng.uniform(0, 110, (count, size, size, 3)) + 110.0 * labels[:, None, None, :]
    images = np.round(images).astype(np.uint8)
    paths = []
    for i, image in enumerate(images):
        path = os.path.join("images", f"{i:03d}.png")
        tf.io.write_file(os.path.join(root, path), tf.io.encode_png(image))
        paths.append(path)
    mean = images.astype(np.float64).mean(axis=(1, 2))  # (count, 3)
    targets = np.stack([mean.sum(1), 100.0 * mean[:, 0] / mean.sum(1)], axis=1)
    cut = count * 2 // 3
    files = {}
    for name, rows in (("train", slice(0, cut)), ("val", slice(cut, count))):
        lines = ["path,labels"] + [
            f"{paths[i]},{';'.join(c for c, on in zip(COLOURS, labels[i], strict=True) if on)}"
            for i in range(count)[rows]
        ]
        files[f"{name}_csv"] = _write(root, f"{name}.csv", lines)
        lines = ["path,brightness,red_share"] + [
            f"{paths[i]},{targets[i, 0]:.4f},{targets[i, 1]:.4f}" for i in range(count)[rows]
        ]
        files[f"{name}_targets"] = _write(root, f"{name}_targets.csv", lines)
    return {**files, "labels": labels, "targets": targets, "cut": cut, "images": images}


def write_text_folder(root, per_class: int = 24, seed: int = 0) -> str:
    """root/texts/{negative,positive}/*.txt: filler words with class words planted."""
    rng = np.random.default_rng(seed)
    words = {"negative": ["bad", "awful", "boring"], "positive": ["good", "great", "fun"]}
    filler = ["the", "a", "movie", "plot", "actor", "scene", "and", "was"]
    for name, own in words.items():
        folder = os.path.join(root, "texts", name)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            tokens = list(rng.choice(filler, 6)) + list(rng.choice(own, 2))
            rng.shuffle(tokens)
            _write(folder, f"{i:03d}.txt", [" ".join(tokens)])
    return os.path.join(root, "texts")


def write_bert_preset(directory: str, words, dropout: float = 0.0) -> str:
    """A one-layer BERT over `words` (and BERT's special tokens) with its preprocessor
    (sequences of 12 tokens), saved as a local KerasHub preset in `directory`."""
    import keras_hub

    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)
    keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=12).save_to_preset(
        directory
    )
    keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary),
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=12,
        dropout=dropout,
    ).save_to_preset(directory)
    return directory


def _write(folder, name: str, lines: list[str]) -> str:
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")
    return path
