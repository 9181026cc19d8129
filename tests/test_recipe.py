"""--recipe: guide keeps today's defaults; auto follows the docs' Defaults table; given wins."""

from __future__ import annotations

import json
import os
import re

import pytest
from absl import flags
from conftest import PRETRAINED, REPO, flag_error, run_cli

from tlloop import config as config_lib
from tlloop.cli import config as cli_config
from tlloop.cli import flags as tlloop_flags
from tlloop.cli import recipe as recipe_lib

# Today's defaults: the Keras transfer-learning guide's numbers, as the flags held them
# before the recipe (written out, not read from the code they check).
GUIDE = {
    "head_epochs": 5,
    "head_lr": 1e-3,
    "finetune_epochs": 5,
    "finetune_lr": 1e-5,
    "unfreeze": "all",
    "bn_mode": "frozen",
    "optimizer": "adam",
    "lr_schedule": "constant",
    "warmup_steps": 0,
    "warmup_epochs": 0,
    "augment": "",
    "label_smoothing": 0.0,
    "ema_decay": 0.0,
    "mixup": 0.0,
    "cutmix": 0.0,
    "mix_prob": 1.0,
    "weight_decay": 0.0,
    "dropout": 0.2,
}
BACKBONES = {  # a --backbone value of each kind
    "application": "MobileNetV2",
    "file": "pretrained.keras",
    "small_cnn": "small_cnn",
    "hub": "hf://keras/vit_base_patch16_224_imagenet",
}


def _resolve(values: dict, examples: int, classes: int):
    config = cli_config.from_flags({"workdir": "w", **values})
    return recipe_lib.resolve(config, examples, classes)


@pytest.mark.parametrize("examples", [25, 5_000, 100_000])
@pytest.mark.parametrize("kind", list(BACKBONES))
def test_recipe_guide_gives_todays_defaults(examples, kind):
    resolved, recipe = _resolve({"recipe": "guide", "backbone": BACKBONES[kind]}, examples, 10)
    values = _flag_values(resolved)
    assert {name: values[name] for name in GUIDE} == GUIDE
    assert recipe.chosen == {} and recipe.name == "guide"


def _readme_table() -> list[list[str]]:
    with open(os.path.join(REPO, "docs", "defaults.md"), encoding="utf-8") as file:
        page = file.read()
    section = page.split("# Defaults", 1)[1].split("\n## ", 1)[0]
    assert recipe_lib.table_markdown() in section  # the Defaults page shows the code's table
    rows = [line for line in section.splitlines() if line.startswith("| `--")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def _parse_cell(text: str, kind: str, classes: int, steps_per_epoch: int):
    """The README cell's value for a backbone kind, a class count and steps per epoch (S in
    "x S": at most 16), as a flag value."""
    binary = re.fullmatch(r"(.*) \((.*) with 2 classes\)", text)
    if binary:
        text = binary.group(2) if classes == 2 else binary.group(1)
    scaled_kinds = re.fullmatch(r"(.*) \((.*): x S\)", text)
    if scaled_kinds:
        text = scaled_kinds.group(1) + (" x S" if kind in scaled_kinds.group(2) else "")
    if ";" in text:
        text = dict(part.strip().split(" ", 1) for part in text.split(";"))[kind]
    if text.endswith(" x S"):
        return float(text[: -len(" x S")]) * min(steps_per_epoch, 16)
    if text == "(none)":
        return ""
    for kind_of in (int, float):
        try:
            return kind_of(text)
        except ValueError:
            pass
    return text


@pytest.mark.parametrize("classes", [2, 10])
def test_recipe_auto_chooses_what_the_readme_table_says(classes):
    table = _readme_table()
    assert [row[0] for row in table] == [f"`--{row.flag}`" for row in recipe_lib.TABLE]
    edges = [end for _, end in recipe_lib.BANDS[:-1]]
    sizes = [25, *[size for end in edges for size in (end - 1, end)], 1_000_000]
    for band, examples in enumerate(sizes):
        column = 1 + band // 2  # two sizes each side of every band edge
        for kind, backbone in BACKBONES.items():
            resolved, recipe = _resolve({"backbone": backbone}, examples, classes)
            values = _flag_values(resolved)
            steps = -(-examples // 32)  # the default batch
            for row in table:
                flag = row[0].strip("`-")
                expected = _parse_cell(row[column], kind, classes, steps)
                if flag == "warmup_steps":  # at most a tenth of the shortest phase's steps
                    shortest = steps * min(values["head_epochs"], values["finetune_epochs"])
                    expected = min(expected, shortest // 10)
                if isinstance(expected, float):  # a scaled rate: a product of floats
                    expected = pytest.approx(expected, rel=1e-12)
                assert values[flag] == expected, (flag, examples)
            assert recipe.backbone_kind == kind and recipe.given == {}


def test_the_large_bands_warmup_is_at_most_a_tenth_of_the_shortest_phase():
    # 20,000 examples at batch 256: 79 steps an epoch, 5 epochs a phase, 395 steps: BiT's 500
    # warm-up steps would never reach the peak rate, and the cosine would never decay.
    resolved, recipe = _resolve({"batch_size": 256}, 20_000, 10)
    assert recipe.band == "large" and resolved.phases[0].epochs == 5
    assert _flag_values(resolved)["warmup_steps"] == recipe.chosen["warmup_steps"] == 39
    resolved, _ = _resolve({"batch_size": 256, "head_epochs": 2}, 20_000, 10)  # 158 steps
    assert resolved.training.warmup_steps == 15
    resolved, _ = _resolve({}, 1_000_000, 10)  # 31,250 steps a phase: BiT's 500 stand
    assert resolved.training.warmup_steps == 500
    # A count given is the user's, whole.
    resolved, _ = _resolve({"batch_size": 256, "warmup_steps": 300}, 20_000, 10)
    assert resolved.training.warmup_steps == 300


def test_given_flags_win_and_a_group_is_left_whole():
    given = {"head_lr": 1e-3, "warmup_steps": 7, "cutmix": 1.0, "augment": ""}
    resolved, recipe = _resolve(given, 100_000, 10)
    values = _flag_values(resolved)
    # Given values win, even those equal to the guide's defaults.
    assert values["head_lr"] == 1e-3 and values["augment"] == ""
    assert values["warmup_steps"] == 7 and values["warmup_epochs"] == 0  # group: warm-up
    assert values["cutmix"] == 1.0 and values["mixup"] == 0.0  # group: mixing
    assert values["finetune_lr"] == 1e-3 and values["ema_decay"] == 0.999  # chosen (small_cnn)
    assert recipe.given == {
        "head_lr": "head_lr",
        "warmup_epochs": "warmup_steps",
        "warmup_steps": "warmup_steps",
        "augment": "augment",
        "mixup": "cutmix",
    }
    assert "head_lr" not in recipe.chosen and recipe.chosen["finetune_lr"] == 1e-3
    # Resolving the resolved config again changes nothing: flags.txt re-runs the same run.
    again, _ = recipe_lib.resolve(resolved, 100_000, 10)
    assert _flag_values(again) == values


def test_command_line_flags_given_are_the_ones_present(tmp_path):
    values = flags.FlagValues()
    tlloop_flags.define_flags(values)
    flagfile = tmp_path / "x.flags"
    flagfile.write_text("--head_epochs=5\n")  # equal to the default, still given
    values(["tlloop", "--workdir=w", f"--flagfile={flagfile}", "--finetune_lr=1e-5"])
    config = tlloop_flags.to_config(values)
    assert config.given == {"workdir", "head_epochs", "finetune_lr"}
    resolved, recipe = recipe_lib.resolve(config, 25, 5)
    assert (resolved.phases[0].epochs, resolved.phases[1].learning_rate) == (5, 1e-5)
    assert resolved.phases[0].learning_rate == 3e-2 and "head_lr" in recipe.chosen


def test_a_recipe_that_cannot_act_is_refused():
    with flag_error(
        r"^--optimizer=sgd: --recipe=auto's learning rates are Adam's and --head_lr is "
        r"not given; accepted: --head_lr and --finetune_lr with it",
    ):
        _resolve({"optimizer": "sgd"}, 100, 5)
    resolved, _ = _resolve({"optimizer": "sgd", "head_lr": 0.1, "finetune_lr": 0.01}, 100, 5)
    assert resolved.training.optimizer == "sgd" and resolved.phases[1].learning_rate == 0.01
    with flag_error(r"^--recipe='best': unknown; accepted: auto, guide"):
        cli_config.from_flags({"workdir": "w", "recipe": "best"})


def test_the_chosen_values_are_logged_and_written_to_flags_txt_and_results(tmp_path):
    workdir = tmp_path / "run"
    args = [
        "--dataset=digits",
        "--classes=5-9",
        "--train_examples_per_class=5",
        f"--backbone={PRETRAINED}",
        "--head_epochs=1",
        "--finetune_epochs=1",
        "--nosupervise",
        "--quiet",
    ]
    result = run_cli(*args, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "recipe auto: 25 training examples (tiny), 5 classes, file backbone" in result.stderr
    assert "recipe: --head_lr=0.03" in result.stderr
    assert "recipe: --head_epochs given, kept" in result.stderr
    flags_txt = (workdir / "flags.txt").read_text()
    for line in ("--head_lr=0.03", "--finetune_lr=0.0003", "--lr_schedule=cosine"):
        assert line in flags_txt.splitlines()
    assert "--head_epochs=1" in flags_txt.splitlines()
    results = json.loads((workdir / "results.json").read_text())
    assert (
        results["recipe"]["chosen"]
        == recipe_lib.Recipe(
            "auto",
            chosen=_without(recipe_lib.choose(25, 5, "file"), "head_epochs", "finetune_epochs"),
        ).chosen
    )
    assert results["recipe"]["given"] == {
        "head_epochs": "head_epochs",
        "finetune_epochs": "finetune_epochs",
    }
    # The written flags re-run the same experiment: that resumes the finished run.
    rerun = run_cli(f"--flagfile={workdir / 'flags.txt'}", "--nosupervise", "--quiet")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "finished run" in rerun.stderr


def _without(values: dict, *names: str) -> dict:
    return {name: value for name, value in values.items() if name not in names}


def test_a_config_made_in_python_keeps_the_values_it_sets():
    phases = (
        config_lib.PhaseConfig("head", 3, 5e-2),
        config_lib.PhaseConfig("finetune", 2, 1e-5, config_lib.Unfreeze("all")),
    )
    config = cli_config.RunConfig(workdir="w", phases=phases)
    resolved, recipe = recipe_lib.resolve(config, 25, 5)
    # Values that differ from the defaults count as given; those equal to them do not.
    assert (resolved.phases[0].epochs, resolved.phases[0].learning_rate) == (3, 5e-2)
    assert resolved.phases[1].epochs == 2 and resolved.phases[1].learning_rate == 1e-3
    assert set(recipe.given) == {"head_epochs", "head_lr", "finetune_epochs"}


@pytest.mark.parametrize(
    ("task", "text", "left"),
    [
        ("multilabel", False, {"label_smoothing"}),
        ("regression", False, {"label_smoothing", "mixup"}),
        ("classification", True, {"augment", "mixup"}),
    ],
)
def test_rows_that_do_not_apply_to_a_task_or_to_texts_are_not_set(task, text, left):
    config = cli_config.from_flags({"workdir": "w", "backbone": "small_cnn"})
    resolved, recipe = recipe_lib.resolve(config, 100_000, 5, task=task, text=text)
    everything = set(recipe_lib.choose(100_000, 5, "small_cnn"))
    assert set(recipe.chosen) == everything - left
    defaults = _flag_values(config)
    values = _flag_values(resolved)
    assert all(values[flag] == defaults[flag] for flag in left)


def _flag_values(config) -> dict:
    """The config's flag values, rates as numbers (their flags hold text: a number or auto)."""
    values = cli_config.flag_values(config)
    return {k: float(v) if k.endswith("_lr") else v for k, v in values.items()}


def test_tiny_band_rates_of_a_file_backbone_scale_with_the_steps_per_epoch():
    # 100 examples at the default batch of 32: 4 steps per epoch, the rates 4x the table's.
    resolved, recipe = _resolve({"backbone": BACKBONES["file"]}, 100, 5)
    assert recipe.step_scale == 4 and "rates x4 (steps per epoch)" in recipe.lines()[0]
    assert resolved.phases[0].learning_rate == pytest.approx(4 * 3e-2)
    assert resolved.phases[1].learning_rate == pytest.approx(4 * 3e-4)
    # The steps follow the batch size given; the scale stops at 16.
    _, recipe = _resolve({"backbone": BACKBONES["file"], "batch_size": 50}, 100, 5)
    assert recipe.step_scale == 2
    _, recipe = _resolve({"backbone": BACKBONES["file"]}, 999, 5)
    assert recipe.step_scale == 16
    # Other kinds, and other bands, are not scaled (not measured).
    for backbone, examples in ((BACKBONES["application"], 100), (BACKBONES["file"], 5_000)):
        resolved, recipe = _resolve({"backbone": backbone}, examples, 5)
        assert recipe.step_scale == 1
        assert resolved.phases[0].learning_rate in (3e-2, 3e-3)
