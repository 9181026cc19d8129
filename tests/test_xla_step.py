"""Whole-step XLA on one device (`CompiledSteps.xla_scope == "step"`) and its fallback to
compiling only the loss and gradients ("gradients"), decided before any batch is read."""

from __future__ import annotations

import dataclasses
import json
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import changed, make_config, run_python, snapshot

from tlloop import phases as phase_lib
from tlloop.cli import experiment as cli_experiment
from tlloop.cli.config import ModelConfig
from tlloop.cli.model import build_model
from tlloop.config import TrainingConfig, parse_augment
from tlloop.models import ModeTable
from tlloop.steps import Metrics, StepOptions, build_train_step, compile_eval, compile_train
from tlloop.tasks import Classification

STEPS = 6  # per run, in calls of 2, 3 and 1 steps


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """The small digits run, without augmentation or dropout: their random draws come from
    other kernels under XLA, so only a run without them can be compared weight for weight."""
    workdir = str(tmp_path_factory.mktemp("xla") / "run")
    return cli_experiment.build_experiment(make_config(workdir, augment="", dropout=0.0))


@pytest.fixture(scope="module")
def initial(experiment):
    """The model's weights before any run: every run starts from them."""
    return [np.array(v.numpy()) for v in experiment.model.weights]


@pytest.fixture(scope="module")
def batches(experiment):
    """STEPS training batches, the same for every run."""
    taken = list(experiment.data.train.take(STEPS))
    assert len(taken) == STEPS
    return tf.data.Dataset.from_tensor_slices(
        tuple(tf.stack([batch[i] for batch in taken]) for i in range(2))
    )


def _train(experiment, initial, phase, batches, *, jit: bool, training=None):
    """A fresh step of `phase` from the experiment's initial weights, STEPS steps on
    `batches`: (the step, its logged rows, the weights after, the weights before)."""
    model = experiment.model
    for variable, value in zip(model.weights, initial, strict=True):
        variable.assign(value)
    phase_lib.apply_trainability(model, phase)
    options = StepOptions(
        batch_size=16,
        eval_batch_size=16,
        training=training or experiment.config.training,
        jit_compile=jit,
        log_every_steps=1,
    )
    step = build_train_step(
        model,
        phase,
        experiment.task,
        options,
        metrics=Metrics(task=experiment.task, evaluation=False),
        global_step=tf.Variable(0, dtype=tf.int64),
        steps_per_epoch=STEPS,
    )
    before = snapshot(model)
    iterator = iter(batches)
    rows = np.concatenate([step(iterator, count).rows for count in (2, 3, 1)])
    return step, rows, snapshot(model), before


CASES = {
    "head": (0, {}),
    "fine-tune": (1, {}),
    # The update's other parts, compiled too: accumulation, clipping, moving averages; and a
    # rate that changes every update (the rate logged is the one the update used).
    "head, accumulate 2, clip, EMA, cosine": (
        0,
        {
            "grad_accum_steps": 2,
            "clip_grad_norm": 0.5,
            "ema_decay": 0.9,
            "lr_schedule": "cosine",
            "warmup_steps": 1,
        },
    ),
}
# XLA fuses and reorders float32 arithmetic: the weights after STEPS steps differ from the
# plain step's by up to 1.1e-6 here (fine-tune; 6.7e-8 in the head cases), while every weight
# that moves moves by at least 2.3e-3 (over 100 x this tolerance).
TOLERANCE = 2e-5


@pytest.mark.parametrize("case", list(CASES))
def test_whole_step_xla_matches_the_plain_step(experiment, initial, batches, case):
    index, overrides = CASES[case]
    phase = experiment.phases[index]
    training = dataclasses.replace(experiment.config.training, **overrides)
    runs = [
        _train(experiment, initial, phase, batches, jit=jit, training=training)
        for jit in (False, True)
    ]
    (plain, plain_rows, plain_after, before), (jitted, jit_rows, jit_after, _) = runs
    assert plain.xla_scope is None
    assert jitted.xla_scope == "step" and jitted.xla_reason == ""
    assert jitted.traces == {"loop": 1, "xla": 1}

    moved = changed(before, jit_after)
    assert moved and moved == changed(before, plain_after)
    if index == 1:  # the fine-tune phase updates the backbone too
        assert moved & {v.path for v in experiment.model.backbone.weights if "kernel" in v.path}
    differences = {p: float(np.abs(plain_after[p] - jit_after[p]).max()) for p in moved}
    steps_moved = {p: float(np.abs(jit_after[p] - before[p]).max()) for p in moved}
    for path in moved:
        assert differences[path] <= TOLERANCE, path
        assert steps_moved[path] > 100 * TOLERANCE, path
    updates = STEPS // training.grad_accum_steps
    assert int(plain.optimizer.iterations) == int(jitted.optimizer.iterations) == updates
    for a, b in zip(plain.averages, jitted.averages, strict=True):
        assert np.abs(a.numpy() - b.numpy()).max() <= TOLERANCE
    assert len(jitted.averages) == (len(jitted.variables) if training.ema_decay else 0)

    # The same logged rows: every step, its loss, accuracy, rate and gradient norm.
    assert plain_rows[:, 0].tolist() == jit_rows[:, 0].tolist() == list(range(1, STEPS + 1))
    assert np.allclose(plain_rows[:, 1:], jit_rows[:, 1:], rtol=1e-4, atol=1e-6)
    if training.lr_schedule != "constant":
        assert len(set(jit_rows[:, -2].tolist())) >= 2  # 1e-2, then 5e-3 from step 5


def _images(count: int, nan_at=()):
    """`count` batches of 16 random 16 px images and labels of 3 classes; one pixel of the
    batches at `nan_at` is NaN."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (count, 16, 16, 16, 3)).astype(np.float32)
    for position in nan_at:
        images[position, 3, 0, 0, 0] = np.nan
    labels = rng.integers(0, 3, (count, 16)).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices((images, labels))


def _tiny_step(augment: str = "", nan_policy: str = "stop", **training):
    """Compiled steps under XLA, every row logged; `training`: TrainingConfig's fields."""
    keras.utils.set_random_seed(3)
    config = ModelConfig(image_size=16, dropout=0.0, augment=parse_augment(augment))
    model = build_model(config, 3)
    optimizer = keras.optimizers.Adam(learning_rate=1e-2)
    optimizer.build(model.trainable_variables)
    counter = tf.Variable(0, dtype=tf.int64)
    options = StepOptions(
        batch_size=16,
        eval_batch_size=16,
        training=TrainingConfig(**training),
        jit_compile=True,
        nan_policy=nan_policy,
        log_every_steps=1,
    )
    step = compile_train(model, optimizer, ModeTable(), Metrics(), counter, options)
    return step, model, optimizer


def _jit_lines(records) -> list[str]:
    return [r.getMessage() for r in records if r.getMessage().startswith("jit_compile: ")]


FALLBACKS = {
    "RandomRotation": (
        {"augment": "rotate:0.1"},
        "XLA has no kernel for ImageProjectiveTransformV3 (used by RandomRotation, "
        "RandomTranslation or RandomZoom)",
    ),
    "MixUp": ({"mixup": 0.2}, "StatelessRandomGammaV3 (used by MixUp's"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_a_step_xla_cannot_compile_falls_back_before_reading_a_batch(case, caplog):
    options, cause = FALLBACKS[case]
    step, model, _ = _tiny_step(**options)
    assert step.xla_scope is None and step.xla_reason.startswith("not decided yet")
    iterator = iter(_images(4))
    before = snapshot(model)
    with caplog.at_level(logging.INFO, logger="absl"):  # whatever an earlier test set
        step(iterator, 2)
    assert step.xla_scope == "gradients"
    assert step.xla_reason.startswith("the whole step does not compile: ")
    assert cause in step.xla_reason
    assert _jit_lines(caplog.records) == [
        f"jit_compile: XLA compiles only the loss and gradients: {step.xla_reason}"
    ]
    assert [r.levelno for r in caplog.records if r.getMessage().startswith("jit_")] == [
        logging.WARNING
    ]
    # It trains, on the loss-and-gradient XLA function, traced once.
    assert step.traces == {"loop": 1, "xla": 1} and int(step.global_step.numpy()) == 2
    assert any(path.endswith("kernel") for path in changed(before, snapshot(model)))
    # The decision read no batch: the two steps took batches 0 and 1, and 2 comes next.
    images, _ = next(iterator)
    expected = next(iter(_images(4).skip(2)))[0]
    assert np.array_equal(images.numpy(), expected.numpy())


# Two logical CPUs must be made before TensorFlow initialises its devices: a fresh process.
DEVICES_SCRIPT = """
import json
from absl import logging
from tlloop import distribute
distribute.configure_logical_devices(2, 0)
import keras, numpy as np, tensorflow as tf
from tlloop.cli.config import ModelConfig
from tlloop.models import ModeTable
from tlloop.cli.model import build_model
from tlloop.steps import StepOptions, Metrics, compile_train

logging.set_verbosity(logging.INFO)
rng = np.random.default_rng(0)
data = tf.data.Dataset.from_tensor_slices((
    rng.uniform(0, 255, (3, 16, 16, 16, 3)).astype(np.float32),
    rng.integers(0, 3, (3, 16)).astype(np.int32),
))
found = {}
for name, strategy in (
    ("two replicas", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])),
    ("one mirrored replica", tf.distribute.MirroredStrategy(["/cpu:0"])),
    ("one device", tf.distribute.OneDeviceStrategy("/cpu:0")),
):
    with strategy.scope():
        model = build_model(ModelConfig(image_size=16, dropout=0.0), 3)
        optimizer = keras.optimizers.Adam(1e-2)
        optimizer.build(model.trainable_variables)
        options = StepOptions(batch_size=16, eval_batch_size=16, jit_compile=True,
                              log_every_steps=0)
        step = compile_train(model, optimizer, ModeTable(), Metrics(),
                             tf.Variable(0, dtype=tf.int64), options)
        decided = step.xla_scope
        before = [v.numpy().copy() for v in model.trainable_variables]
        step(iter(strategy.experimental_distribute_dataset(data)), 3)
        moved = any(not np.array_equal(a, v.numpy())
                    for a, v in zip(before, model.trainable_variables))
    found[name] = {
        "replicas": strategy.num_replicas_in_sync, "decided_when_made": decided,
        "scope": step.xla_scope, "reason": step.xla_reason, "moved": moved,
        "steps": int(step.global_step.numpy()), "iterations": int(optimizer.iterations.numpy()),
    }
print("RESULT " + json.dumps(found))
"""


def test_several_replicas_and_merge_call_strategies_fall_back():
    result = run_python("-c", DEVICES_SCRIPT, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.split("RESULT ", 1)[1])
    two, mirrored_one, one_device = (
        found[k] for k in ("two replicas", "one mirrored replica", "one device")
    )
    replicas_reason = (
        "2 replicas: the optimizer's cross-replica all-reduce is a merge_call, which XLA "
        "cannot compile; augmentation, mixing and the update run outside XLA"
    )
    assert two["replicas"] == 2
    assert two["scope"] == "gradients" and two["reason"] == replicas_reason
    # One replica of MirroredStrategy: its replica context still all-reduces by merge_call.
    assert mirrored_one["replicas"] == 1 and mirrored_one["scope"] == "gradients"
    assert mirrored_one["reason"] == (
        "the whole step does not compile: the strategy's replica context synchronises "
        "through a merge_call (the optimizer's all-reduce), which a compiled function cannot "
        "hold, even with one replica; augmentation, mixing and the update run outside XLA"
    )
    assert one_device["replicas"] == 1 and one_device["scope"] == "step"
    for run in (two, mirrored_one, one_device):
        assert run["decided_when_made"] is None  # decided by the first call
        assert run["moved"] and run["steps"] == run["iterations"] == 3
    lines = [line for line in result.stderr.splitlines() if "jit_compile: XLA compiles" in line]
    assert len(lines) == 3  # one line per step object
    assert lines[0].endswith(f"only the loss and gradients: {replicas_reason}")
    assert lines[1].endswith(f"only the loss and gradients: {mirrored_one['reason']}")
    assert lines[2].endswith("XLA compiles the whole train step")


def test_a_nan_step_under_whole_step_xla_applies_no_update():
    step, model, optimizer = _tiny_step(nan_policy="skip_step", ema_decay=0.9)
    batches = iter(_images(3, nan_at={1}))
    step(batches, 1)
    assert step.xla_scope == "step"
    before, iterations = snapshot(model), int(optimizer.iterations.numpy())
    averages = [np.array(a.numpy()) for a in step.averages]
    metrics = step.metrics.result()
    result = step(batches, 1)  # the poisoned batch: one image holds a NaN pixel
    assert result.nonfinite.tolist() == [2] and int(step.global_step.numpy()) == 2
    assert changed(before, snapshot(model)) == set()
    assert int(optimizer.iterations.numpy()) == iterations
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(averages, step.averages, strict=True))
    assert step.metrics.result() == metrics  # the training metrics were left alone
    assert result.rows[:, 0].tolist() == [2] and np.isnan(result.rows[0, 1])
    result = step(batches, 1)
    assert result.nonfinite.tolist() == [] and changed(before, snapshot(model))
    assert int(optimizer.iterations.numpy()) == iterations + 1
    assert step.metrics.result()["examples"] == 32


def test_nan_policy_stop_under_whole_step_xla_ends_the_call_at_the_bad_step():
    step, _, optimizer = _tiny_step(nan_policy="stop")
    result = step(iter(_images(4, nan_at={1})), 4)
    assert step.xla_scope == "step"
    assert result.nonfinite.tolist() == [2] and result.rows[:, 0].tolist() == [1, 2]
    assert int(step.global_step.numpy()) == 2 and int(optimizer.iterations.numpy()) == 1


def test_whole_step_xla_traces_once_and_its_decision_changes_nothing():
    step, model, optimizer = _tiny_step(clip_grad_norm=1.0, grad_accum_steps=2)
    state = [*model.weights, *optimizer.variables, *step.metrics.variables, step.global_step]
    state += step.accumulators
    before = [np.array(v.numpy()) for v in state]
    assert step.choose_xla(_images(1).element_spec) == "step"
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, state, strict=True))
    assert step.traces == {"loop": 0, "xla": 1}  # the decision's trace is the one the loop uses
    iterator = iter(_images(6).repeat())
    for count in (1, 3, 2, 5):
        step(iterator, count)
    assert int(step.global_step.numpy()) == 11 and int(optimizer.iterations.numpy()) == 5
    assert step.traces == {"loop": 1, "xla": 1}
    assert step.choose_xla(None) == "step"  # decided once


class _HostLoss(Classification):
    """Classification whose evaluation loss passes through a host function (numpy_function),
    which XLA has no kernel for."""

    def eval_loss(self, labels, outputs):
        losses = super().eval_loss(labels, outputs)
        passed = tf.numpy_function(lambda values: values, [losses], tf.float32, stateful=False)
        return tf.ensure_shape(passed, losses.shape)


def _evaluated(model, jit: bool, task=None):
    """Compiled eval steps over 2 batches of 16 (weights 1) and the metrics they filled."""
    metrics = Metrics(task=task or Classification())
    evaluation = compile_eval(model, ModeTable(), metrics, task=task, jit_compile=jit)
    images, labels = (tf.stack([b[i] for b in _images(2)]) for i in range(2))
    weights = tf.ones(labels.shape, tf.float32)
    evaluation(iter(tf.data.Dataset.from_tensor_slices((images, labels, weights))), 2)
    return evaluation, metrics.result()


def test_eval_steps_take_the_train_steps_xla_decision(caplog):
    """Evaluation shares the train step's factory: the whole step under XLA on one device,
    only the forward pass when the whole step does not compile, each logged in one line."""
    keras.utils.set_random_seed(3)
    model = build_model(ModelConfig(image_size=16, dropout=0.0), 3)
    plain, plain_result = _evaluated(model, jit=False)
    assert plain.xla_scope is None and plain.xla_reason == "jit_compile is off"
    with caplog.at_level(logging.INFO, logger="absl"):  # whatever an earlier test set
        whole, whole_result = _evaluated(model, jit=True)
        fallback, fallback_result = _evaluated(model, jit=True, task=_HostLoss())
    assert whole.xla_scope == "step" and whole.xla_reason == ""
    assert whole.traces == {"loop": 1, "xla": 1}
    assert whole_result["examples"] == plain_result["examples"] == 32
    assert whole_result["accuracy"] == plain_result["accuracy"]
    assert abs(whole_result["loss"] - plain_result["loss"]) <= 1e-5 * abs(plain_result["loss"])
    assert fallback.xla_scope == "forward"
    assert fallback.xla_reason.startswith("the whole step does not compile: XLA has no kernel")
    assert fallback.xla_reason.endswith("; the metric updates run outside XLA")
    assert fallback.traces == {"loop": 1, "xla": 1}
    assert abs(fallback_result["loss"] - plain_result["loss"]) <= 1e-5 * abs(plain_result["loss"])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("jit_compile")]
    assert lines == [
        "jit_compile (eval): XLA compiles the whole eval step",
        f"jit_compile (eval): XLA compiles only the forward pass: {fallback.xla_reason}",
    ]


WORDS = ("the", "a", "movie", "plot", "actor", "scene", "and", "was")
WORDS += ("bad", "awful", "boring", "good", "great", "fun")


def test_string_inputs_train_and_evaluate_without_xla(tmp_path, caplog):
    """A text backbone's tokenizer takes strings, which neither XLA function can: before, the
    first step failed in tf2xla; now the step and the evaluation run without XLA."""
    pytest.importorskip("keras_hub")
    from task_data import write_bert_preset, write_text_folder

    preset = write_bert_preset(str(tmp_path / "bert"), WORDS)
    config = make_config(
        str(tmp_path / "run"),
        dataset="text_folder",
        data_dir=write_text_folder(tmp_path, per_class=8),
        classes="",
        per_class=0,
        val_split=0.25,
        backbone=preset,
        batch_size=8,
        head_epochs=1,
        finetune_epochs=1,
        jit_compile=True,
    )
    with caplog.at_level(logging.INFO, logger="absl"):  # whatever an earlier test set
        results = cli_experiment.train(cli_experiment.build_experiment(config), config.workdir)
    assert [phase["eval"]["examples"] for phase in results.phases] == [4, 4]
    reason = (
        "the inputs are strings (a text backbone's tokenizer), which XLA cannot compile: the "
        "train step runs without XLA"
    )
    # The head phase trains on cached backbone features (numbers): the whole step compiles.
    assert _jit_lines(caplog.records) == [
        "jit_compile: XLA compiles the whole train step",
        f"jit_compile: no XLA in the train step: {reason}",
    ]
