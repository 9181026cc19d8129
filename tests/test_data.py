"""Sources and pipelines: digits splits, class selection, few-shot limits, image folders."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import flag_error

from tlloop.cli.config import DataConfig, parse_classes
from tlloop.cli.data import load_data, load_source
from tlloop.cli.flags import flag_line
from tlloop.data.readers.folders import folder_source, image_folder
from tlloop.data.storage import skipped_unreadable, store_images
from tlloop.errors import ConfigError


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
    with flag_error(r"^--val_dir=.*differ"):
        load_source(
            DataConfig(
                dataset="folder", data_dir=str(tmp_path / "train"), val_dir=str(tmp_path / "val")
            )
        )


def test_image_folder_errors_name_the_flag(tmp_path):
    with flag_error(r"^--data_dir=.*not a folder"):
        load_source(DataConfig(dataset="folder", data_dir=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with flag_error(r"^--data_dir=.*no class sub-folders"):
        load_source(DataConfig(dataset="folder", data_dir=str(tmp_path / "empty")))
    _write_folder(tmp_path / "one_empty", {"cat": 2})
    (tmp_path / "one_empty" / "dog").mkdir()
    with flag_error(r"^--data_dir=.*'dog' holds no images"):
        load_source(DataConfig(dataset="folder", data_dir=str(tmp_path / "one_empty")))


def test_the_readers_take_explicit_arguments_and_speak_the_library_words(tmp_path):
    # The README's example: no DataConfig, errors and storage name the library's arguments.
    _write_folder(tmp_path / "images", {"cat": 4, "dog": 4})
    source = folder_source(
        image_folder, str(tmp_path / "images"), val_split=0.25, train_examples_per_class=2
    )
    data = store_images(source, image_size=8, memory_budget=0, batch_size=2, eval_batch_size=2)
    assert data.class_names == ("cat", "dog") and (data.train_size, data.eval_size) == (4, 2)
    assert data.storage["train"].startswith("streamed (")
    assert "left of memory_budget" in data.storage["train"]
    missing = str(tmp_path / "missing")
    with pytest.raises(ConfigError) as error:
        folder_source(image_folder, missing, val_split=0.3)
    assert str(error.value).startswith(f"data_dir={missing!r}: not a folder; accepted: a folder")
    assert flag_line(error.value).startswith(f"--data_dir={missing!r}: not a folder")


def _folder_config(root, **kw) -> DataConfig:
    return DataConfig(dataset="folder", data_dir=str(root), image_size=8, batch_size=4, **kw)


def test_unreadable_images_fail_naming_the_file_or_are_skipped_and_counted(tmp_path):
    _write_folder(tmp_path / "images", {"cat": 5, "dog": 5, "eel": 5})
    (tmp_path / "images" / "dog" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (tmp_path / "images" / "eel" / "9.jpg").write_bytes(b"")
    with flag_error(
        r"^image file '.*/dog/9.png': cannot be read or decoded \(.+\); accepted: JPG, "
        r"JPEG, PNG, BMP, GIF, WEBP images, or --bad_images=skip to leave them out \(1 more ",
    ):
        load_data(_folder_config(tmp_path / "images"))
    data = load_data(_folder_config(tmp_path / "images", bad_images="skip"))
    assert sorted(skipped_unreadable(data.skipped_files)) == sorted(
        str(tmp_path / "images" / name) for name in ("dog/9.png", "eel/9.jpg")
    )
    assert data.skipped_files[str(tmp_path / "images" / "eel" / "9.jpg")] == (
        "unreadable: an empty file"
    )
    assert data.train_size + data.eval_size == 15
    # Every kept example is a decoded image of the right shape and label.
    batches = list(data.eval)
    assert {tuple(images.shape) for images, _, _ in batches} == {(4, 8, 8, 3)}


def test_skipping_the_only_image_of_a_class_is_refused(tmp_path):
    _write_folder(tmp_path / "images", {"cat": 4, "dog": 4})
    (tmp_path / "images" / "emu").mkdir()
    (tmp_path / "images" / "emu" / "0.png").write_bytes(b"garbage")
    (tmp_path / "images" / "emu" / "1.png").write_bytes(b"garbage")
    with flag_error(r"^class 'emu': no readable images left"):
        load_data(_folder_config(tmp_path / "images", bad_images="skip"))


def test_gif_and_bmp_files_decode(tmp_path):
    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        pixels = np.full((6, 6, 3), 200 if name == "a" else 50, np.uint8)
        (root / name / "0.bmp").write_bytes(_bmp(pixels))
        (root / name / "1.gif").write_bytes(_gif(pixels[..., 0]))
    data = load_data(_folder_config(root, val_split=0.5))
    means = {int(y): float(tf.reduce_mean(x)) for x, y, w in data.eval.unbatch() if w}
    assert abs(means[0] - 200) < 1 and abs(means[1] - 50) < 1


def _bmp(pixels: np.ndarray) -> bytes:
    """An uncompressed 24-bit BMP: rows bottom-up, BGR, each padded to 4 bytes."""
    height, width, _ = pixels.shape
    row = width * 3 + (-width * 3) % 4
    body = b"".join(
        pixels[y, :, ::-1].tobytes() + bytes(row - width * 3) for y in range(height - 1, -1, -1)
    )
    le = int.to_bytes
    header = b"BM" + le(54 + len(body), 4, "little") + bytes(4) + le(54, 4, "little")
    info = (
        le(40, 4, "little")
        + le(width, 4, "little")
        + le(height, 4, "little")
        + le(1, 2, "little")
        + le(24, 2, "little")
        + bytes(24)
    )
    return header + info + body


def _gif(grey: np.ndarray) -> bytes:
    """A one-frame GIF of a constant grey image (a minimal encoder: TensorFlow has none)."""
    height, width = grey.shape
    value = int(grey[0, 0])
    header = b"GIF89a" + width.to_bytes(2, "little") + height.to_bytes(2, "little")
    palette = bytes([0x80, 0, 0]) + bytes([0, 0, 0, value, value, value])  # 2 colours
    image = b"," + bytes(4) + width.to_bytes(2, "little") + height.to_bytes(2, "little") + b"\0"
    # LZW, minimum code size 2: clear (4), then colour 1 per pixel, then end (5); 3-bit codes
    # while the table grows, so use clear codes often enough to stay at 3 bits.
    codes = []
    for i in range(height * width):
        if i % 2 == 0:
            codes.append(4)
        codes.append(1)
    codes.append(5)
    bits = "".join(format(code, "03b")[::-1] for code in codes)
    bits += "0" * (-len(bits) % 8)
    data = bytes(int(bits[i : i + 8][::-1], 2) for i in range(0, len(bits), 8))
    blocks = b"".join(
        bytes([len(data[i : i + 255])]) + data[i : i + 255] for i in range(0, len(data), 255)
    )
    return header + palette + image + b"\x02" + blocks + b"\0;"


def _stripes() -> np.ndarray:
    """10 x 20: a red left quarter, a green middle half, a blue right quarter."""
    image = np.zeros((10, 20, 3), np.uint8)
    image[:, :5, 0] = image[:, 5:15, 1] = image[:, 15:, 2] = 255
    return image


def test_resize_modes_squash_crop_and_pad():
    from tlloop.data.images import resize_images

    image = _stripes()
    squash = resize_images(image, 8, "squash").numpy()
    assert squash[:, 0, 0].min() > 200 and squash[:, -1, 2].min() > 200  # all three stripes
    crop = resize_images(image, 8, "crop").numpy()
    np.testing.assert_allclose(crop[..., 1], 255, atol=1)  # only the green centre is left
    np.testing.assert_allclose(crop[..., [0, 2]], 0, atol=1)
    pad = resize_images(image, 8, "pad").numpy()
    assert np.all(pad[:2] == 0) and np.all(pad[-2:] == 0)  # 8 x 4 of content, black above/below
    assert pad[2:6, 0, 0].min() > 200 and pad[2:6, -1, 2].min() > 200
    # A batch resizes as its images do.
    both = resize_images(np.stack([image, image]), 8, "crop").numpy()
    np.testing.assert_array_equal(both[1], crop)


def test_folder_images_are_resized_with_the_chosen_mode(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(2):
            (tmp_path / name / f"{i}.png").write_bytes(tf.io.encode_png(_stripes()).numpy())
    data = load_data(
        DataConfig(dataset="folder", data_dir=str(tmp_path), image_size=8, resize="crop")
    )
    images = np.concatenate([x.numpy()[w.numpy() > 0] for x, _, w in data.eval])
    assert len(images) == 2  # one per class held out
    np.testing.assert_allclose(images[..., 1], 255, atol=1)


def _example(image_bytes: bytes, label: int, image_key: str = "image/encoded") -> bytes:
    feature = {
        image_key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _write_records(path, labels: list[int], corrupt_at: int = -1, image_key="image/encoded"):
    rng = np.random.default_rng(len(labels))
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i, label in enumerate(labels):
            pixels = np.full((6, 9, 3), 40 * label, np.uint8)
            pixels[0, 0] = rng.integers(0, 256, 3)
            data = b"not an image" if i == corrupt_at else tf.io.encode_png(pixels).numpy()
            writer.write(_example(data, label, image_key))


def test_tfrecord_files_of_examples(tmp_path):
    _write_records(tmp_path / "train-0.tfrecord", [0, 1, 2] * 4)
    _write_records(tmp_path / "train-1.tfrecord", [2, 1, 0] * 4)
    _write_records(tmp_path / "val.tfrecord", [0, 1, 2, 2])
    config = DataConfig(
        dataset="tfrecord",
        train_files=str(tmp_path / "train-*.tfrecord"),
        val_files=str(tmp_path / "val.tfrecord"),
        image_size=8,
        batch_size=4,
    )
    data = load_data(config)
    assert data.class_names == ("0", "1", "2")
    assert (data.train_size, data.eval_size) == (24, 4)
    assert data.class_counts == (8, 8, 8)
    rows = [(float(tf.reduce_mean(x[1:, 1:])), int(y)) for x, y, w in data.eval.unbatch() if w]
    assert [label for _, label in rows] == [0, 1, 2, 2]
    assert all(abs(mean - 40 * label) < 1 for mean, label in rows)
    # Without --val_files, --val_split holds out part of --train_files.
    split = load_data(DataConfig(dataset="tfrecord", train_files=config.train_files, image_size=8))
    assert split.train_size + split.eval_size == 24


def test_tfrecord_errors_name_the_flag(tmp_path):
    def config(**kw):
        return DataConfig(dataset="tfrecord", image_size=8, **kw)

    with flag_error(r"^--train_files=.*matches no file"):
        load_data(config(train_files=str(tmp_path / "none-*.tfrecord")))
    _write_records(tmp_path / "keys.tfrecord", [0, 1], image_key="jpeg")
    with flag_error(r"--image_feature='image/encoded'.*hold \['image/cla"):
        load_data(config(train_files=str(tmp_path / "keys.tfrecord")))
    (tmp_path / "junk.tfrecord").write_bytes(b"\x00" * 40)
    with flag_error(r"junk.tfrecord' is not a readable TFRecord file"):
        load_data(config(train_files=str(tmp_path / "junk.tfrecord")))
    _write_records(tmp_path / "bad.tfrecord", [0, 1] * 5, corrupt_at=3)
    with flag_error(r"^image 'record 3 of .*bad.tfrecord': cannot be decod"):
        load_data(config(train_files=str(tmp_path / "bad.tfrecord")))
    skipped = load_data(config(train_files=str(tmp_path / "bad.tfrecord"), bad_images="skip"))
    assert list(skipped.skipped_files) == [f"record 3 of {tmp_path / 'bad.tfrecord'}"]


def test_tfds_without_the_package_is_a_clear_error(monkeypatch):
    # Whether or not the extra is installed here: a None entry in sys.modules is how Python
    # itself marks a module that cannot be imported.
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with flag_error(r"^--dataset=tfds:mnist: tensorflow-datasets is"):
        load_data(DataConfig(dataset="tfds:mnist"))


def test_tfds_dataset_from_a_local_data_dir(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")  # the optional [tfds] extra
    tfds.testing.DummyMnist(data_dir=str(tmp_path)).download_and_prepare()  # made locally
    data = load_data(DataConfig(dataset="tfds:dummy_mnist", tfds_dir=str(tmp_path), image_size=8))
    assert data.class_names == tuple(str(i) for i in range(10))
    assert (data.train_size, data.eval_size) == (20, 20)  # its train and test splits
    with flag_error(r"^--dataset=tfds:dummy_mnist: not available"):
        load_data(DataConfig(dataset="tfds:dummy_mnist", tfds_dir=str(tmp_path / "x")))
