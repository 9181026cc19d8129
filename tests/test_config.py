"""Configuration: parsing, validation messages, flags round trip, the mode table, atomic writes."""

from __future__ import annotations

import dataclasses
import importlib.util
import re

import pytest
from absl import flags
from conftest import flag_error

from tlloop import config as config_lib
from tlloop.cli import config as cli_config
from tlloop.cli import flags as tlloop_flags
from tlloop.cli.config import parse_classes
from tlloop.config import Unfreeze, parse_augment
from tlloop.models.modes import INFERENCE, Modes, ModeTable
from tlloop.workdir import write_atomic, write_text


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("all", Unfreeze("all")), ("none", Unfreeze("none")), ("top:3", Unfreeze("top", 3))],
)
def test_unfreeze_policies_parse(spec, expected):
    assert Unfreeze.parse(spec) == expected
    assert str(expected) == spec


@pytest.mark.parametrize("spec", ["", "top", "top:", "top:0", "top:-1", "bottom:2", "ALL"])
def test_bad_unfreeze_policies_name_the_flag(spec):
    with flag_error(r"^--unfreeze=.*accepted: all, none, top:N"):
        Unfreeze.parse(spec)


def test_augment_specs_parse_and_refuse():
    ops = parse_augment("flip, rotate:0.1,zoom:0.2")
    assert [(op.name, op.factor) for op in ops] == [("flip", 0.0), ("rotate", 0.1), ("zoom", 0.2)]
    assert parse_augment("") == ()
    for bad in ("blur", "rotate", "rotate:2", "rotate:x", "flip:0.5", "zoom:0"):
        with flag_error(r"^--augment=.*accepted"):
            parse_augment(bad)


def test_classes_expand_ranges_and_refuse_repeats():
    assert parse_classes("5-7,cat") == ("5", "6", "7", "cat")
    assert parse_classes("") == ()
    with flag_error("--classes"):
        parse_classes("1,1")
    with flag_error("--classes"):
        parse_classes("9-5")


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"val_split": 1.0}, "--val_split"),
        ({"val_split": 0.0}, "--val_split"),
        ({"image_size": 4}, "--image_size"),
        ({"batch_size": 0}, "--batch_size"),
        ({"train_examples_per_class": -1}, "--train_examples_per_class"),
        ({"dataset": "folder"}, "--data_dir"),
    ],
)
def test_data_config_messages_name_the_flag(changes, flag):
    with flag_error(f"^{flag}="):
        cli_config.DataConfig(**changes)


def test_phase_config_names_its_own_flags():
    with flag_error(r"^--finetune_lr="):
        config_lib.PhaseConfig("finetune", 1, 0.0, Unfreeze("all"))
    with flag_error(r"^--head_epochs="):
        config_lib.PhaseConfig("head", -1, 1e-3, Unfreeze("none"))


def _parse(argv: list[str]) -> cli_config.RunConfig:
    values = flags.FlagValues()
    tlloop_flags.define_flags(values)
    values(["tlloop", *argv])
    return values


def test_flags_txt_reproduces_the_same_config(tmp_path):
    values = _parse(["--workdir=w", "--unfreeze=top:2", "--classes=5-9", "--augment=flip"])
    config = tlloop_flags.to_config(values)
    assert config.phases[1].unfreeze == Unfreeze("top", 2)
    assert config.data.classes == ("5", "6", "7", "8", "9")
    path = tmp_path / "flags.txt"
    path.write_text(tlloop_flags.flags_text(values))
    assert tlloop_flags.to_config(_parse([f"--flagfile={path}"])) == config


def test_config_is_frozen():
    config = cli_config.DataConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 3


def test_mode_table_defaults_and_text():
    table = ModeTable()
    assert table.row("train") == Modes(augment=True, backbone=False, head=True)
    assert table.row("eval") == table.row("predict") == INFERENCE
    assert table.with_backbone_training(True).train.backbone is True
    assert "| train | training=True | training=False | training=True |" in table.to_text()
    with pytest.raises(ValueError, match="training=False"):
        ModeTable(eval=Modes(True, False, False))
    with pytest.raises(ValueError, match="unknown step kind"):
        table.row("serve")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "results.json"
    write_text(str(path), "old")

    def failing(tmp: str) -> None:
        with open(tmp, "w") as file:
            file.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(str(path), failing)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


# Each option is defined once, on its config field; the flags are made from those fields.


def _option_fields(kind: type = cli_config.RunConfig) -> list[str]:
    """'owner.field' of every option field under `kind`; fails on a field that is neither an
    option, a follower of another option's flag, nor a section of options."""
    found = []
    for field in dataclasses.fields(kind):
        meta = field.metadata
        if config_lib._OPTION in meta:
            found.append(f"{kind.__name__}.{field.name}")
        elif cli_config._SECTION in meta:
            found += _option_fields(meta[cli_config._SECTION].kind)
        else:
            known = cli_config._FOLLOWS in meta or cli_config._GIVEN in meta
            assert known, f"{kind.__name__}.{field.name} has no flag"
    return found


def test_every_option_has_exactly_one_flag_and_every_flag_one_option():
    values = flags.FlagValues()
    tlloop_flags.define_flags(values)
    defined = [name for name in values if name not in flags.FlagValues()]
    options = cli_config.options()
    assert len(options) == len(_option_fields()) == len(defined) == len(set(defined))
    assert [option.flag for option in options] == list(tlloop_flags.FLAG_NAMES)
    assert set(defined) == set(tlloop_flags.FLAG_NAMES)
    # A flag that feeds two fields does so through one option and its followers.
    assert "image_size" in defined and "seed" in defined


def test_flag_defaults_are_the_dataclass_defaults():
    values = _parse(["--workdir=w"])
    for option in cli_config.options():
        flag = values[option.flag]
        assert flag.default == option.default, option.flag
        words = tlloop_flags.help_text(option)  # `$name` references as --flags
        assert flag.help == words or flag.help.endswith(words), option.flag
    assert tlloop_flags.to_config(values) == cli_config.RunConfig(workdir="w")
    assert values["workdir"].default is None  # required: the entry points mark it so


def test_flag_types_follow_the_defaults():
    values = _parse(["--workdir=w"])
    assert isinstance(values["devices"].parser, flags.ListParser)
    assert isinstance(values["batch_size"].parser, flags.IntegerParser)
    assert isinstance(values["cluster_timeout_secs"].parser, flags.FloatParser)
    assert isinstance(values["classes"].parser, flags.ArgumentParser)
    assert values["optimizer"].parser.enum_values == list(config_lib.OPTIMIZERS)
    assert values["feature_cache"].parser.enum_values == ["auto", "off"]
    assert values["mixed_precision"].parser.__class__ is flags.ArgumentParser  # a string flag
    with pytest.raises(flags.IllegalFlagValueError, match=re.escape("<auto|off>")):
        _parse(["--workdir=w", "--feature_cache=sometimes"])


def test_evaluate_takes_only_the_flags_that_choose_evaluation_data():
    assert set(tlloop_flags.DATA_FLAGS) == {
        "dataset",
        "data_dir",
        "val_dir",
        "train_files",
        "val_files",
        "image_feature",
        "label_feature",
        "tfds_dir",
        "val_split",
        "classes",
        "bad_images",
        "eval_batch_size",
        "train_csv",
        "val_csv",
        "label_delimiter",
    }
    values = flags.FlagValues()
    tlloop_flags.define_flags(values, only=tlloop_flags.DATA_FLAGS)
    assert set(values) - set(flags.FlagValues()) == set(tlloop_flags.DATA_FLAGS)


# Configs that between them set every option to something other than its default.
CHANGED = [
    {
        "workdir": "w",
        "overwrite": True,
        "seed": 3,
        "dataset": "folder",
        "data_dir": "images",
        "val_dir": "held_out",
        "val_split": 0.25,
        "classes": "5-7,cat",
        "train_examples_per_class": 4,
        "bad_images": "skip",
        "resize": "pad",
        "image_size": 48,
        "batch_size": 8,
        "eval_batch_size": 5,
        "backbone": "MobileNetV2",
        "weights": "none",
        "dropout": 0.5,
        "augment": "flip,rotate:0.1,crop:0.125",
        "unsafe_deserialization": True,
        "init_checkpoint": "runs/donor",
        "mixed_precision": "bfloat16",
        "head_epochs": 2,
        "head_lr": "0.03",  # rate flags are text: a number or auto
        "finetune_epochs": 7,
        "finetune_lr": "0.0003",
        "unfreeze": "blocks:3",
        "unfreeze_schedule": "gradual:1",
        "bn_mode": "train",
        "optimizer": "adamw",
        "weight_decay": 0.05,
        "lr_schedule": "cosine",
        "warmup_steps": 10,
        "clip_grad_norm": 1.5,
        "grad_accum_steps": 2,
        "label_smoothing": 0.1,
        "layer_lr_decay": 0.8,
        "ema_decay": 0.999,
        "class_weights": "auto",
        "strategy": "mirrored",
        "devices": ["/gpu:0", "/gpu:1"],
        "logical_devices": 2,
        "logical_device_memory_mb": 512,
        "cluster_timeout_secs": 30.5,
        "log_every_steps": 1,
        "histogram_every_steps": 5,
        "profile_steps": "2,4",  # (a profile needs summaries on)
        "supervise": False,
        "quiet": True,
        "checkpoint_every_steps": 3,
        "checkpoint_every_secs": 0.0,
        "keep_checkpoints": 9,
        "best_metric": "loss",
        "early_stopping_patience": 2,
        "export": "last",
        "export_tflite": ["dynamic", "int8"],
        "tflite_min_agreement": 0.95,
        "tflite_min_agreement_int8": 0.9,
        "tflite_calibration_images": 64,
        "nan_policy": "skip_step",
        "deterministic": True,
        "jit_compile": True,
        "feature_cache": "off",
        "steps_per_loop": "4",
    },
    {
        "workdir": "w2",
        "summaries": False,
        "max_restarts": 2,
        "dataset": "tfrecord",
        "train_files": "a/*.tfrecord,b/*.tfrecord",
        "val_files": "c/*.tfrecord",
        "data_memory": "0",
        "data_cache": "cache",
        "image_feature": "jpeg",
        "label_feature": "label",
        "warmup_epochs": 1,
        "best_metric": "accuracy:min",
        "unfreeze": "regex:^block_1[56]_",
        "backbone": "classifier.h5",
        "backbone_layer": "-2",
        "backbone_channels": "grayscale",
        "backbone_range": "-1:1",
        "mixup": 0.2,
        "cutmix": 1.0,
        "mix_prob": 0.5,
        "wise_ft": ["0.0", "0.5", "1.0"],
        "wise_ft_export": "0.5",
        "l2sp": 0.01,
        "l2sp_head": 0.001,
    },
    {
        "workdir": "w3",
        "dataset": "tfds:mnist",
        "tfds_dir": "tfds",
        "mixed_precision": "float16",
        "recipe": "guide",
    },
    {
        "workdir": "w4",
        "dataset": "csv",
        "train_csv": "train.csv",
        "val_csv": "val.csv",
        "label_delimiter": "|",
        "task": "multilabel",
        "threshold": 0.3,
        "regression_loss": "huber",
        "head_lr": "auto",
    },
]


def test_every_option_is_changed_by_some_round_trip_case():
    changed = set().union(*CHANGED)
    assert changed == set(tlloop_flags.FLAG_NAMES)
    defaults = {option.flag: option.default for option in cli_config.options()}
    for case in CHANGED:
        for name, value in case.items():
            assert value != defaults[name], name


# --export_tflite is refused without the LiteRT interpreter (the tflite extra) that checks it.
_NO_LITERT = pytest.mark.skipif(
    importlib.util.find_spec("ai_edge_litert") is None,
    reason="--export_tflite needs the tflite extra (ai-edge-litert)",
)


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(v, id=v["workdir"], marks=[_NO_LITERT] if "export_tflite" in v else [])
        for v in CHANGED
    ],
)
def test_flags_txt_of_a_config_parses_back_to_an_equal_config(tmp_path, values):
    config = cli_config.from_flags(values)
    assert cli_config.flag_values(config) == {
        **{option.flag: option.default for option in cli_config.options()},
        **values,
        "classes": ",".join(config.data.classes),  # 5-7 expanded
        "augment": "flip,rotate:0.1,crop:0.125" if "augment" in values else "",
    }
    path = tmp_path / "flags.txt"
    path.write_text(tlloop_flags.flags_text(config))
    assert tlloop_flags.to_config(_parse([f"--flagfile={path}"])) == config


def test_flags_feeding_two_fields_set_both():
    config = cli_config.from_flags({"workdir": "w", "image_size": 48, "seed": 5})
    assert config.data.image_size == config.model.image_size == 48
    assert config.data.seed == config.seed == 5
    with flag_error(r"^--seed=5: data and run disagree"):
        dataclasses.replace(config, data=dataclasses.replace(config.data, seed=0))


def test_phase_flags_become_two_phases_and_read_back():
    config = cli_config.from_flags(
        {"workdir": "w", "head_epochs": 0, "unfreeze": "top:2", "unfreeze_schedule": "gradual:1"}
    )
    head, finetune = config.phases
    assert (head.name, head.epochs, head.unfreeze) == ("head", 0, Unfreeze("none"))
    assert (finetune.unfreeze, finetune.gradual) == (Unfreeze("top", 2), 1)
    assert cli_config.TwoPhases.of(config.phases).to_phases() == config.phases
    # A plan with only a fine-tune phase (as the benchmarks make) reads as --head_epochs=0.
    assert cli_config.TwoPhases.of((finetune,)).head_epochs == 0
    with pytest.raises(ValueError, match="head and a finetune"):
        cli_config.TwoPhases.of((dataclasses.replace(finetune, name="warmup"),))


def test_unknown_names_are_not_flags():
    with flag_error(r"\['per_class'\]: not tlloop flags"):
        cli_config.from_flags({"workdir": "w", "per_class": 3})


def test_feature_cache_takes_auto_or_off_only():
    def run(feature_cache: str) -> cli_config.RunConfig:
        head = config_lib.PhaseConfig("head", 1, 1e-3, Unfreeze("none"))
        return cli_config.RunConfig(
            workdir="w",
            data=cli_config.DataConfig(),
            model=cli_config.ModelConfig(),
            phases=(head,),
            feature_cache=feature_cache,
        )

    assert run("off").feature_cache == "off"
    with flag_error(r"^--feature_cache='always': unknown; accepted: auto, off$"):
        run("always")


def test_gradual_unfreezing_of_nothing_is_refused_naming_both_flags():
    with flag_error(r"^--unfreeze_schedule='gradual:2': with --unfreeze=none .*accepted"):
        cli_config.from_flags(
            {"workdir": "w", "unfreeze": "none", "unfreeze_schedule": "gradual:2"}
        )
    # Either alone is fine.
    cli_config.from_flags({"workdir": "w", "unfreeze": "none"})
    cli_config.from_flags({"workdir": "w", "unfreeze": "top:1", "unfreeze_schedule": "gradual:2"})


@pytest.mark.parametrize("dataset", ["digits", "tfrecord", "tfds:mnist"])
def test_val_dir_is_refused_where_the_dataset_does_not_read_it(dataset):
    extra = {"train_files": "x.tfrecord"} if dataset == "tfrecord" else {}
    with flag_error(
        rf"^--val_dir='held_out': --dataset={dataset} does not read it; accepted: "
        r"--val_dir only with --dataset=folder or text_folder$",
    ):
        cli_config.DataConfig(dataset=dataset, val_dir="held_out", val_split=0.0, **extra)
    with flag_error(r"^--val_files=.*only with --dataset=tfrecord$"):
        cli_config.DataConfig(dataset="folder", data_dir="d", val_files="x.tfrecord")


def test_val_split_zero_needs_the_evaluation_data_the_dataset_reads():
    folder = cli_config.DataConfig(dataset="folder", data_dir="d", val_dir="v", val_split=0.0)
    assert folder.val_split == 0.0
    records = {"dataset": "tfrecord", "train_files": "t.tfrecord", "val_split": 0.0}
    assert cli_config.DataConfig(**records, val_files="v.tfrecord").val_files == "v.tfrecord"
    with flag_error(r"^--val_split=0.0: no evaluation data without --val_files"):
        cli_config.DataConfig(**records)
    with flag_error(r"^--val_split=0.0: no evaluation data; accepted: 0 < x"):
        cli_config.DataConfig(dataset="tfds:mnist", val_split=0.0)


@pytest.mark.parametrize(
    ("spec", "name", "direction"),
    [
        ("accuracy", "accuracy", "max"),
        ("loss", "loss", "min"),
        ("top5_accuracy", "top5_accuracy", "max"),
        ("val/cross_entropy_loss", "val/cross_entropy_loss", "min"),
        ("mean_error", "mean_error", "min"),
        ("f1", "f1", "max"),
        ("f1:min", "f1", "min"),
        ("loss:max", "loss", "max"),
    ],
)
def test_best_metric_takes_any_metric_name_with_a_natural_direction(spec, name, direction):
    metric = config_lib.BestMetric.parse(spec)
    assert (metric.name, metric.direction) == (name, direction)
    assert config_lib.BestMetric.parse(metric.to_flag()) == metric
    assert metric.better(0.5, 0.4) is (direction == "max")
    # Made in Python with the name alone, the direction is the same as the flag's.
    assert config_lib.BestMetric(name) == config_lib.BestMetric.parse(name)


@pytest.mark.parametrize(
    ("name", "direction"),
    [("loss", "min"), ("val_loss", "min"), ("root_mean_squared_error", "min"), ("pr_auc", "max")],
)
def test_a_best_metric_made_in_python_keeps_the_lowest_loss(name, direction):
    metric = config_lib.BestMetric(name)
    assert metric.direction == direction
    assert metric.better(0.3, 0.4) is (direction == "min")
    assert config_lib.BestMetric(name, "max").direction == "max"  # given: kept


def test_the_default_best_metric_is_the_tasks_own():
    metric = config_lib.CheckpointConfig().best_metric
    assert metric == config_lib.BestMetric.parse("auto") and metric.to_flag() == "auto"
    assert metric.resolved(("micro_f1", "max")) == config_lib.BestMetric("micro_f1", "max")
    assert config_lib.BestMetric("loss").resolved(("micro_f1", "max")).name == "loss"
    with flag_error(r"^--best_metric='auto:min': auto's direction"):
        config_lib.BestMetric.parse("auto:min")


@pytest.mark.parametrize("spec", ["", "top-5", "f1 score", ":max", "loss:up", "loss:"])
def test_malformed_best_metric_is_refused(spec):
    with flag_error(r"^--best_metric=.*accepted: a metric name"):
        config_lib.BestMetric.parse(spec)


TRAINING_HPARAMS = {
    "optimizer": "sgd",
    "weight_decay": 0.01,
    "lr_schedule": "cosine",
    "warmup_steps": 5,
    "ema_decay": 0.99,
    "layer_lr_decay": 0.5,
    "label_smoothing": 0.1,
    "grad_accum_steps": 2,
    "clip_grad_norm": 1.0,
    "mixed_precision": "bfloat16",
    "unfreeze_schedule": "gradual:2",
    "class_weights": "auto",
    "unfreeze": "top:2",
    "best_metric": "loss",
    "augment": "flip,zoom:0.2",
}


def test_hparams_hold_every_training_setting_as_flat_values():
    base = cli_config.hparams(cli_config.RunConfig(workdir="w"))
    assert set(TRAINING_HPARAMS) <= set(base)
    assert {"workdir", "overwrite", "quiet", "summaries", "log_every_steps", "devices"}.isdisjoint(
        base
    )
    assert {"checkpoint_every_steps", "checkpoint_every_secs", "cluster_timeout_secs"}.isdisjoint(
        base
    )
    assert all(isinstance(value, str | int | float | bool) for value in base.values())
    assert base["unfreeze"] == "all" and base["head_epochs"] == 5 and base["best_metric"] == "auto"
    for name, value in TRAINING_HPARAMS.items():
        changed = cli_config.hparams(cli_config.from_flags({"workdir": "w", name: value}))
        assert changed[name] == value
        assert {key for key in base if base[key] != changed[key]} == {name}


def test_hparams_of_a_plan_without_a_head_phase():
    config = cli_config.from_flags({"workdir": "w", "head_epochs": 0})
    finetune_only = dataclasses.replace(config, phases=config.phases[1:])
    assert cli_config.hparams(finetune_only) == cli_config.hparams(config)


@pytest.mark.parametrize(
    "make, library, command_line",
    [
        (
            lambda: config_lib.LoggingConfig(summaries=False, profile_steps=(1, 2)),
            "profile_steps='1,2': nosummaries writes nothing, a profile neither; accepted: no "
            "profile_steps with nosummaries",
            "--profile_steps='1,2': --nosummaries writes nothing, a profile neither; accepted: "
            "no --profile_steps with --nosummaries",
        ),
        (
            lambda: config_lib.TrainingConfig(mix_prob=0.5),
            "mix_prob=0.5: there is no mixup or cutmix to apply",
            "--mix_prob=0.5: there is no --mixup or --cutmix to apply",
        ),
        (
            lambda: config_lib.PhaseConfig("finetune", 1, 1e-3, gradual=2),
            "unfreeze_schedule='gradual:2': with unfreeze=none no backbone layer would ever train",
            "--unfreeze_schedule='gradual:2': with --unfreeze=none no backbone layer would ever",
        ),
        (
            lambda: config_lib.CheckpointConfig(wise_ft=(0.5,), wise_ft_export=0.25),
            "wise_ft_export=0.25: not among wise_ft=0.5; accepted: best, or one of wise_ft's",
            "--wise_ft_export=0.25: not among --wise_ft=0.5; accepted: best, or one of --wise_ft's",
        ),
    ],
    ids=["nosummaries", "mix_prob", "gradual", "wise_ft_export"],
)
def test_the_library_options_speak_in_arguments_and_the_command_line_in_flags(
    make, library, command_line
):
    with pytest.raises(config_lib.ConfigError) as caught:
        make()
    assert str(caught.value).startswith(library), str(caught.value)
    assert "--" not in str(caught.value)
    assert tlloop_flags.flag_line(caught.value).startswith(command_line)
