"""Sources and pipelines: digits splits, class selection, few-shot limits, image folders."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tlloop.config import ConfigError, DataConfig, parse_classes
from tlloop.data import load_data
from tlloop.data.sources import load_source


def test_digits_split_is_stratified_and_independent_of_the_seed():
    a = load_source(DataConfig(seed=0))
    b = load_source(DataConfig(seed=7))
    assert len(a.train) + len(a.eval) == 1797
    assert np.array_equal(a.eval.labels, b.eval.labels)
    assert np.array_equal(a.eval.images, b.eval.images)
    share = np.bincount(a.eval.labels) / (np.bincount(a.eval.labels) + np.bincount(a.train.labels))
    assert np.all(np.abs(share - 0.3) < 0.01)
    assert a.train.images.dtype == np.uint8 and a.train.images.max() == 255


def test_classes_are_relabelled_in_the_order_given_and_limited_per_class():
    source = load_source(DataConfig(classes=parse_classes("7,5"), train_examples_per_class=4))
    assert source.class_names == ("7", "5")
    assert np.bincount(source.train.labels).tolist() == [4, 4]
    full = load_source(DataConfig())
    sevens = full.eval.images[full.eval.labels == 7]
    assert np.array_equal(source.eval.images[source.eval.labels == 0], sevens)


def test_training_batches_are_full_and_repeat_past_the_epoch():
    data = load_data(
        DataConfig(
            classes=parse_classes("0-2"), train_examples_per_class=5, batch_size=4, image_size=16
        )
    )
    assert data.steps_per_epoch == 4  # ceil(15 / 4)
    shapes = {tuple(x.shape) for x, _ in data.train.take(6)}
    assert shapes == {(4, 16, 16, 3)}


def _write_folder(root, counts: dict[str, int], size: int = 12) -> None:
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size + i, 3), dtype=np.uint8)
            (folder / f"{i}.png").write_bytes(tf.io.encode_png(pixels).numpy())
        (folder / "notes.txt").write_text("not an image")


def test_image_folder_with_a_validation_split(tmp_path):
    _write_folder(tmp_path, {"cat": 10, "dog": 10, "eel": 10})
    data = load_data(
        DataConfig(
            dataset="folder", data_dir=str(tmp_path), image_size=8, batch_size=4, val_split=0.2
        )
    )
    assert data.class_names == ("cat", "dog", "eel")
    assert (data.train_size, data.eval_size) == (24, 6)
    batches = list(data.eval)
    assert sum(float(tf.reduce_sum(weights)) for _, _, weights in batches) == 6
    assert {tuple(images.shape) for images, _, _ in batches} == {(4, 8, 8, 3)}
    kept = [int(y) for _, labels, w in batches for y, v in zip(labels, w, strict=True) if v]
    assert sorted(kept) == [0, 0, 1, 1, 2, 2]


def test_image_folder_with_a_val_dir_of_other_classes_is_refused(tmp_path):
    _write_folder(tmp_path / "train", {"cat": 2, "dog": 2})
    _write_folder(tmp_path / "val", {"cat": 2, "emu": 2})
    with pytest.raises(ConfigError, match=r"^--val_dir=.*differ"):
        load_source(
            DataConfig(
                dataset="folder", data_dir=str(tmp_path / "train"), val_dir=str(tmp_path / "val")
            )
        )


def test_image_folder_errors_name_the_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"^--data_dir=.*not a folder"):
        load_source(DataConfig(dataset="folder", data_dir=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^--data_dir=.*no class sub-folders"):
        load_source(DataConfig(dataset="folder", data_dir=str(tmp_path / "empty")))
    _write_folder(tmp_path / "one_empty", {"cat": 2})
    (tmp_path / "one_empty" / "dog").mkdir()
    with pytest.raises(ConfigError, match=r"^--data_dir=.*'dog' holds no images"):
        load_source(DataConfig(dataset="folder", data_dir=str(tmp_path / "one_empty")))
