"""The command line's tasks: --task=multilabel and regression from --dataset=csv, and every
bad CSV or text input as one line naming the file and the line."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import StopAfter, flag_error, make_config, run_cli
from task_data import COLOURS, write_image_csvs
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tlloop.cli.config import DataConfig
from tlloop.cli.data import load_task_data
from tlloop.cli.experiment import build_experiment, train
from tlloop.cli.flags import flag_line
from tlloop.cli.saved_run import evaluate_saved
from tlloop.config import ConfigError
from tlloop.trainer import Stopped


@pytest.fixture(scope="module")
def csvs(tmp_path_factory) -> dict:
    return write_image_csvs(tmp_path_factory.mktemp("csv"), count=48)


def _config(workdir, **flags):
    defaults = {
        "dataset": "csv",
        "classes": "",
        "per_class": 0,
        "backbone": "small_cnn",
        "image_size": 16,
        "batch_size": 8,
        "head_epochs": 3,
        "head_lr": 3e-2,
        "finetune_epochs": 1,
        "finetune_lr": 1e-3,
    }
    return make_config(str(workdir), **{**defaults, **flags})


def test_multilabel_from_csv_through_the_command_line_path(tmp_path, csvs):
    config = _config(
        tmp_path / "run",
        task="multilabel",
        train_csv=csvs["train_csv"],
        val_csv=csvs["val_csv"],
        class_weights="auto",
        best_metric="macro_f1",
        threshold=0.4,
    )
    experiment = build_experiment(config)
    data = experiment.data
    assert data.class_names == ("blue", "green", "red")  # sorted labels of the training CSV
    cut = csvs["cut"]
    expected = csvs["labels"][:cut][:, [COLOURS.index(n) for n in data.class_names]]
    np.testing.assert_array_equal(data.train_examples.labels, expected)
    task = experiment.trainer().task.prepared(data.train_examples)
    positives = expected.sum(0)
    np.testing.assert_allclose(task.class_weights, (cut - positives) / positives, rtol=1e-6)
    assert task.threshold == 0.4
    results = train(experiment, config.workdir)
    assert results.best["metric"] == "macro_f1:max"
    assert set(results.phases[-1]["eval"]) == {"loss", "micro_f1", "macro_f1", "pr_auc", "examples"}
    # The HParams dashboard lists the task's scalar metrics.
    root = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    root.Reload()
    records = root.PluginTagToContent("hparams").values()
    (experiment_info,) = [
        r.experiment
        for r in map(plugin_data_pb2.HParamsPluginData.FromString, records)
        if r.HasField("experiment")
    ]
    tags = {m.name.tag for m in experiment_info.metric_infos}
    assert tags == {"micro_f1", "macro_f1", "pr_auc", "loss"}
    assert results.phases[-1]["eval"]["examples"] == 48 - cut
    served = tf.saved_model.load(results.export["saved_model"])
    out = served.signatures["serving_uint8"](images=tf.constant(csvs["images"][cut:]))
    probabilities = out["probabilities"].numpy()
    assert probabilities.shape == (48 - cut, 3)
    # tlloop.evaluate's path: the best checkpoint gives the best evaluation's value again.
    saved = evaluate_saved(config.workdir, "best", config)
    assert saved["macro_f1"] == pytest.approx(results.best["value"], abs=1e-6)
    names = served.signatures["class_names"]()["class_names"].numpy()
    for row, text in zip(probabilities, out["labels"].numpy(), strict=True):
        over = [n.decode() for n, p in zip(names, row, strict=True) if p > 0.4]
        assert text.decode() == ";".join(over)
    # tlloop.predict prints the labels over the threshold, then the most probable ones.
    image = tmp_path / "one.png"
    image.write_bytes(tf.io.encode_png(csvs["images"][cut]).numpy())
    done = run_cli(f"--workdir={config.workdir}", "--top_k=2", str(image), module="tlloop.predict")
    assert done.returncode == 0, done.stderr[-2000:]
    fields = done.stdout.strip().split("\t")
    assert fields[:2] == [str(image), f"labels={out['labels'].numpy()[0].decode()}"]
    top = np.argsort(-probabilities[0], kind="stable")[:2]
    assert [f.split()[0] for f in fields[2:]] == [names[i].decode() for i in top]


def test_regression_from_csv_predicts_in_the_targets_units(tmp_path, csvs):
    config = _config(
        tmp_path / "run",
        task="regression",
        regression_loss="huber",
        train_csv=csvs["train_targets"],
        val_csv=csvs["val_targets"],
        best_metric="root_mean_squared_error",
        head_epochs=6,
        head_lr=1e-1,
    )
    experiment = build_experiment(config)
    assert experiment.data.class_names == ("brightness", "red_share")
    results = train(experiment, config.workdir)
    assert results.best["metric"] == "root_mean_squared_error:min"
    cut, targets = csvs["cut"], csvs["targets"]
    constant = np.sqrt(np.mean((targets[cut:] - targets[:cut].mean(0)) ** 2))
    assert results.best["value"] < constant
    served = tf.saved_model.load(results.export["saved_model"]).signatures["serving_uint8"]
    predictions = served(images=tf.constant(csvs["images"][cut:]))["predictions"].numpy()
    rmse = np.sqrt(np.mean((predictions - targets[cut:]) ** 2))
    assert rmse == pytest.approx(results.best["value"], rel=1e-3)
    assert 150 < predictions[:, 0].mean() < 500  # brightness units, not standardised ones
    saved = evaluate_saved(config.workdir, "export", config)
    assert saved["root_mean_squared_error"] == pytest.approx(results.best["value"], rel=1e-5)
    with flag_error("--checkpoint='best': a regression run is evaluated"):
        evaluate_saved(config.workdir, "best", config)
    # tlloop.predict prints each target's value in its units; --top_k has nothing to rank.
    image = tmp_path / "one.png"
    image.write_bytes(tf.io.encode_png(csvs["images"][cut]).numpy())
    done = run_cli(f"--workdir={config.workdir}", str(image), module="tlloop.predict")
    assert done.returncode == 0, done.stderr[-2000:]
    path, *fields = done.stdout.strip().split("\t")
    assert path == str(image)
    values = [float(field.split()[1]) for field in fields]
    np.testing.assert_allclose(values, predictions[0], rtol=1e-4)
    refused = run_cli(
        f"--workdir={config.workdir}", "--top_k=2", str(image), module="tlloop.predict"
    )
    assert refused.returncode == 2
    assert "--top_k=2: a regression model has no classes to rank" in refused.stderr


def _write(path, text: str | bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode = "wb" if isinstance(text, bytes) else "w"
    with open(path, mode) as file:
        file.write(text)
    return str(path)


@pytest.mark.parametrize(
    ("task", "train", "val", "message"),
    [
        (
            "multilabel",
            "path,labels\nimages/000.png,red\nimages/nope.png,red\n",
            None,
            r"--train_csv='.*bad.csv' line 3: image file 'images/nope.png' does not exist",
        ),
        (
            "multilabel",
            "path,labels\nimages/000.png,red;blue\n",
            "path,labels\nimages/001.png,red\nimages/002.png,blue;cow\n",
            r"--val_csv='.*val_bad.csv' line 3: unknown label 'cow'; accepted: the labels of "
            r"--train_csv='.*': blue, red",
        ),
        (
            "classification",
            'path,labels\nimages/000.png,red\nimages/001.png,"green",blue\n',
            None,
            r"--train_csv='.*bad.csv' line 3: malformed row, 3 fields where the header has 2",
        ),
        (
            "regression",
            "path,brightness\nimages/000.png,12.5\nimages/001.png,bright\n",
            None,
            r"--train_csv='.*bad.csv' line 3: target 'brightness' is 'bright'; accepted: a finite",
        ),
        (
            "multilabel",
            "file,labels\nimages/000.png,red\n",
            None,
            r"--train_csv='.*bad.csv' line 1: header \['file', 'labels'\]; accepted: a header",
        ),
    ],
)
def test_a_bad_csv_is_one_line_naming_the_file_and_line(csvs, task, train, val, message):
    folder = os.path.dirname(csvs["train_csv"])
    flags = {"train_csv": _write(os.path.join(folder, "bad.csv"), train)}
    if val is not None:
        flags["val_csv"] = _write(os.path.join(folder, "val_bad.csv"), val)
    with flag_error(message) as error:
        load_task_data(DataConfig(dataset="csv", task=task, image_size=16, **flags))
    assert "\n" not in str(error.value)


def test_a_text_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    for name in ("a", "b"):
        os.makedirs(tmp_path / "texts" / name)
        _write(tmp_path / "texts" / name / "1.txt", "fine words\n")
    bad = _write(
        tmp_path / "texts" / "b" / "2.txt", "first line\nsecond caf\xe9\n".encode("latin-1")
    )
    config = DataConfig(dataset="text_folder", data_dir=str(tmp_path / "texts"), val_split=0.5)
    with pytest.raises(ConfigError) as error:
        load_task_data(config)
    assert flag_line(error.value).startswith(
        f"--data_dir: text file {bad!r} line 2: not UTF-8 text"
    )
    # A CSV of texts is read the same way.
    csv_path = _write(tmp_path / "texts.csv", b"text,label\nok,a\n\xff\xfe,b\n")
    with flag_error(r"--train_csv='.*texts.csv' line 3: not UTF-8 text"):
        load_task_data(DataConfig(dataset="csv", train_csv=csv_path))


def test_a_text_folder_is_walked_as_image_folders_are(tmp_path):
    root = tmp_path / "texts"
    for name in ("a", "b"):
        for i in range(3):
            _write(root / name / "deeper" / f"{i}.txt" if i else root / name / "0.txt", f"{i}")
    os.makedirs(root / ".ipynb_checkpoints")  # hidden: no class
    _write(root / "a" / ".0-checkpoint.txt", "hidden")
    _write(root / "b" / "notes.md", "not a .txt")
    data = load_task_data(DataConfig(dataset="text_folder", data_dir=str(root), val_split=0.34))
    assert data.class_names == ("a", "b")
    assert data.train_size + data.eval_size == 6  # the nested ones too, not the hidden one
    assert data.skipped_files == {
        str(root / "b" / "notes.md"): "not read: extension .md (read: .txt)"
    }


def test_the_command_line_refuses_a_bad_row_in_one_line_before_the_workdir(tmp_path, csvs):
    bad = _write(tmp_path / "bad.csv", "path,labels\nx.png,red\n")
    workdir = tmp_path / "run"
    done = run_cli(
        f"--workdir={workdir}",
        "--nosupervise",
        "--task=multilabel",
        "--dataset=csv",
        f"--train_csv={bad}",
        timeout=120,
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("tlloop: error:")]
    assert lines == [
        f"tlloop: error: --train_csv={bad!r} line 2: image file 'x.png' does not exist (looked "
        f"for {str(tmp_path / 'x.png')!r}); accepted: image paths relative to the CSV's folder "
        "or absolute"
    ]
    assert not workdir.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"task": "multilabel"}, "--task='multilabel': its labels or targets come from csv or "),
        (
            {"task": "regression", "dataset": "csv", "label_smoothing": 0.1},
            "--label_smoothing=0.1: applies to classification",
        ),
        (
            {"task": "regression", "dataset": "csv", "mixup": 0.2},
            "--mixup=0.2: mixing the losses of two targets is not the loss of a mixed target",
        ),
        (
            {"task": "multilabel", "dataset": "csv", "export_tflite": "float32"},
            "--export_tflite='float32': TFLite exports serve class probabilities",
        ),
    ],
)
def test_task_flags_that_do_not_combine_are_refused(tmp_path, csvs, flags, message):
    flags.setdefault("dataset", "digits")
    if flags["dataset"] == "csv":
        flags["train_csv"] = csvs["train_csv"]
    else:
        flags.update(classes="5-9")
    config = make_config(str(tmp_path), **{"classes": "", "per_class": 0, **flags})
    with flag_error(message.replace("(", r"\(")):
        build_experiment(config)


def test_results_name_the_csv_labels(tmp_path, csvs):
    # The evaluation-only load reads the same labels (what tlloop.evaluate uses).
    config = DataConfig(
        dataset="csv", task="multilabel", train_csv=csvs["train_csv"], val_csv=csvs["val_csv"]
    )
    data = load_task_data(config, evaluation_only=True)
    assert data.train_examples is None and data.eval_size == 48 - csvs["cut"]
    assert json.dumps(list(data.class_names)) == '["blue", "green", "red"]'


def test_a_csv_of_texts_loads_as_strings_with_its_classes(tmp_path):
    rows = "".join(f'"text {i}, with a comma",{"yes" if i % 2 else "no"}\n' for i in range(8))
    path = _write(tmp_path / "texts.csv", "text,label\n" + rows)
    data = load_task_data(DataConfig(dataset="csv", train_csv=path, val_split=0.25))
    assert data.class_names == ("no", "yes")
    assert data.train_size == 6 and data.eval_size == 2  # stratified: one of each class
    texts, labels = next(iter(data.eval_examples.ordered().batch(8)))
    assert texts.dtype == tf.string and sorted(labels.numpy().tolist()) == [0, 1]
    assert all(t.decode().endswith(", with a comma") for t in texts.numpy())


def test_a_killed_multilabel_run_resumes_to_the_uninterrupted_weights(tmp_path, csvs):
    flags = {
        "task": "multilabel",
        "train_csv": csvs["train_csv"],
        "val_csv": csvs["val_csv"],
        "best_metric": "micro_f1",
        "head_epochs": 1,
        "label_smoothing": 0.1,
        "deterministic": True,
        "export": "last",
    }
    whole = train(build_experiment(config := _config(tmp_path / "whole", **flags)), config.workdir)
    config = _config(tmp_path / "stopped", **flags)
    with pytest.raises(Stopped):  # mid-epoch, in the head phase
        train(build_experiment(config), config.workdir, stop=StopAfter(3))
    resumed = train(build_experiment(config), config.workdir)
    assert resumed.weights_sha256 == whole.weights_sha256
    assert resumed.phases[-1]["eval"] == whole.phases[-1]["eval"]


@pytest.mark.parametrize("kind", ["indices", "multi-hot"])
def test_multilabel_tfrecords_hold_label_lists_or_multi_hot_rows(tmp_path, kind):
    rows = [[0, 2], [], [1], [0, 1, 2], [2], [0]]

    def label(row):
        if kind == "indices":
            return tf.train.Feature(int64_list=tf.train.Int64List(value=row))
        hot = [float(i in row) for i in range(3)]
        return tf.train.Feature(float_list=tf.train.FloatList(value=hot))

    path = tmp_path / "train.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i, row in enumerate(rows):
            pixels = np.full((5, 5, 3), 40 * i, np.uint8)
            image = tf.train.BytesList(value=[tf.io.encode_png(pixels).numpy()])
            feature = {"image/encoded": tf.train.Feature(bytes_list=image), "y": label(row)}
            example = tf.train.Example(features=tf.train.Features(feature=feature))
            writer.write(example.SerializeToString())
    config = DataConfig(
        dataset="tfrecord",
        train_files=str(path),
        label_feature="y",
        task="multilabel",
        val_split=0.34,
        image_size=8,
        batch_size=2,
    )
    data = load_task_data(config)
    assert data.class_names == ("0", "1", "2")
    labels = np.concatenate([data.train_examples.labels, data.eval_examples.labels])
    assert labels.shape == (6, 3) and labels.dtype == np.float32
    expected = sorted(tuple(float(i in row) for i in range(3)) for row in rows)
    assert sorted(map(tuple, labels.tolist())) == expected


def test_a_multilabel_run_on_two_replicas_evaluates_as_one_replica_does(tmp_path, csvs):
    workdir = tmp_path / "run"
    done = run_cli(
        "--task=multilabel",
        "--dataset=csv",
        f"--train_csv={csvs['train_csv']}",
        f"--val_csv={csvs['val_csv']}",
        "--backbone=small_cnn",
        "--weights=none",
        "--image_size=16",
        "--batch_size=8",
        "--eval_batch_size=6",  # 48 - cut evaluation rows: the last batch is padded
        "--head_epochs=2",
        "--finetune_epochs=0",
        "--best_metric=micro_f1",
        "--strategy=mirrored",
        "--logical_devices=2",
        "--quiet",
        f"--workdir={workdir}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    two = results["phases"][-1]["eval"]
    assert results["replicas"] == 2 and two["examples"] == 48 - csvs["cut"]
    # The same weights evaluated by one replica: every example counted once, the same values.
    single = run_cli(f"--workdir={workdir}", "--checkpoint=latest", module="tlloop.evaluate")
    assert single.returncode == 0, single.stderr[-2000:]
    one = json.loads(single.stdout)
    for name in ("loss", "micro_f1", "macro_f1", "pr_auc", "examples"):
        assert one[name] == pytest.approx(two[name], abs=1e-5), name
