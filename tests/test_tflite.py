"""TFLite export (--export_tflite, tlloop.export(tflite=...)) checked by the LiteRT interpreter.

Tests that run the interpreter skip where the `tflite` extra (ai-edge-litert) is absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import PRETRAINED, flag_error, run_cli

import tlloop
from tlloop import config as config_lib
from tlloop import tflite
from tlloop.models.backbones import small_cnn

needs_litert = pytest.mark.skipif(
    importlib.util.find_spec("ai_edge_litert") is None,
    reason="the LiteRT interpreter (pip install -e '.[tflite]') is not installed",
)

# The quickstart (digits 5-9, 5 training images per class, the pretrained small_cnn with
# BatchNorm, 32 px) on a tiny budget, with every TFLite format.
QUICKSTART = (
    "--flagfile=experiments/quickstart.flags",
    "--head_epochs=3",
    "--finetune_epochs=1",
    "--quiet",
    "--nosummaries",
    "--export_tflite=float32,dynamic,int8",
)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> str:
    """The workdir of the quickstart run above."""
    workdir = str(tmp_path_factory.mktemp("quickstart") / "run")
    done = run_cli(*QUICKSTART, f"--workdir={workdir}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("tflite ") == 3, done.stdout  # one printed line per format
    return workdir


@needs_litert
def test_quickstart_converts_to_every_format_and_each_agrees_with_keras(quickstart):
    with open(os.path.join(quickstart, "results.json"), encoding="utf-8") as file:
        reports = json.load(file)["export"]["tflite"]
    assert sorted(reports) == ["dynamic", "float32", "int8"]
    for fmt, report in reports.items():
        assert os.path.getsize(report["path"]) == report["bytes"] > 0
        assert report["examples"] == 269  # every evaluation image of digits 5-9
        assert report["latency_ms"] > 0
        print(fmt, report)  # the measured figures, for the record (pytest -s)
    assert reports["float32"]["agreement"] == 1.0
    assert reports["float32"]["max_probability_difference"] <= 1e-5
    for fmt, report in reports.items():  # each file checked through both of its signatures
        assert sorted(report["signatures"]) == ["serving_default", "serving_uint8"], fmt
        assert report["agreement"] == min(c["agreement"] for c in report["signatures"].values())
    assert reports["dynamic"]["agreement"] >= 0.99
    assert reports["int8"]["agreement"] >= 0.97
    # Quantization shrinks the file: int8 weights instead of float32 ones.
    assert reports["int8"]["bytes"] < reports["float32"]["bytes"] / 3
    labels = os.path.join(quickstart, "export", "labels.txt")
    with open(labels, encoding="utf-8") as file:
        assert file.read().split() == ["5", "6", "7", "8", "9"]


# Runs in a fresh interpreter: only the LiteRT interpreter and numpy, never TensorFlow.
DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    images = np.load(sys.argv[1])
    assert images.dtype == np.uint8
    out = {}
    for path in sys.argv[2:]:
        interpreter = Interpreter(model_path=path)
        for signature, dtype in (("serving_uint8", np.uint8), ("serving_default", np.float32)):
            runner = interpreter.get_signature_runner(signature)
            detail = runner.get_output_details()["probabilities"]
            scale, zero_point = detail["quantization"]
            rows = []
            for image in images.astype(dtype):
                q = runner(images=image[None])["probabilities"]
                rows.append(scale * (q.astype(np.float32) - zero_point) if scale else q)
            out[f"{path}:{signature}"] = np.concatenate(rows).tolist()
    assert "tensorflow" not in sys.modules and "tlloop" not in sys.modules, sorted(sys.modules)
    print(json.dumps(out))
    """
)


@needs_litert
def test_exported_files_run_on_uint8_images_without_tensorflow(quickstart, tmp_path):
    export = os.path.join(quickstart, "export")
    model = keras.saving.load_model(os.path.join(export, "model.keras"))
    rng = np.random.default_rng(0)
    # Digit-like inputs: the eval pixels are not needed, any uint8 image of the model's size.
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    expected = tflite.keras_probabilities(model, images)
    np.save(tmp_path / "images.npy", images)
    paths = [os.path.join(export, tflite.file_name(f)) for f in tflite.FORMATS]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", DEVICE_SCRIPT, str(tmp_path / "images.npy"), *paths],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),  # not the repository: tlloop is not importable from here
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = {os.path.basename(p): np.asarray(v) for p, v in json.loads(done.stdout).items()}
    assert len(got) == 6  # three files, two signatures each
    for signature in ("serving_uint8", "serving_default"):
        np.testing.assert_allclose(got[f"model_float32.tflite:{signature}"], expected, atol=1e-5)
        for name in ("model_dynamic.tflite", "model_int8.tflite"):
            probabilities = got[f"{name}:{signature}"]
            assert probabilities.shape == expected.shape
            assert np.abs(probabilities - expected).max() < 0.5  # quantized, still probabilities


@needs_litert
def test_evaluate_tflite_scores_the_file_like_the_export(quickstart):
    export = run_cli(f"--workdir={quickstart}", module="tlloop.evaluate")
    assert export.returncode == 0, export.stderr[-2000:]
    keras_metrics = json.loads(export.stdout)
    path = os.path.join(quickstart, "export", "model_float32.tflite")
    done = run_cli(f"--workdir={quickstart}", f"--tflite={path}", module="tlloop.evaluate")
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads(done.stdout)
    assert metrics["evaluated"] == path and metrics["examples"] == 269
    # The file sees uint8 pixels, the Keras model the resized float ones: near, not equal.
    assert abs(metrics["accuracy"] - keras_metrics["accuracy"]) <= 3 / 269
    assert abs(metrics["loss"] - keras_metrics["loss"]) < 0.02
    assert np.sum(metrics["confusion"]) == 269 and metrics["bytes"] > 0

    flags_txt = os.path.join(quickstart, "flags.txt")
    bad = run_cli(f"--workdir={quickstart}", f"--tflite={flags_txt}", module="tlloop.evaluate")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        f"tlloop.evaluate: error: --tflite={flags_txt!r}: not a TFLite file; accepted: a "
        ".tflite file"
    )


def _tied_model() -> tlloop.TransferModel:
    """small_cnn with a head whose logits differ by at most 1e-3 (zero kernel, bias
    0,0,0,0,1e-3): the Keras model always picks class 4; int8 probabilities (steps of 1/256)
    tie, and the tie picks class 0."""
    backbone = small_cnn(32)
    head = keras.Sequential(
        [
            keras.Input(backbone.output_shape[1:]),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(
                5,
                kernel_initializer="zeros",
                bias_initializer=keras.initializers.Constant([0, 0, 0, 0, 1e-3]),
            ),
        ]
    )
    return tlloop.TransferModel(backbone, head)


@needs_litert
def test_a_file_below_its_agreement_fails_the_export_in_one_line(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 5, 16)
    workdir = str(tmp_path / "run")
    trainer = tlloop.Trainer(
        workdir,
        # A learning rate far too small to move the logits off their tie in one step.
        phases=[tlloop.Phase("head", epochs=1, learning_rate=1e-9)],
        task=tlloop.Classification(5),
        checkpoint=tlloop.CheckpointConfig(export_tflite="float32,int8"),
        logging=tlloop.LoggingConfig(quiet=True, summaries=False),
    )
    with pytest.raises(tlloop.RunFailed) as failed:
        trainer.fit(_tied_model(), (x, y), (x[:8], y[:8]), batch_size=8)
    message = str(failed.value)
    assert "\n" not in message
    assert "TFLite int8: top-1 agreement with the Keras model 0.0000 < 0.97" in message
    assert "the checkpoints and the other exports are intact" in message
    export = os.path.join(workdir, "export")
    assert sorted(os.listdir(export)) == [
        "backbone.keras",
        "model.keras",
        "model_float32.tflite",
        "saved_model",
    ]
    assert tlloop.trainer.checkpoint_lib.latest(os.path.join(workdir, "checkpoints"))
    # results.json is still written: the file that passed, and why the export failed.
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as file:
        export = json.load(file)["export"]
    assert sorted(export["tflite"]) == ["float32"]
    assert export["tflite"]["float32"]["agreement"] == 1.0
    assert export["tflite_error"].startswith("TFLite int8: top-1 agreement")
    assert os.path.isdir(export["saved_model"])


def _grayscale_model() -> tlloop.TransferModel:
    """A backbone of one-channel images: no TFLite file takes RGB pixels into it."""
    inputs = keras.Input((32, 32, 1))
    backbone = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    return tlloop.TransferModel(backbone, tlloop.classification_head(backbone, 5))


@needs_litert
@pytest.mark.parametrize(
    ("task", "model", "problem"),
    [
        (tlloop.MultiLabel(5), _tied_model, r"task: TFLite export serves a Classification"),
        (
            tlloop.Classification(5),
            _grayscale_model,
            r"model: the backbone takes \(None, 32, 32, 1",
        ),
    ],
    ids=["multilabel", "grayscale"],
)
def test_a_model_tflite_cannot_take_is_refused_when_fit_starts(tmp_path, task, model, problem):
    # From Python as from the command line: before any step, and nothing written.
    workdir = tmp_path / "run"
    trainer = tlloop.Trainer(
        str(workdir),
        phases=[tlloop.Phase("head", epochs=1, learning_rate=1e-3)],
        task=task,
        checkpoint=tlloop.CheckpointConfig(export_tflite="float32"),
    )
    labels = np.zeros((8, 5), np.float32) if isinstance(task, tlloop.MultiLabel) else np.zeros(8)
    channels = 1 if model is _grayscale_model else 3
    images = np.zeros((8, 32, 32, channels), np.float32)
    with pytest.raises(ValueError, match=rf"^checkpoint.export_tflite=float32: {problem}"):
        trainer.fit(model(), (images, labels), (images, labels))
    assert not workdir.exists()


def test_bad_export_tflite_flag_is_refused_before_the_workdir(tmp_path):
    workdir = tmp_path / "run"
    done = run_cli(
        "--dataset=digits", f"--backbone={PRETRAINED}", f"--workdir={workdir}",
        "--export_tflite=float32,float16",
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "tlloop: error: --export_tflite='float32,float16': unknown format 'float16'; accepted: "
        "a comma list of float32, dynamic, int8 (each once), or empty"
    )
    assert not workdir.exists()


def test_export_tflite_values(monkeypatch):
    assert config_lib.parse_tflite_formats("") == ()
    with flag_error("a format twice"):
        config_lib.parse_tflite_formats("int8,int8")
    with flag_error(r"tflite_min_agreement_int8=1\.5"):
        config_lib.CheckpointConfig(tflite_min_agreement_int8=1.5)
    # Without the interpreter no file could be checked: refused, naming the extra.
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "ai_edge_litert" else real(name, *a),
    )
    with flag_error(r"tlloop\[tflite\]"):
        config_lib.CheckpointConfig(export_tflite=("float32",))
    assert config_lib.CheckpointConfig().export_tflite == ()  # no formats: nothing needed


def test_export_with_tflite_needs_verification_images(tmp_path):
    with pytest.raises(ValueError, match="verify_images"):
        tlloop.export(_tied_model(), str(tmp_path), tflite=["float32"])
    assert os.listdir(tmp_path) == []  # refused before writing anything


@needs_litert
def test_python_export_writes_and_reports_a_checked_file(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    paths = tlloop.export(
        _tied_model(), str(tmp_path), class_names=list("abcde"), tflite="float32",
        verify_images=images,
    )  # fmt: skip
    report = paths["tflite"]["float32"]
    assert report["path"] == str(tmp_path / "model_float32.tflite")
    assert report["examples"] == 6 and report["agreement"] == 1.0
    assert (tmp_path / "labels.txt").read_text() == "a\nb\nc\nd\ne\n"
    assert tflite.input_shape(report["path"]) == (1, 32, 32, 3)


@needs_litert
def test_mobilenetv2_with_crop_resizing_converts_and_agrees(tmp_path):
    # "crop" computes its output shape at run time; MobileNetV2's first convolution did not
    # convert until the served function stated the shape. Tiny: alpha 0.35, 32 px.
    backbone = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None
    )
    model = tlloop.TransferModel(backbone, tlloop.classification_head(backbone, 3))
    images = np.random.default_rng(0).integers(0, 256, (4, 40, 32, 3), dtype=np.uint8)
    images = images[:, 4:36]  # (4, 32, 32, 3)
    content = tflite.convert(model, ["float32"], resize="crop")["float32"]
    expected = tflite.keras_probabilities(model, images, resize="crop")
    report = tflite.verify(content, images, expected)
    assert report["agreement"] == 1.0 and report["max_probability_difference"] <= 1e-5


@needs_litert
def test_cli_export_below_threshold_exits_1_in_one_line_with_the_run_intact(tmp_path):
    # int8 on 269 digits agrees on 97-99.6% here (never all of them): a threshold of 1.0 fails.
    workdir = str(tmp_path / "run")
    done = run_cli(
        *QUICKSTART[:-1], "--export_tflite=int8", "--tflite_min_agreement_int8=1.0",
        "--finetune_epochs=0", f"--workdir={workdir}",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"tlloop: error: --export_tflite: TFLite int8: top-1 agreement with the Keras model "
        r"0\.\d{4} < 1\.0 on 269 evaluation images \(max probability difference \d\.\d{4}\); "
        r"not written; the checkpoints and the other exports are intact; accepted: other "
        r"formats, or a lower threshold \(--tflite_min_agreement, --tflite_min_agreement_int8\)",
        last,
    ), last
    export = os.path.join(workdir, "export")
    assert sorted(os.listdir(export)) == ["backbone.keras", "model.keras", "saved_model"]
    assert os.path.exists(os.path.join(workdir, "checkpoints", "checkpoint"))
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as file:
        assert json.load(file)["export"]["tflite"] == {}
