"""The export: .keras files, the SavedModel's serving signatures, and the predictor on them."""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import PRETRAINED, flag_error

from tlloop.cli.config import ModelConfig
from tlloop.cli.model import build_model
from tlloop.config import parse_augment
from tlloop.export import SIGNATURES, export_model
from tlloop.serving import Predictor

CLASSES = ("cat", "dog", "owl")


def _pixels(size: int, batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A model with augmentation, a pretrained BatchNorm backbone and Dropout, exported once."""
    keras.utils.set_random_seed(3)
    config = ModelConfig(
        backbone=PRETRAINED, image_size=32, dropout=0.5, augment=parse_augment("flip,zoom:0.3")
    )
    model = build_model(config, len(CLASSES))
    directory = str(tmp_path_factory.mktemp("export"))
    return model, export_model(model, directory, CLASSES)


def test_exported_keras_files_load_back(exported):
    model, paths = exported
    assert oct(os.stat(paths["model"]).st_mode & 0o777) != oct(0o600)
    x = _pixels(32, 2)
    loaded = keras.saving.load_model(paths["model"])
    assert np.array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    backbone = keras.saving.load_model(paths["backbone"])
    assert np.array_equal(np.asarray(backbone(x)), np.asarray(model.backbone(x)))


def test_saved_model_serves_the_model_in_inference_mode(exported):
    model, paths = exported
    loaded = tf.saved_model.load(paths["saved_model"])
    assert set(SIGNATURES) <= set(loaded.signatures)
    x = _pixels(32, 5)
    expected = tf.nn.softmax(model(x, training=False)).numpy()
    # Training mode (augmentation, Dropout at 0.5) gives other numbers: the test can tell.
    assert not np.allclose(tf.nn.softmax(model(x, training=True)).numpy(), expected, atol=1e-3)
    served = loaded.signatures["serving_default"](images=tf.constant(x))
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, rtol=0, atol=1e-5)
    assert served["class_id"].numpy().tolist() == expected.argmax(-1).tolist()
    names = [CLASSES[i] for i in expected.argmax(-1)]
    assert [n.decode() for n in served["class_name"].numpy()] == names
    # The same pixels as uint8, and any batch size: the same answers.
    as_uint8 = loaded.signatures["serving_uint8"](images=tf.constant(x.astype(np.uint8)))
    np.testing.assert_allclose(as_uint8["probabilities"].numpy(), expected, rtol=0, atol=1e-5)
    one = loaded.signatures["serving_default"](images=tf.constant(x[:1]))
    np.testing.assert_allclose(one["probabilities"].numpy(), expected[:1], rtol=0, atol=1e-5)
    names = loaded.signatures["class_names"]()["class_names"].numpy()
    assert tuple(n.decode() for n in names) == CLASSES


def test_saved_model_resizes_other_image_sizes_as_training_does(exported):
    model, paths = exported
    loaded = tf.saved_model.load(paths["saved_model"])
    x = _pixels(48, 2, seed=1)[:, :, :40]  # 48 x 40
    expected = tf.nn.softmax(model(tf.image.resize(x, (32, 32)), training=False)).numpy()
    served = loaded.signatures["serving_default"](images=tf.constant(x))["probabilities"]
    np.testing.assert_allclose(served.numpy(), expected, rtol=0, atol=1e-5)


def test_saved_model_cli_lists_the_serving_signature(exported):
    _, paths = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    command = [cli] if os.path.exists(cli) else ["saved_model_cli"]
    shown = subprocess.run(
        [
            *command,
            "show",
            "--dir",
            paths["saved_model"],
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    out = shown.stdout
    assert "inputs['images']" in out and "DT_FLOAT" in out and "(-1, -1, -1, 3)" in out
    assert "outputs['probabilities']" in out and "(-1, 3)" in out
    assert "tensorflow/serving/predict" in out


def test_predictor_ranks_classes_of_image_files(exported, tmp_path):
    model, paths = exported
    image = _pixels(32, 1, seed=2)[0].astype(np.uint8)
    path = str(tmp_path / "x.png")
    tf.io.write_file(path, tf.io.encode_png(image))
    predictor = Predictor(paths["saved_model"])
    ranked = predictor.top_k(path, 3)
    expected = tf.nn.softmax(model(image[None].astype(np.float32), training=False)).numpy()[0]
    assert [name for name, _ in ranked] == [CLASSES[i] for i in np.argsort(-expected)]
    np.testing.assert_allclose([p for _, p in ranked], np.sort(expected)[::-1], atol=1e-5)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with flag_error(r"^image file '.*bad.jpg': cannot be read or decoded"):
        predictor.top_k(str(bad), 1)


def test_saved_model_resizes_as_the_run_did(tmp_path):
    from tlloop.data.images import resize_images

    model = build_model(ModelConfig(image_size=16, dropout=0.0), 2)
    paths = export_model(model, str(tmp_path / "export"), ("a", "b"), resize="pad")
    serve = tf.saved_model.load(paths["saved_model"]).signatures["serving_uint8"]
    x = np.random.default_rng(5).integers(0, 256, (3, 20, 36, 3)).astype(np.uint8)
    expected = tf.nn.softmax(model(resize_images(x, 16, "pad"), training=False)).numpy()
    squashed = tf.nn.softmax(model(resize_images(x, 16, "squash"), training=False)).numpy()
    assert not np.allclose(expected, squashed, atol=1e-4)
    served = serve(images=tf.constant(x))["probabilities"].numpy()
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5)
