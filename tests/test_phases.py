"""Promises 1 and 2: modes and trainable sets per phase, checked on real variables."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import StopAfter, changed, flag_error, make_config, snapshot

from tlloop import phases as phase_lib
from tlloop import trainer
from tlloop.cli import experiment as cli_experiment
from tlloop.config import CheckpointConfig, Unfreeze


def _train(config):
    experiment = cli_experiment.build_experiment(config)
    model = experiment.model
    pretrained = snapshot(model.backbone)
    head = snapshot(model.head)
    cli_experiment.train(experiment, config.workdir)
    return model, pretrained, head


def _is_moving_stat(path: str) -> bool:
    return "moving_mean" in path or "moving_variance" in path


def test_head_phase_leaves_every_backbone_variable_bit_identical(workdir):
    model, before, head_before = _train(make_config(workdir, finetune_epochs=0, head_epochs=2))
    assert any(_is_moving_stat(path) for path in before)
    assert changed(before, snapshot(model.backbone)) == set()
    assert changed(head_before, snapshot(model.head)) == set(head_before)


def test_finetune_all_changes_kernels_but_not_batchnorm(workdir):
    model, before, _ = _train(make_config(workdir, head_epochs=1, finetune_epochs=2))
    moved = changed(before, snapshot(model.backbone))
    kernels = {path for path in before if path.endswith("kernel")}
    assert kernels and kernels <= moved
    # BatchNorm is frozen and in inference mode: statistics, scale and offset all untouched.
    norm_paths = {path for path in before if path.split("/")[-2].startswith("bn")}
    assert norm_paths and not norm_paths & moved


def test_bn_mode_train_moves_batchnorm_statistics(workdir):
    # The counterpart of the test above: it shows the bit-identity check can fail.
    model, before, _ = _train(make_config(workdir, head_epochs=0, bn_mode="train"))
    moved = changed(before, snapshot(model.backbone))
    assert {path for path in before if _is_moving_stat(path)} <= moved


def test_finetune_top_n_changes_only_those_layers(workdir):
    model, before, _ = _train(make_config(workdir, head_epochs=0, unfreeze="top:1"))
    moved = changed(before, snapshot(model.backbone))
    assert moved == {path for path in before if "conv3" in path}


def test_top_n_larger_than_the_backbone_is_refused(workdir):

    with flag_error(r"--unfreeze=top:4: the backbone has only 3 layers"):
        cli_experiment.build_experiment(make_config(workdir, unfreeze="top:4"))


def test_trainability_report_counts_parameters(workdir):
    experiment = cli_experiment.build_experiment(make_config(workdir, unfreeze="top:2"))
    model, (head_phase, finetune) = experiment.model, experiment.phases
    phase_lib.apply_trainability(model, head_phase)
    report = phase_lib.trainability_report(model, head_phase)
    assert "| backbone | False | 0 | 93,920 | 3 | 3 |" in report
    phase_lib.apply_trainability(model, finetune)
    report = phase_lib.trainability_report(model, finetune)
    # conv2 (3*3*32*64) and conv3 (3*3*64*128) train; conv1 and the BatchNorm layers do not.
    assert f"| backbone | False | {18432 + 73728:,} | {864 + 4 * (32 + 64 + 128):,} | 3 | 3 |" in (
        report
    )
    assert "| head | True | 645 | 0 | 0 | 0 |" in report


def test_plan_skips_phases_without_epochs(workdir):
    experiment = cli_experiment.build_experiment(make_config(workdir, head_epochs=0))
    assert [phase.name for phase in experiment.phases] == ["finetune"]
    assert experiment.phases[0].index == 0


def test_bn_mode_train_sets_backbone_training_in_the_mode_table(workdir):
    experiment = cli_experiment.build_experiment(make_config(workdir, bn_mode="train"))
    head_phase, finetune = experiment.phases
    assert head_phase.modes.train.backbone is False
    assert finetune.modes.train.backbone is True
    assert finetune.modes.eval.backbone is False
    assert np.all([not getattr(finetune.modes.predict, n) for n in ("augment", "backbone")])


@pytest.mark.parametrize(
    ("spec", "bn_mode", "trainable"),
    [
        ("from:conv2", "frozen", ["conv2", "conv3"]),
        ("from:bn2", "train", ["bn2", "conv3", "bn3"]),
        ("regex:conv[13]", "frozen", ["conv1", "conv3"]),
        ("regex:^(conv3|bn1)$", "train", ["bn1", "conv3"]),
    ],
)
def test_from_and_regex_choose_the_backbone_layers_that_train(workdir, spec, bn_mode, trainable):
    experiment = cli_experiment.build_experiment(
        make_config(workdir, unfreeze=spec, bn_mode=bn_mode)
    )
    model, finetune = experiment.model, experiment.phases[1]
    phase_lib.apply_trainability(model, finetune)
    training = [
        layer.name
        for layer in phase_lib.leaf_layers(model.backbone)
        if layer.trainable and layer.weights
    ]
    assert training == trainable
    assert {v.path.split("/")[-2] for v in model.backbone.trainable_weights} == set(trainable)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("blocks:1", r"--unfreeze=blocks:1: no known block naming; accepted: blocks:N"),
        ("from:conv9", r"--unfreeze=from:conv9: no layer 'conv9' in the backbone; accepted"),
        ("regex:^dense", r"--unfreeze=regex:\^dense: matches no backbone layer with weights"),
    ],
)
def test_unfreeze_policies_that_do_not_fit_the_backbone_are_refused(workdir, spec, message):

    with flag_error(message):
        cli_experiment.build_experiment(make_config(workdir, unfreeze=spec))


def test_gradual_unfreeze_adds_layers_each_epoch_and_resumes_in_its_stage(workdir):
    # Fine-tune only, 3 epochs of 3 steps, gradual:1 over conv1..conv3: epoch 1 trains conv3,
    # epoch 2 conv2 and conv3, epoch 3 all three. Stopped at the end of epochs 1 and 2 and
    # resumed each time (the optimizer of the checkpoint's stage must be rebuilt to restore).
    last = CheckpointConfig(export="last")  # the model in memory ends with the last weights
    config = make_config(workdir, head_epochs=0, finetune_epochs=3, checkpoint=last)
    config = dataclasses.replace(
        config, phases=(config.phases[0], dataclasses.replace(config.phases[1], gradual=1))
    )
    experiment = cli_experiment.build_experiment(config)
    start = snapshot(experiment.model.backbone)

    def kernels_changed(model) -> set[str]:
        return {p.split("/")[-2] for p in changed(start, snapshot(model.backbone))}

    for stop_at, trained in ((3, {"conv3"}), (3, {"conv2", "conv3"})):
        with pytest.raises(trainer.Stopped):
            cli_experiment.train(experiment, workdir, stop=StopAfter(stop_at))
        assert kernels_changed(experiment.model) == trained
        experiment = cli_experiment.build_experiment(config)
    cli_experiment.train(experiment, workdir)
    assert kernels_changed(experiment.model) == {"conv1", "conv2", "conv3"}


def _phase(unfreeze: str, bn_mode: str = "frozen") -> phase_lib.PlannedPhase:
    from tlloop.config import PhaseConfig, Unfreeze
    from tlloop.models import ModeTable

    return phase_lib.PlannedPhase(
        1, PhaseConfig("finetune", 1, 1e-3, Unfreeze.parse(unfreeze), bn_mode), ModeTable()
    )


def _trainable_names(model) -> set[str]:
    return {layer.name for layer in phase_lib.trained_layers(model.backbone)}


def test_policies_count_only_used_layers_at_any_depth_and_keep_inner_batch_norm_frozen():
    from model_zoo import MEMBERS

    cut = MEMBERS["subclassed"].build()  # holds two built classifier heads it never calls
    backbone = cut.backbone
    names = [layer.name for layer in phase_lib.unfrozen_layers(Unfreeze.parse("top:2"), backbone)]
    assert names == ["stem", "body"]
    assert {layer.name for layer in phase_lib.unused_layers(backbone)} == {"old_logits", "old_aux"}
    with flag_error(r"--unfreeze=top:3: the backbone has only 2 layers"):
        phase_lib.unfrozen_layers(Unfreeze.parse("top:3"), backbone)
    with flag_error(r"--unfreeze=blocks:1: no known block naming"):
        phase_lib.unfrozen_layers(Unfreeze.parse("blocks:1"), backbone)
    phase_lib.apply_trainability(cut, _phase("all"))
    assert _trainable_names(cut) == {"stem", "body"}
    report = phase_lib.trainability_report(cut, _phase("all"))
    assert "backbone layers that train (2): stem, body" in report
    assert "never trained (2): old_logits, old_aux" in report

    blocks = MEMBERS["custom"].build()  # custom layers holding Conv + BatchNorm + Dropout
    phase_lib.apply_trainability(blocks, _phase("all"))
    assert _trainable_names(blocks) == {"block1_conv", "block2_conv"}
    assert "| backbone | False | " in phase_lib.trainability_report(blocks, _phase("all"))
    phase_lib.apply_trainability(blocks, _phase("regex:block2", "train"))
    assert _trainable_names(blocks) == {"block2_conv", "block2_bn"}
    phase_lib.apply_trainability(blocks, _phase("from:block2"))  # a block, by its name
    assert _trainable_names(blocks) == {"block2_conv"}
    phase_lib.apply_trainability(blocks, _phase("from:block2_bn", "train"))
    assert _trainable_names(blocks) == {"block2_bn"}

    twice = MEMBERS["shared"].build()  # one Conv called twice counts once
    assert [x.name for x in phase_lib.weighted_layers(twice.backbone)] == ["twice", "mix"]
