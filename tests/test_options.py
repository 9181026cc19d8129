"""No option that cannot act, no default that refuses itself: every flag a run would not read is
refused in one line naming it (only when given with a value of its own), a default follows the
task, and what the library's Trainer does not apply it refuses, naming what does."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import flag_error, make_config
from task_data import write_image_csvs

import tlloop
from tlloop import config as config_lib
from tlloop.cli import config as cli_config
from tlloop.cli import flags as tlloop_flags
from tlloop.cli.experiment import build_experiment, check_task

TEXTS = {"dataset": "text_folder", "data_dir": "texts"}
MULTI_HOT = {"dataset": "tfrecord", "train_files": "r.tfrecord", "task": "multilabel"}
TARGETS = {"dataset": "csv", "train_csv": "t.csv", "task": "regression"}


# (the run's flags, the flag it does not read and its value, whether the examples are texts)
UNREAD = [
    *(
        (TEXTS, flag, value, True)
        for flag, value in (
            ("backbone_layer", "pool"),
            ("backbone_range", "0:1"),
            ("backbone_channels", "grayscale"),
            ("resize", "crop"),
            ("image_size", 64),
            ("bad_images", "skip"),
            ("mixed_precision", "bfloat16"),  # a text model is built in float32: no effect
            ("mixed_precision", "float16"),  # only a loss scaler and a relaxed NaN check
        )
    ),
    ({}, "threshold", 0.3, False),
    ({**MULTI_HOT}, "regression_loss", "huber", False),
    ({"dataset": "csv", "train_csv": "c.csv"}, "label_delimiter", "|", False),
    ({**MULTI_HOT}, "label_delimiter", "|", False),
    ({}, "image_feature", "jpeg", False),
    ({}, "tfds_dir", "tfds", False),
    ({}, "tflite_min_agreement", 0.5, False),
    ({}, "tflite_min_agreement_int8", 0.5, False),
    ({}, "tflite_calibration_images", 10, False),
    ({**MULTI_HOT}, "classes", "0-1", False),
    ({**MULTI_HOT}, "train_examples_per_class", 5, False),
    ({**TARGETS}, "classes", "a,b", False),
    ({**TARGETS}, "train_examples_per_class", 5, False),
]


@pytest.mark.parametrize(
    ("run", "flag", "value", "text"), UNREAD, ids=[f"{c[1]}={c[2]}" for c in UNREAD]
)
def test_a_flag_the_run_does_not_read_is_refused_in_one_line(run, flag, value, text):
    config = cli_config.from_flags({"workdir": "w", **run, flag: value})
    with flag_error(
        rf"^--{flag}=.*: this run does not read it: .*; "
        rf"accepted: no --{flag}$",
    ):
        check_task(config, text)
    # Left out, or given at its default (a flags.txt lists every flag), it is accepted.
    check_task(cli_config.from_flags({"workdir": "w", **run}), text)
    everything = cli_config.flag_values(cli_config.from_flags({"workdir": "w", **run}))
    check_task(cli_config.from_flags(everything), text)
    # A config made in Python is read the same way: its values that differ from the defaults.
    made = cli_config.from_flags({"workdir": "w", **run, flag: value})
    object.__setattr__(made, "given", None)
    with flag_error(rf"^--{flag}="):
        check_task(made, text)


@pytest.mark.parametrize(
    ("run", "flag", "value"),
    [
        ({**MULTI_HOT}, "threshold", 0.3),
        ({**TARGETS}, "regression_loss", "huber"),
        ({"dataset": "csv", "train_csv": "c.csv", "task": "multilabel"}, "label_delimiter", "|"),
        ({"dataset": "csv", "train_csv": "c.csv", "task": "multilabel"}, "classes", "a,b"),
        ({"dataset": "tfrecord", "train_files": "r"}, "image_feature", "jpeg"),
        ({"dataset": "tfds:mnist"}, "tfds_dir", "tfds"),
        ({"backbone_layer": "-2"}, "image_size", 64),
    ],
)
def test_the_same_flags_are_accepted_where_they_act(run, flag, value):
    check_task(cli_config.from_flags({"workdir": "w", **run, flag: value}), False)


def test_bn_mode_train_with_nothing_unfrozen_is_refused():
    # The default mode table runs the backbone in training mode only when something trains.
    with flag_error(r"^--bn_mode='train': with --unfreeze=none no backbo"):
        cli_config.from_flags({"workdir": "w", "bn_mode": "train", "unfreeze": "none"})
    with flag_error(r"^--bn_mode='train': with --unfreeze=none"):
        tlloop.Phase("finetune", 1, 1e-3, "none", bn_mode="train")


def test_a_multilabel_or_regression_run_with_every_other_flag_left_alone_starts(tmp_path):
    csvs = write_image_csvs(tmp_path / "csv", count=12)
    for task, train in (("multilabel", "train_csv"), ("regression", "train_targets")):
        config = make_config(
            str(tmp_path / task),
            dataset="csv",
            classes="",
            per_class=0,
            task=task,
            train_csv=csvs[train],
            image_size=16,
            backbone="small_cnn",
        )
        # The default best metric is auto (the task's own): not refused as "no accuracy".
        assert config.checkpoint.best_metric == config_lib.BestMetric("auto")
        assert build_experiment(config).config.checkpoint.best_metric.name == "auto"


@pytest.mark.parametrize(
    "training",
    [tlloop.TrainingConfig(label_smoothing=0.1), tlloop.TrainingConfig(class_weights="auto")],
    ids=["label_smoothing", "class_weights"],
)
def test_the_trainer_refuses_loss_options_its_task_applies_naming_the_task_argument(
    tmp_path, training
):
    name = "label_smoothing" if training.label_smoothing else "class_weights"
    trainer = tlloop.Trainer(
        str(tmp_path / "run"), phases=[tlloop.Phase("h", 1, 1e-3)], training=training
    )
    images = np.zeros((4, 8, 8, 3), np.float32)
    data = (images, np.zeros(4, np.int32))
    with pytest.raises(
        ValueError,
        match=rf"^training.{name}=.*: the task's loss applies it, "
        rf"not the trainer; accepted: Classification\({name}=",
    ):
        trainer.fit(_tiny_model(), data, data)
    assert not (tmp_path / "run").exists()


def _tiny_model() -> tlloop.TransferModel:
    inputs = keras.Input((8, 8, 3))
    backbone = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    return tlloop.TransferModel(backbone, tlloop.classification_head(backbone, 2))


def test_every_flag_in_the_unread_table_is_a_flag():
    assert {flag for _, flag, _, _ in UNREAD} <= set(tlloop_flags.FLAG_NAMES)
