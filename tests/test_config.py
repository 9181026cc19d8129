"""Configuration: parsing, validation messages, flags round trip, the mode table, atomic writes."""

from __future__ import annotations

import dataclasses

import pytest
from absl import flags

from tlloop import config as config_lib
from tlloop import flags as tlloop_flags
from tlloop.config import ConfigError, Unfreeze, parse_augment, parse_classes
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
    with pytest.raises(ConfigError, match=r"^--unfreeze=.*accepted: all, none, top:N"):
        Unfreeze.parse(spec)


def test_augment_specs_parse_and_refuse():
    ops = parse_augment("flip, rotate:0.1,zoom:0.2")
    assert [(op.name, op.factor) for op in ops] == [("flip", 0.0), ("rotate", 0.1), ("zoom", 0.2)]
    assert parse_augment("") == ()
    for bad in ("blur", "rotate", "rotate:2", "rotate:x", "flip:0.5", "zoom:0"):
        with pytest.raises(ConfigError, match=r"^--augment=.*accepted"):
            parse_augment(bad)


def test_classes_expand_ranges_and_refuse_repeats():
    assert parse_classes("5-7,cat") == ("5", "6", "7", "cat")
    assert parse_classes("") == ()
    with pytest.raises(ConfigError, match="--classes"):
        parse_classes("1,1")
    with pytest.raises(ConfigError, match="--classes"):
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
    with pytest.raises(ConfigError, match=f"^{flag}="):
        config_lib.DataConfig(**changes)


def test_phase_config_names_its_own_flags():
    with pytest.raises(ConfigError, match=r"^--finetune_lr="):
        config_lib.PhaseConfig("finetune", 1, 0.0, Unfreeze("all"))
    with pytest.raises(ConfigError, match=r"^--head_epochs="):
        config_lib.PhaseConfig("head", -1, 1e-3, Unfreeze("none"))


def _parse(argv: list[str]) -> config_lib.RunConfig:
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
    config = config_lib.DataConfig()
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
