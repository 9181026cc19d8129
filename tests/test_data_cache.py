"""The decoded-image cache (--data_cache): checked against its checksums when opened, and
rebuilt as its error advises."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tlloop.cli.config import DataConfig
from tlloop.cli.data import load_data
from tlloop.cli.flags import flag_line
from tlloop.config import ConfigError


@pytest.fixture
def cached(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("ant", "bee"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            (tmp_path / "images" / name / f"{i}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    config = DataConfig(
        dataset="folder",
        data_dir=str(tmp_path / "images"),
        data_cache=str(tmp_path / "cache"),
        data_memory="0",
        image_size=8,
        batch_size=4,
    )
    first = load_data(config)
    assert "--data_cache written" in first.storage["train"]
    return config, first, sorted((tmp_path / "cache").glob("*.pixels"))


def _pixels(data) -> np.ndarray:
    return np.concatenate(
        [x.numpy() for x, _ in data.train_examples.training_batches(4, 0).take(3)]
    )


def test_corrupted_cache_bytes_are_refused_naming_the_file_and_the_rebuild(cached):
    config, first, pixel_files = cached
    damaged = pixel_files[0]  # one byte flipped: the same size, other pixels
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x40
    damaged.write_bytes(bytes(data))
    with pytest.raises(ConfigError) as error:
        load_data(config)
    line = flag_line(error.value)
    assert line.startswith(f"--data_cache: '{damaged}' is damaged (bytes 0 to ")
    assert f"delete '{damaged}' and the next run rebuilds it" in line and "\n" not in line
    damaged.unlink()  # the advice, as written
    again = load_data(config)
    assert "--data_cache written" in (again.storage["train"] + again.storage["eval"])
    np.testing.assert_array_equal(_pixels(again), _pixels(first))


def test_a_cache_whose_pixels_file_was_deleted_is_rebuilt(cached):
    config, first, pixel_files = cached
    pixel_files[0].unlink()  # as the size error advises: "delete the file to rebuild it"
    again = load_data(config)
    np.testing.assert_array_equal(_pixels(again), _pixels(first))
    assert all(path.exists() for path in pixel_files)
