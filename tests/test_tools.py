"""`python -m tlloop.evaluate` and `python -m tlloop.predict` on a finished run."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from conftest import run_cli

from tlloop.cli.config import DataConfig, parse_classes
from tlloop.cli.data import load_data


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    workdir = tmp_path_factory.mktemp("tools") / "run"
    result = run_cli(
        "--flagfile=experiments/quickstart.flags",
        "--head_epochs=6",
        "--finetune_epochs=2",
        "--quiet",
        f"--workdir={workdir}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return workdir, json.loads((workdir / "results.json").read_text())


def _evaluate(*args: str):
    return run_cli(*args, module="tlloop.evaluate", timeout=180)


def test_evaluate_scores_the_export_and_any_checkpoint(finished, tmp_path):
    workdir, results = finished
    exported = _evaluate(f"--workdir={workdir}", f"--output={tmp_path / 'e.json'}")
    assert exported.returncode == 0, exported.stderr[-2000:]
    metrics = json.loads(exported.stdout)
    assert metrics == json.loads((tmp_path / "e.json").read_text())
    assert metrics["evaluated"].endswith("export/model.keras")
    assert metrics["examples"] == 269
    assert metrics["accuracy"] == pytest.approx(results["best"]["value"], abs=1e-6)
    assert list(metrics["per_class_accuracy"]) == results["class_names"]
    confusion = np.asarray(metrics["confusion"])
    assert np.trace(confusion) / confusion.sum() == pytest.approx(metrics["accuracy"])

    latest = json.loads(_evaluate(f"--workdir={workdir}", "--checkpoint=latest").stdout)
    assert latest["accuracy"] == pytest.approx(results["phases"][-1]["eval"]["accuracy"])
    # Other evaluation batches, same examples: the same numbers.
    rebatched = _evaluate(f"--workdir={workdir}", "--checkpoint=best", "--eval_batch_size=7")
    assert json.loads(rebatched.stdout)["accuracy"] == pytest.approx(metrics["accuracy"])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--checkpoint=nope"], "--checkpoint='nope': no such checkpoint"),
        (["--classes=0-4"], "--classes: the data has classes ['0', '1', '2', '3', '4']"),
        (["--val_split=2"], "--val_split=2.0: out of range"),
        (["extra"], "unexpected arguments"),
    ],
)
def test_evaluate_bad_input_is_one_line(finished, args, expected):
    workdir, _ = finished
    result = _evaluate(f"--workdir={workdir}", *args)
    assert result.returncode == 2
    [line] = [x for x in result.stderr.splitlines() if x.startswith("tlloop.evaluate: error:")]
    assert expected in line


def test_evaluate_refuses_a_directory_without_a_run(tmp_path):
    result = _evaluate(f"--workdir={tmp_path}")
    assert result.returncode == 2 and "holds no flags.txt" in result.stderr


def _digit_png(tmp_path, label: int) -> str:
    data = load_data(DataConfig(classes=parse_classes(str(label)), image_size=32))
    image = next(iter(data.eval))[0][0].numpy().astype(np.uint8)
    path = str(tmp_path / f"digit{label}.png")
    tf.io.write_file(path, tf.io.encode_png(image))
    return path


def test_predict_prints_the_top_classes_of_each_image(finished, tmp_path):
    workdir, results = finished
    paths = [_digit_png(tmp_path, 7), _digit_png(tmp_path, 6)]
    result = run_cli(f"--workdir={workdir}", "--top_k=2", *paths, module="tlloop.predict")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == paths
    for line in lines:
        ranked = [cell.split(" ") for cell in line.split("\t")[1:]]
        assert len(ranked) == 2 and all(name in results["class_names"] for name, _ in ranked)
        assert float(ranked[0][1]) >= float(ranked[1][1])


def test_predict_bad_input(finished, tmp_path):
    workdir, _ = finished
    good = _digit_png(tmp_path, 5)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")

    def predict(*args):
        return run_cli(*args, module="tlloop.predict", timeout=180)

    failed = predict(f"--workdir={workdir}", str(bad), good)
    assert failed.returncode == 2 and failed.stdout == ""
    assert f"tlloop.predict: error: image file '{bad}': cannot be read" in failed.stderr
    skipped = predict(f"--workdir={workdir}", "--bad_images=skip", str(bad), good)
    assert skipped.returncode == 0 and skipped.stdout.startswith(good)
    assert f"skipped: image file '{bad}'" in skipped.stderr
    too_many = predict(f"--workdir={workdir}", "--top_k=6", good)
    assert too_many.returncode == 2 and "--top_k=6: the model has 5 classes" in too_many.stderr
    nothing = predict(f"--workdir={tmp_path}", good)
    assert nothing.returncode == 2 and "no SavedModel" in nothing.stderr
