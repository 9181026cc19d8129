"""Backbones by name, by file and built in; weights files; safe loading; layer selection."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import PRETRAINED, flag_error, run_cli

from tlloop import phases as phase_lib
from tlloop.cli.config import ModelConfig
from tlloop.cli.model import build_model
from tlloop.config import PhaseConfig, Unfreeze
from tlloop.models import ModeTable
from tlloop.models.backbones import build_backbone


def _pixels(size: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype("float32")


def test_application_backbone_applies_its_own_preprocessing():
    backbone = build_backbone("MobileNetV2", "none", 32)
    preprocess = backbone.get_layer("preprocess")
    # MobileNetV2 expects pixels scaled to [-1, 1].
    edges = np.array([[[[0.0, 127.5, 255.0]]]], "float32")
    assert np.allclose(np.asarray(preprocess(edges)), [[[[-1.0, 0.0, 1.0]]]])
    x = _pixels(32)
    base = backbone.layers[-1]
    expected = base(keras.applications.mobilenet_v2.preprocess_input(x.copy()), training=False)
    assert np.allclose(np.asarray(backbone(x, training=False)), np.asarray(expected), atol=1e-5)


def test_application_backbone_loads_a_weights_file(tmp_path):
    keras.utils.set_random_seed(3)
    source = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    )
    path = str(tmp_path / "mobilenet.weights.h5")
    source.save_weights(path)
    loaded = build_backbone("MobileNetV2", path, 32).layers[-1]
    for a, b in zip(source.weights, loaded.weights, strict=True):
        assert np.array_equal(a.numpy(), b.numpy())


@pytest.mark.filterwarnings("ignore:Skipping nested container")  # Keras on the mismatch
def test_a_weights_file_of_another_network_is_refused(tmp_path):
    path = str(tmp_path / "other.weights.h5")
    keras.applications.MobileNet(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    ).save_weights(path)
    with flag_error(r"--weights='.*other.weights.h5': does not fit"):
        build_backbone("MobileNetV2", path, 32)


def test_imagenet_weights_without_network_is_one_clear_error(tmp_path):
    # No mock: an unreachable proxy makes the real download fail at once, as offline does.
    workdir = tmp_path / "run"
    env = {"HOME": str(tmp_path), "KERAS_HOME": str(tmp_path / "keras")}
    env |= {name: "http://127.0.0.1:9" for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY")}
    result = run_cli(
        f"--workdir={workdir}",
        "--backbone=MobileNetV2",
        "--weights=imagenet",
        "--image_size=32",
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("tlloop: error: --weights=imagenet: could not fetch MobileNetV2")
    assert "accepted" in error
    assert not workdir.exists()


def test_keras_file_backbone_loads_in_safe_mode_only_without_code(tmp_path):
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Lambda(lambda t: t / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3)(x)
    path = str(tmp_path / "lambda.keras")
    keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x)).save(path)
    with flag_error("--unsafe_deserialization"):
        build_backbone(path, "", 16)
    backbone = build_backbone(path, "", 16, safe_mode=False)
    assert backbone.name == "backbone" and tuple(backbone.outputs[0].shape) == (None, 4)


def test_vector_backbone_gets_a_head_without_pooling(tmp_path):
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(inputs))
    path = str(tmp_path / "vector.keras")
    keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x)).save(path)
    model = build_model(ModelConfig(backbone=path, image_size=16), 3)
    assert [layer.name for layer in model.head.layers] == ["features", "dropout", "logits"]
    assert model(_pixels(16)).shape == (2, 3)


def test_top_n_on_mobilenet_selects_the_last_weighted_layers():
    model = build_model(ModelConfig(backbone="MobileNetV2", weights="none", image_size=32), 4)
    phase = phase_lib.PlannedPhase(
        0, PhaseConfig("finetune", 1, 1e-4, Unfreeze("top", 2)), ModeTable()
    )
    phase_lib.apply_trainability(model, phase)
    trainable = [
        layer.name for layer in phase_lib.leaf_layers(model.backbone) if layer.trainable_weights
    ]
    assert trainable == ["block_16_project", "Conv_1"]
    head = [v.path for v in model.head.trainable_weights]
    assert {v.path for v in model.trainable_variables} == {
        *head,
        *(v.path for v in model.backbone.trainable_weights),
    }


# Each family: its last block's layers with weights (BatchNorm aside), as blocks:1 chooses
# them, and the name of the second-to-last block's first such layer (blocks:2 starts there).
FAMILIES = {
    "MobileNetV2": (
        ["block_16_expand", "block_16_depthwise", "block_16_project", "Conv_1"],
        "block_15_expand",
    ),
    "EfficientNetB0": (
        [
            "block7a_expand_conv",
            "block7a_dwconv",
            "block7a_se_reduce",
            "block7a_se_expand",
            "block7a_project_conv",
            "top_conv",
        ],
        "block6d_expand_conv",
    ),
    "ResNet50": (
        ["conv5_block3_1_conv", "conv5_block3_2_conv", "conv5_block3_3_conv"],
        "conv5_block2_1_conv",
    ),
    "MobileNetV3Small": (
        [
            "expanded_conv_10_expand",
            "expanded_conv_10_depthwise",
            "expanded_conv_10_squeeze_excite_conv",
            "expanded_conv_10_squeeze_excite_conv_1",
            "expanded_conv_10_project",
            "conv_1",
        ],
        "expanded_conv_9_expand",
    ),
    "VGG16": (["block5_conv1", "block5_conv2", "block5_conv3"], "block4_conv1"),
    "DenseNet121": (["conv5_block16_1_conv", "conv5_block16_2_conv"], "conv5_block15_1_conv"),
    "Xception": (["block14_sepconv1", "block14_sepconv2"], "block13_sepconv1"),
    "ConvNeXtTiny": (
        [
            *(
                f"convnext_tiny_stage_3_block_2_{part}"
                for part in (
                    "depthwise_conv",
                    "layernorm",
                    "pointwise_conv_1",
                    "pointwise_conv_2",
                    "layer_scale",
                )
            ),
            "layer_normalization",
        ],
        "convnext_tiny_stage_3_block_1_depthwise_conv",
    ),
    "EfficientNetV2B0": (
        [
            "block6h_expand_conv",
            "block6h_dwconv2",
            "block6h_se_reduce",
            "block6h_se_expand",
            "block6h_project_conv",
            "top_conv",
        ],
        "block6g_expand_conv",
    ),
}
SIZES = {"Xception": 75}  # its smallest input; 32 px for the others


@pytest.mark.parametrize("name", list(FAMILIES))
def test_application_families_preprocess_and_select_top_and_blocks(name):
    size = SIZES.get(name, 32)
    backbone = build_backbone(name, "none", size)
    assert backbone.get_layer("preprocess").application == name
    assert len(backbone(_pixels(size, 1), training=False).shape) == 4
    last_block, second_block_start = FAMILIES[name]

    def chosen(spec: str) -> list[str]:
        return [layer.name for layer in phase_lib.unfrozen_layers(Unfreeze.parse(spec), backbone)]

    assert chosen("blocks:1") == last_block
    two = chosen("blocks:2")
    assert two[0] == second_block_start and two[-len(last_block) :] == last_block
    assert chosen("top:2") == last_block[-2:]
    assert chosen(f"from:{last_block[0]}") == last_block
    assert chosen("regex:^" + last_block[0] + "$") == [last_block[0]]


@pytest.mark.filterwarnings("ignore:Skipping nested container")
def test_small_cnn_loads_a_weights_file_and_refuses_a_wrong_size(tmp_path):
    keras.utils.set_random_seed(4)
    source = build_backbone("small_cnn", "none", 16)
    path = str(tmp_path / "small.weights.h5")
    source.save_weights(path)
    loaded = build_backbone("small_cnn", path, 16)
    for a, b in zip(source.weights, loaded.weights, strict=True):
        assert np.array_equal(a.numpy(), b.numpy())
    with flag_error(r"^--weights='.*small.weights.h5': does not fit"):
        build_backbone("MobileNetV2", path, 32)


def test_random_resized_crop_augments_in_training_only_and_saves(tmp_path):
    from tlloop.checkpoints import Checkpoints, latest, rng_states
    from tlloop.config import parse_augment

    keras.utils.set_random_seed(2)
    model = build_model(ModelConfig(image_size=16, augment=parse_augment("crop:0.5")), 3)
    x = _pixels(16, 4)
    np.testing.assert_array_equal(np.asarray(model.augment(x, training=False)), x)
    cropped = np.asarray(model.augment(x, training=True))
    assert cropped.shape == x.shape and not np.allclose(cropped, x)
    # A crop enlarges a region: neighbouring pixels get closer (smoother images).
    assert np.abs(np.diff(cropped, axis=1)).mean() < np.abs(np.diff(x, axis=1)).mean()
    # Its own seed generator is among the RNG states a run checkpoints, and a checkpoint puts
    # it back: the draws after a restore repeat the draws made after the save.
    crop_state = model.augment.get_layer("crop_0").seed_generator.state
    assert any(state is crop_state for state in rng_states(model))
    saved = Checkpoints(str(tmp_path / "checkpoints"), keep=1, chief=True)
    saved.track(rng=rng_states(model))
    saved.save(1)
    after_save = [np.asarray(model.augment(x, training=True)) for _ in range(2)]
    assert not np.array_equal(after_save[0], after_save[1])  # the state advances per draw
    saved.restore(latest(str(tmp_path / "checkpoints")))
    after_restore = [np.asarray(model.augment(x, training=True)) for _ in range(2)]
    for a, b in zip(after_save, after_restore, strict=True):
        np.testing.assert_array_equal(a, b)
    model.save(str(tmp_path / "model.keras"))
    loaded = keras.saving.load_model(str(tmp_path / "model.keras"))
    assert loaded.augment.get_layer("crop_0").factor == 0.5


def test_weights_none_reinitialises_a_keras_file_backbone():
    pretrained = keras.saving.load_model(PRETRAINED, compile=False)
    own = build_backbone(PRETRAINED, "", 32)
    keras.utils.set_random_seed(0)
    fresh = build_backbone(PRETRAINED, "none", 32)
    file_weights = {v.path: v.numpy() for v in pretrained.weights}
    own_weights = {v.path: v.numpy() for v in own.layers[-1].weights}
    fresh_weights = {v.path: v.numpy() for v in fresh.layers[-1].weights}
    assert set(own_weights) == set(fresh_weights) == set(file_weights)
    for path, value in file_weights.items():
        assert np.array_equal(own_weights[path], value), path  # '' keeps the file's weights
        assert fresh_weights[path].shape == value.shape
    assert not np.allclose(fresh_weights["conv1/kernel"], file_weights["conv1/kernel"])
    # BatchNorm starts over too: moving statistics at their initial values.
    assert np.all(fresh_weights["bn1/moving_mean"] == 0)
    assert np.all(fresh_weights["bn1/moving_variance"] == 1)
    assert not np.all(file_weights["bn1/moving_variance"] == 1)
    x = _pixels(32)
    assert not np.allclose(np.asarray(fresh(x)), np.asarray(own(x)))


def test_weights_none_on_a_keras_file_with_code_keeps_safe_mode(tmp_path):
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Lambda(lambda t: t / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, name="conv")(x)
    source = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    path = str(tmp_path / "lambda.keras")
    source.save(path)
    with flag_error("--unsafe_deserialization"):
        build_backbone(path, "none", 16)
    fresh = build_backbone(path, "none", 16, safe_mode=False)
    kernel = next(v for v in fresh.weights if v.path.endswith("conv/kernel"))
    assert not np.allclose(kernel.numpy(), source.get_layer("conv").kernel.numpy())


def test_heads_take_a_subclassed_backbone_and_name_input_shape_when_it_cannot_be_probed():
    from model_zoo import SIZE, CutNet

    import tlloop

    built = CutNet()
    built(np.zeros((2, SIZE, SIZE, 3), "float32"))  # a loaded model: built on its inputs
    head = tlloop.classification_head(built, 4)
    table = tlloop.inspect_backbone(built, print_fn=None)
    assert "Held but not used by its forward pass (never trained): old_logits, old_aux" in table
    assert tuple(head.inputs[0].shape[1:]) == (SIZE, SIZE, 6) and head.outputs[0].shape[-1] == 4
    task = tlloop.Regression(2, targets=np.array([[1.0, 2.0], [3.0, 5.0]], "float32"))
    assert tlloop.regression_head(built, task).outputs[0].shape[-1] == 2
    # Never called: it declares no inputs, so its feature shape needs one example's shape.
    with pytest.raises(
        ValueError, match=r"^input_shape: the backbone \(CutNet\) declares no inputs"
    ):
        tlloop.classification_head(CutNet(), 4)
    fresh = CutNet()
    head = tlloop.classification_head(fresh, 4, input_shape=(SIZE, SIZE, 3))
    assert tuple(head.inputs[0].shape[1:]) == (SIZE, SIZE, 6) and fresh.built
    with pytest.raises(ValueError, match=r"^input_shape=\('a',\): not a shape"):
        tlloop.classification_head(CutNet(), 4, input_shape=("a",))
