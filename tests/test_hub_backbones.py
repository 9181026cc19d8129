"""KerasHub presets as backbones: local preset directories written by save_to_preset from small
randomly initialised backbones (ResNet: convolutions with BatchNorm; ViT: a class token), a handle
with no network. Skipped where the [hub] extra (keras-hub) is absent; CI installs it."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import changed, flag_error, make_config, run_cli, snapshot

from tlloop import phases as phase_lib
from tlloop.cli import experiment as cli_experiment
from tlloop.cli.config import ModelConfig
from tlloop.cli.model import build_model
from tlloop.config import Unfreeze
from tlloop.models.backbones import build_backbone

keras_hub = pytest.importorskip("keras_hub", reason="needs the [hub] extra: keras-hub")


def _pixels(size: int, batch: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (batch, size, size, 3)).astype("float32")


HANDLE = "kaggle://keras/resnetv1/keras/resnet_18_imagenet"


def test_a_preset_handle_without_network_is_one_line(tmp_path):
    workdir = tmp_path / "run"
    env = {"HOME": str(tmp_path), "KAGGLEHUB_CACHE": str(tmp_path / "kaggle")}
    env |= {name: "http://127.0.0.1:9" for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY")}
    result = run_cli(
        f"--workdir={workdir}",
        f"--backbone={HANDLE}",
        env=env,
        timeout=240,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(
        "tlloop: error: --backbone='kaggle://keras/resnetv1/keras/resnet_18_imagenet': could"
    )
    assert "local preset directory" in error
    assert not workdir.exists()


@pytest.fixture(scope="module")
def resnet_preset(tmp_path_factory) -> str:
    """A randomly initialised KerasHub ResNet (BatchNorm) with an ImageNet-style converter."""
    keras.utils.set_random_seed(4)
    directory = str(tmp_path_factory.mktemp("presets") / "resnet")
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 64],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        use_pre_activation=False,
        image_shape=(None, None, 3),
    )
    backbone.save_to_preset(directory)
    scale = [1 / (255 * s) for s in (0.229, 0.224, 0.225)]
    offset = [-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)]
    keras_hub.layers.ResNetImageConverter(
        image_size=(32, 32), scale=scale, offset=offset
    ).save_to_preset(directory)
    return directory


@pytest.fixture(scope="module")
def vit_preset(tmp_path_factory) -> str:
    """A randomly initialised KerasHub ViT (LayerNorm, class token) taking 32 px in [-1, 1]."""
    keras.utils.set_random_seed(5)
    directory = str(tmp_path_factory.mktemp("presets") / "vit")
    keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
    ).save_to_preset(directory)
    keras_hub.layers.ViTImageConverter(
        image_size=(32, 32), scale=1 / 127.5, offset=-1.0
    ).save_to_preset(directory)
    return directory


def _preprocessed_once(preset: str, backbone: keras.Model, size: int) -> None:
    hub = keras_hub.models.Backbone.from_preset(preset)
    converter = keras_hub.layers.ImageConverter.from_preset(preset)
    x = _pixels(size)
    ours = np.asarray(backbone(x))
    theirs = np.asarray(hub(converter(x)))
    if theirs.ndim == 3:
        theirs = theirs[:, 0]  # the class token
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    twice = np.asarray(hub(converter(converter(x))))
    assert not np.allclose(ours, twice if twice.ndim != 3 else twice[:, 0], atol=1e-3)


def test_resnet_preset_preprocesses_once_and_unfreezes_blocks(resnet_preset):
    model = build_model(ModelConfig(backbone=resnet_preset, image_size=40), 3)
    _preprocessed_once(resnet_preset, model.backbone, 40)
    assert model.backbone.get_layer("input_adapter").size == (32, 32)
    chosen = phase_lib.unfrozen_layers(Unfreeze("blocks", 1), model.backbone)
    assert {layer.name for layer in chosen} == {
        "stack1_block0_0_conv",
        "stack1_block0_1_conv",
        "stack1_block0_2_conv",
    }
    assert len(phase_lib.backbone_blocks(model.backbone)) == 2
    fresh = build_backbone(resnet_preset, "none", 32)  # --weights=none: the architecture only
    kernel = "stack1_block0_1_conv"
    assert not np.array_equal(
        fresh.get_layer("res_net_backbone").get_layer(kernel).kernel,
        model.backbone.get_layer("res_net_backbone").get_layer(kernel).kernel,
    )
    with flag_error(r"^--weights='imagenet': a KerasHub preset brings"):
        build_backbone(resnet_preset, "imagenet", 32)
    with flag_error(r"^--backbone_range='0:1': the preset"):
        build_backbone(resnet_preset, "", 32, value_range="0:1")


def test_vit_preset_pools_its_class_token_and_preprocesses_once(vit_preset):
    model = build_model(ModelConfig(backbone=vit_preset, image_size=24), 3)
    assert model.backbone.outputs[0].shape[1:] == (16,)
    _preprocessed_once(vit_preset, model.backbone, 24)


@pytest.mark.parametrize(
    ("preset", "unfreeze"), [("resnet_preset", "blocks:1"), ("vit_preset", "top:2")]
)
def test_preset_runs_end_to_end_and_its_export_loads(preset, unfreeze, request, tmp_path):
    directory = request.getfixturevalue(preset)
    workdir = str(tmp_path / "run")
    config = make_config(
        workdir, backbone=directory, unfreeze=unfreeze, layer_lr_decay=0.5, export="last"
    )
    experiment = cli_experiment.build_experiment(config)
    model = experiment.model
    before = snapshot(model.backbone)
    results = cli_experiment.train(experiment, workdir)
    assert results is not None
    moved = changed(before, snapshot(model.backbone))
    assert moved and not [p for p in moved if "moving" in p]
    with open(os.path.join(workdir, "results.json")) as file:
        phases = json.load(file)["phases"]
    assert phases[0]["feature_cache"].startswith("on")  # frozen: features computed once
    export = os.path.join(workdir, "export")
    loaded = keras.saving.load_model(os.path.join(export, "model.keras"))
    x = _pixels(32)
    np.testing.assert_allclose(loaded(x), model(x), rtol=0, atol=1e-5)
    served = tf.saved_model.load(os.path.join(export, "saved_model"))
    probabilities = served.signatures["serving_default"](images=tf.constant(x))["probabilities"]
    np.testing.assert_allclose(probabilities, tf.nn.softmax(model(x)), rtol=0, atol=1e-5)
