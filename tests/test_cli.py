"""The command line: the quickstart end to end, and every bad input refused cleanly."""

from __future__ import annotations

import json
import os
import pathlib

import keras
import pytest
from conftest import REPO, eval_accuracy, run_cli
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from tlloop.cli.config import DataConfig, parse_classes
from tlloop.cli.data import load_data


def _scalars(logdir: str, tag: str) -> list[tuple[int, float]]:
    events = event_accumulator.EventAccumulator(logdir, size_guidance={"tensors": 0})
    events.Reload()
    return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]


def test_quickstart_end_to_end_on_a_small_budget(tmp_path):
    workdir = str(tmp_path / "quickstart")
    result = run_cli(
        "--flagfile=experiments/quickstart.flags",
        f"--workdir={workdir}",
        "--head_epochs=10",
        "--finetune_epochs=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]

    results = json.loads(pathlib.Path(workdir, "results.json").read_text())
    assert [p["name"] for p in results["phases"]] == ["head", "finetune"]
    assert [p["last_step"] for p in results["phases"]] == [10, 12]  # 25 examples, batch 32
    assert all(p["eval"]["examples"] == 269 for p in results["phases"])
    assert results["phases"][0]["eval"]["accuracy"] > 0.3  # well above chance (0.2)

    # One global step across phases, per-epoch scalars in both writers.
    train_loss = _scalars(os.path.join(workdir, "tensorboard", "train"), "epoch/loss")
    eval_scalars = _scalars(os.path.join(workdir, "tensorboard", "eval"), "accuracy")
    assert [step for step, _ in train_loss] == list(range(1, 13))
    assert [step for step, _ in eval_scalars] == list(range(1, 13))
    step_loss = _scalars(os.path.join(workdir, "tensorboard", "train"), "loss")
    assert [step for step, _ in step_loss] == [10]  # --log_every_steps=10
    assert eval_scalars[-1][1] == pytest.approx(results["phases"][1]["eval"]["accuracy"])

    # The export loads with Keras alone (after importing tlloop) and predicts like the run did.
    import tlloop.models  # noqa: F401  registers tlloop's Keras classes

    model = keras.saving.load_model(os.path.join(workdir, "export", "model.keras"))
    assert [layer.name for layer in model.layers] == ["augment", "backbone", "head"]
    data = load_data(DataConfig(classes=parse_classes("5-9"), train_examples_per_class=5))
    accuracy, total = eval_accuracy(model, data.eval)
    assert total == 269
    # --export=best (the default): the export scores the best evaluation of the run.
    assert results["export"]["weights"] == "best"
    assert accuracy == pytest.approx(results["best"]["value"], abs=1e-6)
    assert results["best"]["value"] == max(accuracy for _, accuracy in eval_scalars)

    # flags.txt re-runs the same experiment: on its own workdir, that resumes the finished run.
    flags_file = os.path.join(workdir, "flags.txt")
    assert "--train_examples_per_class=5" in pathlib.Path(flags_file).read_text()
    rerun = run_cli(f"--flagfile={flags_file}")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "finished run" in rerun.stderr
    again = json.loads(pathlib.Path(workdir, "results.json").read_text())
    assert again["weights_sha256"] == results["weights_sha256"]
    assert again["phases"] == results["phases"]


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert lines, result.stderr[-2000:]
    return lines[-1]


BAD_INPUTS = [
    # (arguments, what the error line must contain)
    (["--nosuchflag=1"], ["nosuchflag"]),
    (["--unfreeze=top:x"], ["--unfreeze", "accepted"]),
    (["--unfreeze=top:0"], ["--unfreeze", "accepted"]),
    (
        ["--dataset=imagenet"],
        ["--dataset", "digits, folder, tfrecord, csv, text_folder, tfds:NAME"],
    ),
    (["--batch_size=0"], ["--batch_size", "accepted"]),
    (["--augment=blur"], ["--augment", "accepted"]),
    (["--head_epochs=0", "--finetune_epochs=0"], ["--head_epochs", "accepted"]),
    (["--dataset=folder"], ["--data_dir", "accepted"]),
    (
        ["--val_dir=held_out", "--val_split=0"],
        ["--val_dir='held_out': --dataset=digits does not read it", "--dataset=folder"],
    ),
    (["--unfreeze=none", "--unfreeze_schedule=gradual:1"], ["--unfreeze_schedule", "--unfreeze"]),
    (["--flagfile=missing.flags"], ["missing.flags"]),
    (["--backbone=missing.keras"], ["--backbone", "no such file", "accepted"]),
    (["--backbone=MobileNetV9"], ["--backbone", "unknown backbone", "MobileNetV2"]),
    (
        ["--backbone=MobileNetV2", "--weights=none", "--image_size=16"],
        ["--image_size=16", "MobileNetV2", "at least 32"],
    ),
    (
        ["--backbone=experiments/pretrained/small_cnn_digits0-4.keras", "--image_size=16"],
        ["--image_size=16", "(32, 32, 3)", "accepted"],
    ),
    (["--backbone=MobileNetV2", "--weights=missing.h5"], ["--weights", "no such file"]),
    (["--backbone=small_cnn", "--weights=imagenet"], ["--weights=imagenet", "accepted"]),
    (["--classes=5-12"], ["--classes", "'10'", "accepted"]),
    (["--unfreeze=top:9"], ["--unfreeze=top:9", "only 3 layers"]),
    (["stray"], ["unexpected arguments", "accepted"]),
    (["--best_metric=top-5"], ["--best_metric='top-5': not a metric name", "a metric name"]),
    (["--best_metric=loss:up"], ["--best_metric='loss:up': unknown direction"]),
    (["--early_stopping_patience=-1"], ["--early_stopping_patience=-1", "accepted"]),
    (["--export=first"], ["--export", "best|last"]),
    (["--nan_policy=ignore"], ["--nan_policy", "stop|skip_step"]),
    (["--bad_images=keep"], ["--bad_images", "fail|skip"]),
    (["--init_checkpoint=nowhere"], ["--init_checkpoint='nowhere': no checkpoint there"]),
    (["--nosummaries", "--profile_steps=1,2"], ["--profile_steps='1,2'", "--nosummaries"]),
    (["--nosupervise", "--max_restarts=1"], ["--max_restarts=1", "--nosupervise"]),
]
# Errors absl reports itself while parsing (an unknown flag, a bad enum value) exit 1.
ABSL_REPORTED = {
    "--nosuchflag=1",
    "--flagfile=missing.flags",
    "--export=first",
    "--nan_policy=ignore",
    "--bad_images=keep",
}


@pytest.mark.parametrize(("args", "expected"), BAD_INPUTS, ids=lambda v: " ".join(v))
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, args, expected):
    workdir = tmp_path / "run"
    result = run_cli(f"--workdir={workdir}", *args, timeout=120)
    assert result.returncode == (1 if args[0] in ABSL_REPORTED else 2), result.stderr[-2000:]
    line = _error_line(result)
    for text in expected:
        assert text in line
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_workdir_that_is_a_file_is_refused(tmp_path):
    workdir = tmp_path / "run"
    workdir.write_text("keep me")
    result = run_cli(f"--workdir={workdir}", "--head_epochs=1", "--finetune_epochs=0")
    assert result.returncode == 2
    assert "--workdir" in _error_line(result) and "is a file" in _error_line(result)
    assert workdir.read_text() == "keep me"


def test_overwrite_removes_only_what_tlloop_wrote(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "export").mkdir(parents=True)
    (workdir / "export" / "m.onnx").write_text("mine")
    (workdir / "results.json").write_text("{}")
    (workdir / "notes.txt").write_text("mine")
    args = [
        f"--workdir={workdir}",
        "--classes=0-1",
        "--train_examples_per_class=4",
        "--image_size=16",
        "--head_epochs=1",
        "--finetune_epochs=0",
    ]
    # No tlloop run wrote them: refused, --overwrite too, naming them.
    refused = run_cli(*args, "--overwrite")
    assert refused.returncode == 2
    line = _error_line(refused)
    assert "holds files tlloop did not write" in line
    assert "export/m.onnx" in line and "results.json" in line
    assert (workdir / "results.json").read_text() == "{}"
    assert (workdir / "export" / "m.onnx").read_text() == "mine"

    # Moved away by their owner, a run; then a file of the owner's put beside the export.
    (workdir / "results.json").unlink()
    (workdir / "export" / "m.onnx").rename(tmp_path / "m.onnx")
    assert run_cli(*args).returncode == 0
    (tmp_path / "m.onnx").rename(workdir / "export" / "m.onnx")
    replaced = run_cli(*args, "--head_epochs=2", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert "removing" in replaced.stderr and "results.json" in replaced.stderr
    assert "keeping" in replaced.stderr and "m.onnx (not written by tlloop)" in replaced.stderr
    assert json.loads((workdir / "results.json").read_text())["phases"][0]["epochs"] == 2
    assert (workdir / "notes.txt").read_text() == "mine"
    assert (workdir / "export" / "m.onnx").read_text() == "mine"


def test_repo_root_holds_the_shipped_backbone():
    # The quickstart depends on it; a clean clone must have it.
    assert os.path.getsize(os.path.join(REPO, "experiments/pretrained/small_cnn_digits0-4.keras"))
