"""How a phase trains: optimizers, weight decay, schedules, clipping, accumulation, loss."""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import eval_accuracy, make_config, snapshot

from tlloop import phases as phase_lib
from tlloop import trainer
from tlloop.cli import experiment as cli_experiment
from tlloop.cli.config import DataConfig, ModelConfig
from tlloop.cli.model import build_model
from tlloop.config import CheckpointConfig, LoggingConfig, PhaseConfig, TrainingConfig, Unfreeze
from tlloop.models import ModeTable
from tlloop.optim import PhaseSchedule, make_optimizer
from tlloop.steps import CompiledSteps, Metrics, StepOptions, compile_train
from tlloop.tasks import Classification


def _model(seed: int = 0):
    keras.utils.set_random_seed(seed)
    return build_model(ModelConfig(image_size=16, dropout=0.0), 3)


def _examples(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (count, 16, 16, 3)).astype(np.float32)
    labels = rng.integers(0, 3, count).astype(np.int32)
    return images, labels


def _phase(unfreeze: str = "none", lr: float = 0.1, bn_mode: str = "frozen"):
    config = PhaseConfig("p", 1, lr, Unfreeze.parse(unfreeze), bn_mode=bn_mode)
    modes = ModeTable().with_backbone_training(bn_mode == "train" and unfreeze != "none")
    return phase_lib.PlannedPhase(0, config, modes)


# The step's own training options: they go into its StepOptions' training config.
_STEP_TRAINING = ("clip_grad_norm", "grad_accum_steps", "ema_decay")


def _compiled(
    model, optimizer, phase, batch: int = 16, *, metrics=None, training=None, task=None, **step_args
) -> CompiledSteps:
    step_training = {name: step_args.pop(name) for name in _STEP_TRAINING if name in step_args}
    training = dataclasses.replace(training or TrainingConfig(), **step_training)
    options = StepOptions(
        batch_size=batch, eval_batch_size=batch, training=training, log_every_steps=0, **step_args
    )
    return compile_train(
        model,
        optimizer,
        phase.modes,
        metrics or Metrics(),
        tf.Variable(0, dtype=tf.int64),
        options,
        task=task,
    )


def _train(model, phase, batches, steps, *, batch, training=None, **step_args):
    phase_lib.apply_trainability(model, phase)
    optimizer = make_optimizer(
        phase.config,
        model.trainable_variables,
        training,
        steps=steps,
        no_decay=tuple(phase_lib.no_decay_variables(model)),
    )
    metrics = Metrics()
    step = _compiled(
        model, optimizer, phase, batch, metrics=metrics, training=training, **step_args
    )
    step(iter(batches), steps)
    return step, metrics


def test_gradient_accumulation_matches_a_k_times_larger_batch():
    images, labels = _examples(32)
    sgd = TrainingConfig(optimizer="sgd")
    big, small = _model(), _model()
    phase = _phase()
    _train(
        big,
        phase,
        tf.data.Dataset.from_tensor_slices((images, labels)).batch(16),
        2,
        batch=16,
        training=sgd,
    )
    before = snapshot(small.head)
    accumulate = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    step, _ = _train(small, phase, accumulate.take(1), 1, batch=8, training=sgd, grad_accum_steps=2)
    assert snapshot(small.head).keys() == before.keys()
    assert all(np.array_equal(before[k], v) for k, v in snapshot(small.head).items())
    step(iter(accumulate.skip(1)), 3)  # 4 batches of 8 = 2 optimizer steps on 16 each
    for path, value in snapshot(big.head).items():
        np.testing.assert_allclose(snapshot(small.head)[path], value, rtol=0, atol=2e-6)


def test_gradient_clipping_bounds_the_update_to_the_global_norm():
    images, labels = _examples(16)
    model = _model()
    before = snapshot(model.head)
    training = TrainingConfig(optimizer="sgd", clip_grad_norm=1e-3)
    _train(
        model,
        _phase(lr=1.0),
        tf.data.Dataset.from_tensors((images, labels)),
        1,
        batch=16,
        training=training,
        clip_grad_norm=1e-3,
    )
    # SGD's first step moves the weights by lr x gradient: here the clipped one.
    moved = np.sqrt(sum(np.sum((v - before[k]) ** 2) for k, v in snapshot(model.head).items()))
    assert moved == pytest.approx(1e-3, rel=1e-4)


def test_weight_decay_spares_biases_and_batch_norm():
    images, labels = _examples(16)
    phase = _phase("all", lr=1.0, bn_mode="train")
    batch = tf.data.Dataset.from_tensors((images, labels))
    plain, decayed = _model(), _model()
    start = {v.path: v.numpy() for v in plain.trainable_variables}
    _train(plain, phase, batch, 1, batch=16, training=TrainingConfig(optimizer="sgd"))
    _train(
        decayed,
        phase,
        batch,
        1,
        batch=16,
        training=TrainingConfig(optimizer="sgd", weight_decay=0.5),
    )
    spared = {v.path for v in phase_lib.no_decay_variables(decayed)}
    assert any("gamma" in p for p in spared) and any(p.endswith("bias") for p in spared)
    for a, b in zip(plain.trainable_variables, decayed.trainable_variables, strict=True):
        difference = b.numpy() - a.numpy()
        if a.path in spared:
            np.testing.assert_allclose(difference, 0, atol=1e-6)
        else:  # decoupled decay: w -= lr x decay x w, on top of the same gradient step
            np.testing.assert_allclose(difference, -0.5 * start[a.path], rtol=1e-4, atol=1e-5)


def test_schedules_and_warmup():
    cosine = PhaseSchedule(1.0, "cosine", total=100)
    assert float(cosine(0)) == pytest.approx(1.0) and float(cosine(50)) == pytest.approx(0.5)
    assert float(cosine(100)) == pytest.approx(0.0, abs=1e-7)
    linear = PhaseSchedule(2.0, "linear", total=110, warmup=10)
    assert float(linear(0)) == pytest.approx(0.2) and float(linear(9)) == pytest.approx(2.0)
    assert float(linear(60)) == pytest.approx(1.0)
    step = PhaseSchedule(1.0, "step", total=100)
    assert [float(step(t)) for t in (49, 50, 74, 75)] == pytest.approx([1, 0.1, 0.1, 0.01])
    assert float(PhaseSchedule(0.5, "constant", total=10)(7)) == pytest.approx(0.5)


def test_the_logged_learning_rate_follows_the_phase_schedule(workdir):
    training = TrainingConfig(lr_schedule="linear", warmup_steps=2)
    config = make_config(workdir, head_epochs=3, finetune_epochs=0, training=training)
    config = dataclasses.replace(config, logging=LoggingConfig(log_every_steps=1))
    cli_experiment.train(cli_experiment.build_experiment(config), workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as file:
        rows = [json.loads(line) for line in file if '"train"' in line]
    rates = {row["step"]: row["learning_rate"] for row in rows}
    total = 9  # 3 epochs x 3 steps
    assert sorted(rates) == list(range(1, total + 1))
    for step, rate in rates.items():
        expected = float(PhaseSchedule(1e-2, "linear", total, 2)(step - 1))
        assert rate == pytest.approx(expected, rel=1e-5)


def test_warmup_epochs_ramp_the_logged_learning_rate_over_those_epochs_steps(workdir):
    # 40 training examples, batch 16: 3 steps per epoch; 2 warmup epochs are 6 optimizer steps
    # of a linear ramp from 0 (the k-th step at k/6 of the rate), then the constant rate.
    training = TrainingConfig(warmup_epochs=2)
    config = make_config(workdir, head_epochs=3, finetune_epochs=0, training=training)
    config = dataclasses.replace(config, logging=LoggingConfig(log_every_steps=1))
    cli_experiment.train(cli_experiment.build_experiment(config), workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as file:
        rates = [json.loads(line)["learning_rate"] for line in file if '"train"' in line]
    expected = [1e-2 * k / 6 for k in range(1, 7)] + [1e-2] * 3
    assert rates == pytest.approx(expected, rel=1e-5)


def test_label_smoothing_and_class_weights_shape_the_training_loss():
    images, labels = _examples(16)
    weights = np.array([0.5, 1.0, 2.0], np.float32)
    model = _model()
    logits = model.head(model.backbone(images, training=False), training=True)
    expected = (
        keras.losses.categorical_crossentropy(
            tf.one_hot(labels, 3), logits, from_logits=True, label_smoothing=0.2
        ).numpy()
        * weights[labels]
    )
    _, metrics = _train(
        model,
        _phase(lr=1e-12),
        tf.data.Dataset.from_tensors((images, labels)),
        1,
        batch=16,
        task=Classification(label_smoothing=0.2, class_weights=weights),
    )
    # The metric is the mean of what the step minimises.
    assert metrics.result()["loss"] == pytest.approx(float(np.mean(expected)), rel=1e-5)


def _imbalanced_folder(root, counts: dict[str, int]) -> str:
    rng = np.random.default_rng(3)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            (root / name / f"{i}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    return str(root)


def test_auto_class_weights_weigh_each_example_by_n_over_classes_times_its_class_count(
    tmp_path,
):
    # 2 examples of class "a", 6 of "b": README's N / (classes x count) gives 8 / (2 x 2) = 2
    # for "a" and 8 / (2 x 6) = 2/3 for "b". One batch holds the whole training set, so the
    # first logged loss is the mean over it of what the step minimises.
    workdir = str(tmp_path / "run")
    data = DataConfig(
        dataset="folder",
        data_dir=_imbalanced_folder(tmp_path / "train", {"a": 2, "b": 6}),
        val_dir=_imbalanced_folder(tmp_path / "val", {"a": 1, "b": 1}),
        image_size=32,
        batch_size=8,
    )
    config = make_config(
        workdir,
        dropout=0.0,
        head_epochs=1,
        finetune_epochs=0,
        training=TrainingConfig(class_weights="auto"),
    )
    config = dataclasses.replace(config, data=data, logging=LoggingConfig(log_every_steps=1))
    experiment = cli_experiment.build_experiment(config)
    images, labels = next(iter(experiment.data.train))
    assert sorted(labels.numpy().tolist()) == [0, 0, 1, 1, 1, 1, 1, 1]
    model = experiment.model
    logits = model.head(model.backbone(images, training=False), training=False)
    crossentropy = keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True
    ).numpy()
    expected = float(np.mean(crossentropy * np.array([2.0, 2.0 / 3.0])[labels.numpy()]))
    assert abs(expected - float(np.mean(crossentropy))) > 1e-3  # the weights matter here
    cli_experiment.train(experiment, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as file:
        first = next(json.loads(line) for line in file if '"train"' in line)
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(expected, rel=1e-5)


def test_moving_averages_follow_the_weights():
    images, labels = _examples(48)
    model = _model()
    phase = _phase(lr=0.05)
    batches = iter(tf.data.Dataset.from_tensor_slices((images, labels)).batch(16))
    step, _ = _train(model, phase, batches, 1, batch=16, ema_decay=0.5)
    # The first call already ran one step: a_1 = 0.5 a_0 + 0.5 w_1, with a_0 = w_0.
    trajectory = [v.numpy() for v in step.variables]
    expected = [a.numpy() for a in step.averages]
    for _ in range(2):
        step(batches, 1)
        trajectory = [v.numpy() for v in step.variables]
        expected = [0.5 * e + 0.5 * w for e, w in zip(expected, trajectory, strict=True)]
    for average, value in zip(step.averages, expected, strict=True):
        np.testing.assert_allclose(average.numpy(), value, rtol=1e-6, atol=1e-7)
    assert not np.allclose(step.averages[0].numpy(), step.variables[0].numpy())
    raw = [v.numpy() for v in step.variables]
    step.swap_averages()
    np.testing.assert_array_equal(step.variables[0].numpy(), expected[0])
    step.swap_averages()
    np.testing.assert_array_equal(step.variables[0].numpy(), raw[0])


def test_evaluation_and_export_use_the_moving_averages(workdir):
    training = TrainingConfig(ema_decay=0.7)
    config = make_config(
        workdir,
        head_epochs=3,
        finetune_epochs=0,
        training=training,
        checkpoint=CheckpointConfig(export="last"),
    )
    experiment = cli_experiment.build_experiment(config)
    results = cli_experiment.train(experiment, workdir)
    exported = keras.saving.load_model(results["export"]["model"])
    # The final checkpoint: the model holds the averages, `averages` the raw weights.
    final = tf.train.load_checkpoint(
        tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    )
    raw = [
        final.get_tensor(k)
        for k in sorted(final.get_variable_to_shape_map())
        if k.startswith("averages/")
    ]
    assert raw and not any(np.array_equal(r, v.numpy()) for r in raw for v in exported.head.weights)
    assert trainer.weights_digest(exported) == results["weights_sha256"]
    # The last evaluation was of the averaged weights that were exported.
    accuracy, _ = eval_accuracy(exported, experiment.data.eval)
    assert accuracy == pytest.approx(results["phases"][0]["eval"]["accuracy"], abs=1e-6)


def test_layer_lr_decay_scales_each_layers_update(tmp_path):
    images, labels = _examples(16)
    model = _model()
    phase = _phase("all", lr=1e-2)
    phase_lib.apply_trainability(model, phase)
    multipliers = phase_lib.lr_multipliers(model, 0.5)
    optimizer = make_optimizer(phase.config, model.trainable_variables, multipliers=multipliers)
    assert len(optimizer.optimizers) == 4  # head 1, conv3 0.5, conv2 0.25, conv1 0.125
    before = {v.path: v.numpy() for v in model.trainable_variables}
    step = _compiled(model, optimizer, phase)
    step(iter(tf.data.Dataset.from_tensors((images, labels))), 1)
    # Adam's first step moves a weight by its rate x |g| / (|g| + eps): the largest, by the rate.
    moved = {
        v.path: float(np.max(np.abs(v.numpy() - before[v.path])))
        for v in model.trainable_variables
        if v.path.endswith("kernel")
    }
    rates = {path.split("/")[-2]: value for path, value in moved.items()}
    assert rates["logits"] == pytest.approx(1e-2, rel=1e-3)
    for layer, expected in (("conv3", 5e-3), ("conv2", 2.5e-3), ("conv1", 1.25e-3)):
        assert rates[layer] == pytest.approx(expected, rel=1e-3), layer
    # The grouped optimizer checkpoints and restores like one optimizer.
    path = tf.train.Checkpoint(optimizer=optimizer).save(str(tmp_path / "ckpt"))
    other = make_optimizer(phase.config, model.trainable_variables, multipliers=multipliers)
    tf.train.Checkpoint(optimizer=other).restore(path).assert_existing_objects_matched()
    for a, b in zip(optimizer.variables, other.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("policy", ["float16", "bfloat16"])
def test_mixed_precision_computes_low_and_keeps_float32_weights_and_output(policy):
    config = ModelConfig(image_size=16, dropout=0.0, mixed_precision=policy)
    model = build_model(config, 3)
    assert keras.config.dtype_policy().name == "float32"  # the global policy is put back
    conv = model.backbone.get_layer("conv1")
    assert conv.compute_dtype == policy and conv.variable_dtype == "float32"
    images, _ = _examples(2)
    assert model.backbone(images).dtype == policy
    assert model(images).dtype == "float32"


def test_float16_overflow_is_left_to_the_loss_scale_optimizer():
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(image_size=16, dropout=0.0, mixed_precision="float16"), 3)
    phase = _phase(lr=1e-2)
    phase_lib.apply_trainability(model, phase)
    optimizer = make_optimizer(phase.config, model.trainable_variables, loss_scale=True)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    step = _compiled(model, optimizer, phase)
    images, labels = _examples(16)
    batches = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
    optimizer.dynamic_scale.assign(2.0**120)  # float16 gradients overflow at this scale
    before = snapshot(model.head)
    result = step(batches, 1)
    assert result.nonfinite.tolist() == []  # the loss is finite: not a NaN step for tlloop
    assert float(optimizer.dynamic_scale.numpy()) == 2.0**119  # the optimizer backed off
    assert all(np.array_equal(v, snapshot(model.head)[k]) for k, v in before.items())
    optimizer.dynamic_scale.assign(2.0**10)
    step(batches, 1)
    assert any(not np.array_equal(v, snapshot(model.head)[k]) for k, v in before.items())


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("adam", keras.optimizers.Adam),
        ("adamw", keras.optimizers.AdamW),
        ("sgd", keras.optimizers.SGD),
        ("lamb", keras.optimizers.Lamb),
    ],
)
def test_each_optimizer_is_built_on_the_phase_variables_and_trains(name, kind):
    images, labels = _examples(16)
    model = _model()
    phase = _phase(lr=1e-2)
    before = snapshot(model.head)
    step, _ = _train(
        model,
        phase,
        tf.data.Dataset.from_tensors((images, labels)),
        1,
        batch=16,
        training=TrainingConfig(optimizer=name, weight_decay=0.01),
    )
    assert type(step.optimizer) is kind
    assert step.optimizer.weight_decay == pytest.approx(0.01)
    assert int(step.optimizer.iterations.numpy()) == 1
    assert all(not np.array_equal(v, snapshot(model.head)[k]) for k, v in before.items())
