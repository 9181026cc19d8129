"""TensorBoard and metrics.jsonl, read back the way a researcher reads them."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from conftest import run_cli, start_cli
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

import tlloop
from tlloop.summaries import confusion_image, image_grid

# 25 examples, batch 32: one step per epoch; 6 + 4 epochs = 10 global steps.
ARGS = [
    "--flagfile=experiments/quickstart.flags",
    "--head_epochs=6",
    "--finetune_epochs=4",
    "--log_every_steps=2",
    "--histogram_every_steps=5",
    "--profile_steps=3,4",
    "--quiet",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("summaries") / "run"
    result = run_cli(*ARGS, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def _events(logdir: pathlib.Path) -> event_accumulator.EventAccumulator:
    # TF2 summaries are tensor events; the default size guidance keeps only 10 per tag.
    sizes = {kind: 0 for kind in ("tensors", "images", "histograms")}
    events = event_accumulator.EventAccumulator(str(logdir), size_guidance=sizes)
    events.Reload()
    return events


def _scalars(events, tag: str) -> dict[int, float]:
    return {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)}


def _jsonl(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_train_scalars_follow_the_cadence_and_match_metrics_jsonl(run):
    train = _events(run / "tensorboard/train")
    rows = [row for row in _jsonl(run) if row["kind"] == "train"]
    assert [row["step"] for row in rows] == [2, 4, 6, 8, 10]
    for tag in ("loss", "accuracy", "learning_rate", "gradient_norm", "examples_per_second"):
        values = _scalars(train, tag)
        assert sorted(values) == [2, 4, 6, 8, 10], tag
        for row in rows:
            assert values[row["step"]] == pytest.approx(row[tag], rel=1e-6), (tag, row["step"])
    rates = _scalars(train, "learning_rate")
    assert rates[6] == pytest.approx(3e-2) and rates[8] == pytest.approx(3e-4)  # head, finetune
    assert all(row["gradient_norm"] > 0 for row in rows)
    assert _scalars(train, "phase") == {0: 1.0, 6: 2.0}
    assert sorted(_scalars(train, "epoch/loss")) == list(range(1, 11))
    # One step per epoch: each epoch's loss and accuracy are its one step's.
    epoch_accuracy = _scalars(train, "epoch/accuracy")
    assert sorted(epoch_accuracy) == list(range(1, 11))
    for row in rows:
        assert epoch_accuracy[row["step"]] == pytest.approx(row["accuracy"], rel=1e-6)
        assert _scalars(train, "epoch/loss")[row["step"]] == pytest.approx(row["loss"], rel=1e-6)
    # The host-measured time per step: at the logged steps, in milliseconds, and the same
    # measurement as examples_per_second (batch 32 over the same time).
    step_time = _scalars(train, "step_time_ms")
    assert sorted(step_time) == [2, 4, 6, 8, 10]
    speed = _scalars(train, "examples_per_second")
    for row in rows:
        assert step_time[row["step"]] == pytest.approx(row["step_time_ms"], rel=1e-6)
        assert step_time[row["step"]] * speed[row["step"]] == pytest.approx(32_000, rel=1e-5)
        assert 0 < step_time[row["step"]] < 60_000


def test_eval_scalars_every_evaluation_and_match_metrics_jsonl(run):
    evaluation = _events(run / "tensorboard/eval")
    rows = [row for row in _jsonl(run) if row["kind"] == "eval"]
    assert [row["step"] for row in rows] == list(range(1, 11))
    accuracy = _scalars(evaluation, "accuracy")
    for row in rows:
        assert accuracy[row["step"]] == pytest.approx(row["accuracy"])
        assert row["examples"] == 269 and sum(map(sum, row["confusion"])) == 269
        correct = sum(row["confusion"][i][i] for i in range(5))
        assert correct / 269 == pytest.approx(row["accuracy"], abs=1e-6)


def test_steps_never_repeat_or_go_back(run):
    steps = [row["step"] for row in _jsonl(run)]
    assert steps == sorted(steps)
    train_steps = [row["step"] for row in _jsonl(run) if row["kind"] == "train"]
    assert len(set(train_steps)) == len(train_steps)


def test_histograms_images_text_and_profile(run):
    train = _events(run / "tensorboard/train")
    histograms = train.Tags()["histograms"] or train.Tags()["tensors"]
    weights = [t for t in histograms if t.startswith("weights/")]
    gradients = [t for t in histograms if t.startswith("gradients/")]
    assert "weights/logits/kernel" in weights and "gradients/logits/kernel" in gradients
    steps = {e.step for e in train.Tensors("gradients/logits/kernel")}
    assert steps == {5, 10}
    # The backbone trains only in the fine-tune phase: its gradients appear at step 10 only.
    assert {e.step for e in train.Tensors("gradients/conv1/kernel")} == {10}

    assert {e.step for e in train.Tensors("augmented_inputs")} == {0, 6}
    evaluation = _events(run / "tensorboard/eval")
    assert len(evaluation.Tensors("confusion_matrix")) == 10
    texts = {e.step: e for e in train.Tensors("trainability")}
    assert sorted(texts) == [0, 6]
    report = tensor_util.make_ndarray(texts[6].tensor_proto).item().decode()
    assert "| backbone | False | 93,024 |" in report  # conv kernels train, BatchNorm does not
    flags_text = tensor_util.make_ndarray(train.Tensors("flags")[0].tensor_proto).item().decode()
    assert "--head_epochs=6" in flags_text
    assert list((run / "tensorboard/train/plugins/profile").glob("*/*.xplane.pb"))


def test_hparams_are_recorded_for_the_dashboard(run):
    root = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    root.Reload()
    content = root.PluginTagToContent("hparams")
    assert content
    records = [plugin_data_pb2.HParamsPluginData.FromString(c) for c in content.values()]
    (start,) = [r for r in records if r.HasField("session_start_info")]
    hparams = start.session_start_info.hparams
    (config,) = [r for r in records if r.HasField("experiment")]
    assert {m.name.tag for m in config.experiment.metric_infos} == {"accuracy", "loss"}
    assert hparams["head_epochs"].number_value == 6
    assert hparams["backbone"].string_value.endswith("small_cnn_digits0-4.keras")
    assert hparams["unfreeze"].string_value == "all"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_real_tensorboard_serves_the_scalar_tags(run):
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            f"--logdir={run / 'tensorboard'}",
            f"--port={port}",
            "--host=127.0.0.1",
            "--load_fast=false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline, tags = time.monotonic() + 60, {}
        while time.monotonic() < deadline and not (tags.get("train") and tags.get("eval")):
            try:
                url = f"http://127.0.0.1:{port}/data/plugin/scalars/tags"
                with urllib.request.urlopen(url, timeout=5) as response:
                    tags = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        assert {"loss", "accuracy", "gradient_norm", "learning_rate"} <= set(tags["train"])
        assert {"loss", "accuracy"} <= set(tags["eval"])
        # The HParams dashboard: this run's hyperparameters, and its eval scalars as metrics.
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/data/plugin/hparams/experiment",
            data=json.dumps({"experimentName": ""}).encode(),
            headers={"Content-Type": "application/json", "X-TensorBoard-Feature-Flags": "{}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            experiment = json.loads(response.read())
        names = {info["name"] for info in experiment["hparamInfos"]}
        assert {"backbone", "head_lr", "finetune_lr", "unfreeze", "seed"} <= names
        metrics = {(m["name"]["group"], m["name"]["tag"]) for m in experiment["metricInfos"]}
        assert {("eval", "accuracy"), ("eval", "loss")} <= metrics
    finally:
        os.kill(server.pid, signal.SIGKILL)
        server.wait()


def test_sigterm_flushes_the_writers_and_exits_143(tmp_path):
    workdir = tmp_path / "run"
    process = start_cli(
        *ARGS,
        "--head_epochs=100000",
        "--log_every_steps=1",
        "--profile_steps=",
        f"--workdir={workdir}",
    )
    try:
        deadline = time.monotonic() + 120
        jsonl = workdir / "metrics.jsonl"
        while time.monotonic() < deadline and (
            not jsonl.exists() or jsonl.read_text().count('"eval"') < 3
        ):
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 143, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr
    rows = [row for row in _jsonl(workdir) if row["kind"] == "train"]
    losses = _scalars(_events(workdir / "tensorboard/train"), "loss")
    assert len(rows) >= 3
    assert {row["step"] for row in rows} <= set(losses)


def test_image_helpers_shape_and_range():
    grid = image_grid(np.full((5, 4, 4, 3), 255.0))
    assert grid.shape == (3 * 5 + 1, 3 * 5 + 1, 3) and grid.max() == 1.0
    # Rows are labels, normalised by their count: cell (0, 0) is a full row (recall 1),
    # (0, 1) is 0, row 1 is half and half.
    heat = confusion_image([[2, 0], [1, 1]], cell=3)
    assert heat.shape == (6, 6, 3)
    brightness = heat.sum(axis=-1)
    assert heat[0, 3].tolist() == [1.0, 1.0, 1.0]  # 0: white
    assert brightness[0, 0] == brightness.min() < brightness[3, 0] < 3.0  # 1: darkest
    assert brightness[3, 0] == brightness[3, 3]  # the same share, the same colour
    assert np.all(heat[0, 0] < heat[3, 0])  # more recall, darker in every channel


def test_only_a_task_that_writes_summaries_profiles(tmp_path):
    phases = [tlloop.Phase("head", 1, 1e-3)]
    profiled = tlloop.LoggingConfig(profile_steps=(1, 2))
    trainer = tlloop.Trainer(str(tmp_path), phases=phases, logging=profiled)
    assert [type(a).__name__ for a in trainer.profiler(writes=True)] == ["Profiler"]
    assert trainer.profiler(writes=False) == []  # a non-chief task of a cluster writes nothing
    quiet = tlloop.Trainer(str(tmp_path), phases=phases)
    assert quiet.profiler(writes=True) == []


def test_a_fit_from_python_leaves_the_record_a_command_line_run_does(tmp_path, capfd):
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (12, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 2, 12).astype(np.int32)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(2, 3, name="conv")(inputs)
    backbone = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(x))
    model = tlloop.TransferModel(backbone, tlloop.classification_head(backbone, 2))
    workdir = tmp_path / "run"
    trainer = tlloop.Trainer(
        str(workdir),
        phases=[
            tlloop.Phase("head", 1, 3e-2),
            tlloop.Phase("finetune", 1, 1e-3, "all", bn_mode="train"),
        ],
        task=tlloop.Classification(class_names=("cat", "dog"), label_smoothing=0.1),
        training=tlloop.TrainingConfig(lr_schedule="cosine"),
        logging=tlloop.LoggingConfig(log_every_steps=0),
    )
    trainer.fit(model, (images, labels), (images[:4], labels[:4]), batch_size=4, export=False)
    # config.json: every argument, resolved (the best metric "auto" is the task's accuracy).
    record = json.loads((workdir / "config.json").read_text())
    assert [p["unfreeze"] for p in record["phases"]] == ["none", "all"]
    assert record["phases"][1]["bn_mode"] == "train" and record["phases"][0]["epochs"] == 1
    assert record["task"]["class"] == "Classification" and record["task"]["label_smoothing"] == 0.1
    assert record["task"]["best_metric"] == "accuracy:max" and record["class_names"] == [
        "cat",
        "dog",
    ]
    assert record["trainer"]["training"]["lr_schedule"] == "cosine"
    assert record["fit"] == {
        "batch_size": 4,
        "eval_batch_size": 4,
        "export": False,
        "train_size": 12,
        "eval_size": 4,
    }
    assert record["model"]["parameters"] == model.count_params()
    # TensorBoard: the HParams of those arguments and the record as a text, as flags.txt is.
    root = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
    root.Reload()
    records = [
        plugin_data_pb2.HParamsPluginData.FromString(c)
        for c in root.PluginTagToContent("hparams").values()
    ]
    (start,) = [r for r in records if r.HasField("session_start_info")]
    hparams = start.session_start_info.hparams
    assert hparams["finetune_bn_mode"].string_value == "train"
    assert hparams["head_lr"].number_value == pytest.approx(3e-2)
    assert hparams["lr_schedule"].string_value == "cosine"
    train = _events(workdir / "tensorboard/train")
    text = tensor_util.make_ndarray(train.Tensors("config")[0].tensor_proto).item().decode()
    assert json.loads(text.strip("`\n")) == record
    # The phases' mode tables and trainability reports, shown at absl's default verbosity.
    printed = capfd.readouterr().out
    assert printed.count("| step | augment | backbone | head |") == 2
    assert "finetune phase:" in printed
    assert "| train | training=True | training=True | training=True |" in printed  # bn_mode=train
