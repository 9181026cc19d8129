"""Any pretrained model as a backbone: HDF5 files (Keras 2 or 3) cut at a layer, input
adapters, KerasHub presets; and the one-line refusals. Every file and preset is made here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest
from conftest import REPO, changed, flag_error, make_config, run_cli, snapshot

from tlloop.cli import experiment as cli_experiment
from tlloop.cli.config import ModelConfig, from_flags
from tlloop.models.backbones import build_backbone

LUMA = np.array([0.2989, 0.5870, 0.1140], np.float32)


def _pixels(size: int, batch: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (batch, size, size, 3)).astype("float32")


def _grayscale_classifier(path: str, size: int = 32) -> keras.Model:
    """A small classifier that takes grayscale images in [-1, 1], with BatchNorm statistics far
    from their initial values, saved to `path` in the legacy HDF5 layout."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((size, size, 1), name="gray")
    x = inputs
    for i, filters in enumerate((8, 16), start=1):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs, name="classifier")
    rng = np.random.default_rng(2)
    for name in ("bn1", "bn2"):
        layer = model.get_layer(name)
        layer.moving_mean.assign(rng.normal(0, 0.5, layer.moving_mean.shape))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
    model.save(path)
    return model


@pytest.fixture(scope="module")
def h5_file(tmp_path_factory) -> tuple[str, keras.Model]:
    path = str(tmp_path_factory.mktemp("h5") / "classifier.h5")
    return path, _grayscale_classifier(path)


def test_cut_h5_backbone_adapts_rgb_pixels_to_grayscale_minus_one_to_one(h5_file):
    path, source = h5_file
    backbone = build_backbone(path, "", 32, layer="pool", value_range="-1:1")
    assert backbone.outputs[0].shape[1:] == (16,)
    x = _pixels(32)
    gray = (x @ LUMA)[..., None] / 127.5 - 1.0
    expected = keras.Model(source.inputs, source.get_layer("pool").output)(gray)
    np.testing.assert_allclose(backbone(x), expected, rtol=0, atol=1e-5)
    # The wrong range gives other features: the adapter is not a no-op.
    wrong = build_backbone(path, "", 32, layer="pool")
    assert not np.allclose(wrong(x), expected, atol=1e-2)
    # -2 from the end is the same cut; another --image_size is refused, naming the right one.
    assert build_backbone(path, "", 32, layer="-2").outputs[0].shape[1:] == (16,)
    with flag_error(r"^--image_size=48: .* accepted: --image_size=32 "):
        build_backbone(path, "", 48, layer="pool", value_range="-1:1")


def _keras2_layout(config: dict) -> dict:
    """A Keras 3 model config rewritten in Keras 2's HDF5 layout (as tf.keras 2.x wrote it):
    "Functional" layers with inbound_nodes as [[name, node, tensor, kwargs]] lists, nested
    input/output layer lists, batch_input_shape, dtypes as strings, no module/registered_name
    keys, initializer configs without Keras 3's extra fields."""

    def convert(node):
        if isinstance(node, dict):
            drop = ("module", "registered_name", "input_axes", "output_axes")
            node = {k: convert(v) for k, v in node.items() if k not in drop}
            if "batch_shape" in node:
                node["batch_input_shape"] = node.pop("batch_shape")
            if isinstance(node.get("dtype"), dict):
                node["dtype"] = node["dtype"]["config"]["name"]
            return node
        return [convert(v) for v in node] if isinstance(node, list) else node

    def keras2_nodes(nodes: list) -> list:
        old = []
        for node in nodes:
            history = [arg["config"]["keras_history"] for arg in node["args"]]
            old.append([[*h, node["kwargs"]] for h in history])
        return old

    model = config["config"]
    for layer in model["layers"]:
        layer["inbound_nodes"] = keras2_nodes(layer["inbound_nodes"])
    for key in ("input_layers", "output_layers"):
        if model[key] and isinstance(model[key][0], str):
            model[key] = [model[key]]
    return convert(config)


def test_h5_in_keras2_layout_loads_with_its_weights(h5_file, tmp_path):
    path, _ = h5_file
    old = str(tmp_path / "keras2.h5")
    with open(path, "rb") as src, open(old, "wb") as dst:
        dst.write(src.read())
    with h5py.File(old, "r+") as file:
        config = json.loads(file.attrs["model_config"])
        file.attrs["model_config"] = json.dumps(_keras2_layout(config))
        file.attrs["keras_version"] = "2.15.0"
        file.attrs["backend"] = "tensorflow"
    with h5py.File(old, "r") as file:
        text = file.attrs["model_config"]
        assert "batch_input_shape" in text and '"module"' not in text
        assert '"inbound_nodes": [[["bn1", 0, 0, {}]]]' in text and "keras_history" not in text
    backbone = build_backbone(old, "", 32, layer="pool", value_range="-1:1")
    reference = build_backbone(path, "", 32, layer="pool", value_range="-1:1")
    x = _pixels(32)
    np.testing.assert_array_equal(backbone(x), reference(x))


def test_h5_classifier_cut_fine_tunes_and_exports(h5_file, tmp_path):
    path, source = h5_file
    workdir = str(tmp_path / "run")
    config = make_config(
        workdir,
        backbone=path,
        backbone_layer="pool",
        backbone_range="-1:1",
        unfreeze="all",
        export="last",
    )
    experiment = cli_experiment.build_experiment(config)
    model = experiment.model
    before = snapshot(model.backbone)
    cli_experiment.train(experiment, workdir)
    moved = changed(before, snapshot(model.backbone))
    assert any("conv1" in p and "kernel" in p for p in moved), (moved, list(before))
    assert not [p for p in moved if "moving" in p]  # BatchNorm statistics untouched
    for name in ("bn1", "bn2"):
        trained = model.backbone.get_layer("classifier").get_layer(name)
        np.testing.assert_array_equal(trained.moving_mean, source.get_layer(name).moving_mean)
        np.testing.assert_array_equal(
            trained.moving_variance, source.get_layer(name).moving_variance
        )
    export = os.path.join(workdir, "export")
    x = _pixels(32, 4)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np, keras, tensorflow as tf, tlloop\n"
        "export, x = sys.argv[1], np.load(sys.argv[2])\n"
        "model = keras.saving.load_model(export + '/model.keras')\n"
        "keras.saving.load_model(export + '/backbone.keras')\n"
        "served = tf.saved_model.load(export + '/saved_model').signatures['serving_default']\n"
        "a = tf.nn.softmax(model(x)).numpy()\n"
        "b = served(images=tf.constant(x))['probabilities'].numpy()\n"
        "print(float(np.abs(a - b).max()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, export, str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    difference = float(result.stdout.split()[0])
    assert difference <= 1e-5


def test_bad_backbone_inputs_are_one_line_naming_the_flag(h5_file, tmp_path):
    path, _ = h5_file
    cases = [
        ({"layer": "pol"}, r"^--backbone_layer='pol': no such layer .*nearest: pool"),
        ({"layer": "-99"}, r"^--backbone_layer='-99': .* has 9 layers"),
        ({"channels": "rgb"}, r"^--backbone_channels=rgb: .* takes 1-channel images"),
        ({"value_range": "imagenet"}, r"^--backbone_range=imagenet: it normalises 3 RGB"),
    ]
    for kwargs, pattern in cases:
        with flag_error(pattern) as caught:
            build_backbone(path, "", 32, **kwargs)
        assert "\n" not in str(caught.value)
    # A cut whose output is a sequence, not a feature map or a vector.
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Reshape((64, 3), name="tokens")(inputs)
    x = keras.layers.GlobalAveragePooling1D(name="mean")(x)
    sequence = str(tmp_path / "sequence.keras")
    keras.Model(inputs, x).save(sequence)
    with flag_error(r"^--backbone_layer='tokens': its output .* not a"):
        build_backbone(sequence, "", 8, layer="tokens")
    # A weights-only HDF5 file is not a model.
    weights = str(tmp_path / "only.weights.h5")
    keras.Model(inputs, x).save_weights(weights)
    with flag_error(r"^--backbone='.*only.weights.h5': not a loadable"):
        build_backbone(weights, "", 8)
    # A TF SavedModel is refused, with the reason.
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"")
    with flag_error(r"^--backbone='.*saved': a TF SavedModel cannot be"):
        build_backbone(str(saved), "", 8)
    # Adapters on a backbone that builds its own input.
    with flag_error(r"^--backbone_range='0:1': small_cnn builds"):
        build_backbone("small_cnn", "", 32, value_range="0:1")
    with flag_error(r"^--backbone_range='0:2:3': not a range"):
        ModelConfig(backbone_range="0:2:3")


def test_a_bad_cut_on_the_command_line_exits_2_before_the_workdir(h5_file, tmp_path):
    path, _ = h5_file
    workdir = tmp_path / "run"
    result = run_cli(f"--workdir={workdir}", f"--backbone={path}", "--backbone_layer=predictons")
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("tlloop: error: --backbone_layer='predictons': no such layer")
    assert "predictions" in error
    assert not workdir.exists()


def test_a_preset_without_keras_hub_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # what an absent package raises
    with flag_error(r'^--backbone=.*keras-hub.*pip install -e "\.\[hub\]"'):
        build_backbone("kaggle://keras/resnetv2/keras/resnet50_v2_imagenet", "", 32)


def test_flags_carry_the_backbone_options():
    config = from_flags(
        {"workdir": "w", "backbone": "x.h5", "backbone_layer": "-2", "backbone_range": "imagenet"}
    ).model
    assert (config.backbone_layer, config.backbone_range) == ("-2", "imagenet")


def test_inspect_backbone_lists_layers_batch_norms_and_cut_points(h5_file, tmp_path):
    import tlloop

    path, _ = h5_file
    text = tlloop.inspect_backbone(path, print_fn=None)
    assert "BatchNorm layers: 2" in text
    rows = {line.split()[1]: line.split() for line in text.splitlines() if line[:5].strip()}
    assert rows["pool"][0] == "-2" and rows["bn1"][-1] == "yes"
    assert "--backbone_layer=pool" in text and "classifier 'predictions'" in text
    assert "--backbone_layer=relu2" in text  # the last feature map
    result = run_cli(path, module="tlloop.backbone", timeout=120)
    assert result.returncode == 0 and "--backbone_layer=pool" in result.stdout
    with flag_error(r"^--backbone='.*none.h5': no such file"):
        tlloop.inspect_backbone(str(tmp_path / "none.h5"))


def test_the_python_api_names_arguments_not_flags(h5_file):
    import tlloop

    path, _ = h5_file
    backbone = tlloop.load_backbone(path, 32, layer="pool", value_range="-1:1")
    assert backbone.outputs[0].shape[1:] == (16,)
    with pytest.raises(ValueError, match=r"^layer='pol': no such layer"):
        tlloop.load_backbone(path, 32, layer="pol")


def test_one_error_names_the_argument_from_python_and_the_flag_on_the_command_line(
    h5_file, tmp_path
):
    import re

    import tlloop
    from tlloop import phases as phase_lib
    from tlloop import workdir as workdir_lib
    from tlloop.cli.flags import flag_line
    from tlloop.config import BestMetric, CheckpointConfig, PhaseConfig, Unfreeze
    from tlloop.errors import ConfigError
    from tlloop.warm_start import warm_start
    from tlloop.wise_ft import finetune_index

    path, _ = h5_file
    backbone = tlloop.load_backbone(path, 32, layer="pool", value_range="-1:1")
    (tmp_path / "file").write_text("")
    no_finetune = [
        PhaseConfig(name, epochs=e, learning_rate=0.1) for name, e in (("head", 1), ("finetune", 0))
    ]
    cases = [  # (the failing call, the library's line starts with, the command line's)
        (lambda: tlloop.load_backbone(str(tmp_path / "x.keras"), 32), "source='", "--backbone='"),
        (lambda: tlloop.load_backbone(path, 32, layer="pol"), "layer='pol'", "--backbone_layer="),
        (
            lambda: tlloop.load_backbone("small_cnn", 32, weights="imagenet"),
            "weights=",
            "--weights=",
        ),
        (
            lambda: phase_lib.unfrozen_layers(Unfreeze.parse("top:99"), backbone),
            "unfreeze=top:99: the backbone has only",
            "--unfreeze=top:99: the backbone has only",
        ),
        (
            lambda: warm_start(backbone, str(tmp_path / "no")),
            "init_checkpoint='",
            "--init_checkpoint=",
        ),
        (
            lambda: workdir_lib.prepare(str(tmp_path / "file"), None, overwrite=False),
            "workdir='",
            "--workdir='",
        ),
        (
            lambda: tlloop.Classification(3).checked_best_metric(BestMetric("auc")),
            "best_metric=auc:max: the task has no metric 'auc'; accepted: loss, accuracy",
            "--best_metric=auc:max: the task has no metric 'auc'; accepted: loss, accuracy",
        ),
        (  # arguments named inside the text follow: finetune.epochs is --finetune_epochs
            lambda: finetune_index(CheckpointConfig(wise_ft=(0, 1)), no_finetune),
            "wise_ft=0.0,1.0: no phase trains the backbone (WiSE-FT interpolates towards the "
            "fine-tuned weights); accepted: a fine-tune phase (e.g. finetune.epochs >= 1 with "
            "unfreeze not none) after the head phase, or no wise_ft",
            "--wise_ft=0.0,1.0: no phase trains the backbone (WiSE-FT interpolates towards the "
            "fine-tuned weights); accepted: a fine-tune phase (e.g. --finetune_epochs >= 1 with "
            "--unfreeze not none) after the head phase, or no --wise_ft",
        ),
    ]
    for call, library, command_line in cases:
        with pytest.raises(ConfigError) as caught:
            call()
        line = str(caught.value)
        assert line.startswith(library) and not re.search(r"--\w", line), line
        assert flag_line(caught.value).startswith(command_line), flag_line(caught.value)


def test_an_application_can_be_cut_and_keeps_its_preprocessing():
    backbone = build_backbone("MobileNetV2", "none", 32, layer="block_3_expand_relu")
    assert backbone.outputs[0].shape[1:] == (8, 8, 144)
    assert backbone.get_layer("preprocess").application == "MobileNetV2"
    with flag_error(r"^--backbone_channels='grayscale': MobileNetV2 builds"):
        build_backbone("MobileNetV2", "none", 32, channels="grayscale")


def test_separable_conv_with_batch_norm_warns_of_the_onednn_crash(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.BatchNormalization()(keras.layers.SeparableConv2D(4, 3)(inputs))
    path = str(tmp_path / "separable.h5")
    keras.Model(inputs, x).save(path)
    build_backbone(path, "", 8)
    assert "TF_ENABLE_ONEDNN_OPTS=0" in caplog.text
    caplog.clear()
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    build_backbone(path, "", 8)
    assert "TF_ENABLE_ONEDNN_OPTS" not in caplog.text
