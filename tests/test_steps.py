"""The compiled steps: trainable-set capture, modes per step kind, exact evaluation counts."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from conftest import changed, make_config, snapshot

from tlloop import phases as phase_lib
from tlloop.cli import experiment as cli_experiment
from tlloop.cli.config import ModelConfig
from tlloop.cli.model import build_model
from tlloop.config import parse_augment
from tlloop.data.splits import Split
from tlloop.data.storage import padded_eval_dataset
from tlloop.models import ModeTable
from tlloop.steps import Metrics, StepOptions, compile_eval, compile_train


def _step(model, modes, metrics, lr=1e-2):
    optimizer = keras.optimizers.SGD(learning_rate=lr)
    optimizer.build(model.trainable_variables)
    step_counter = tf.Variable(0, dtype=tf.int64)
    return compile_train(model, optimizer, modes, metrics, step_counter, _options())


def _options(**options) -> StepOptions:
    """Batches of 16, no logged rows, and `options`."""
    return StepOptions(batch_size=16, eval_batch_size=16, log_every_steps=0, **options)


def test_a_stale_step_keeps_the_old_trainable_set_and_a_new_one_does_not(workdir):
    experiment = cli_experiment.build_experiment(make_config(workdir))
    model, (head_phase, finetune) = experiment.model, experiment.phases
    batches = iter(experiment.data.train)
    phase_lib.apply_trainability(model, head_phase)
    stale = _step(model, head_phase.modes, Metrics())
    stale(batches, 1)

    phase_lib.apply_trainability(model, finetune)
    assert not stale.matches(model)
    before = snapshot(model.backbone)
    stale(batches, 2)
    # What the trainer guards against: the old trace never touches the unfrozen backbone.
    assert changed(before, snapshot(model.backbone)) == set()

    fresh = _step(model, finetune.modes, Metrics())
    assert fresh.matches(model)
    fresh(batches, 2)
    assert any(path.endswith("kernel") for path in changed(before, snapshot(model.backbone)))


def _one_batch(images, labels):
    return tf.data.Dataset.from_tensors((images, labels)).repeat()


def _train_and_eval_loss(model, images, labels):
    """The train step's loss (before its tiny update) and the eval step's loss, same batch."""
    train_metrics, eval_metrics = Metrics(), Metrics()
    step = _step(model, ModeTable(), train_metrics, lr=1e-12)
    step(iter(_one_batch(images, labels)), 1)
    weights = tf.ones_like(labels, tf.float32)
    evaluation = tf.data.Dataset.from_tensors((images, labels, weights))
    compile_eval(model, ModeTable(), eval_metrics)(iter(evaluation), 1)
    return train_metrics.result()["loss"], eval_metrics.result()["loss"]


def _batch():
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (16, 16, 16, 3)), tf.float32)
    labels = tf.constant(rng.integers(0, 3, 16), tf.int32)
    return images, labels


def test_head_dropout_runs_in_train_steps_only():
    images, labels = _batch()
    keras.utils.set_random_seed(1)
    with_dropout = build_model(ModelConfig(image_size=16, dropout=0.9), 3)
    train_loss, eval_loss = _train_and_eval_loss(with_dropout, images, labels)
    assert abs(train_loss - eval_loss) > 1e-3
    without = build_model(ModelConfig(image_size=16, dropout=0.0), 3)
    without.backbone.set_weights(with_dropout.backbone.get_weights())
    logits = with_dropout.head.get_layer("logits").get_weights()
    without.head.get_layer("logits").set_weights(logits)
    # Inference with dropout 0.9 equals inference of the same weights without dropout.
    assert np.array_equal(np.asarray(with_dropout(images)), np.asarray(without(images)))
    train_loss, eval_loss = _train_and_eval_loss(without, images, labels)
    assert abs(train_loss - eval_loss) < 1e-5


def test_augmentation_runs_in_train_steps_only():
    images, labels = _batch()
    keras.utils.set_random_seed(1)
    config = ModelConfig(image_size=16, dropout=0.0, augment=parse_augment("translate:0.5"))
    model = build_model(config, 3)
    train_loss, eval_loss = _train_and_eval_loss(model, images, labels)
    assert abs(train_loss - eval_loss) > 1e-3
    plain = np.asarray(model.head(model.backbone(images, training=False), training=False))
    assert np.array_equal(np.asarray(model(images)), plain)


def test_eval_counts_every_example_once():
    for size, batch in ((7, 3), (10, 4), (5, 5), (1, 8)):
        split = Split(np.zeros((size, 8, 8, 3), np.uint8), np.arange(size, dtype=np.int32) % 3)
        dataset = padded_eval_dataset(split, 8, batch)
        shapes = {tuple(images.shape) for images, _, _ in dataset}
        assert shapes == {(batch, 8, 8, 3)}  # static shapes: no retrace on the last batch
        weights = np.concatenate([w.numpy() for _, _, w in dataset])
        assert weights.sum() == size and len(weights) == -(-size // batch) * batch
        model = build_model(ModelConfig(image_size=8), 3)
        metrics = Metrics()
        compile_eval(model, ModeTable(), metrics)(iter(dataset), -(-size // batch))
        assert metrics.result()["examples"] == size


def test_steps_trace_once_whatever_the_step_count_and_iterator():
    images, labels = _batch()
    model = build_model(ModelConfig(image_size=16), 3)
    step = _step(model, ModeTable(), Metrics())
    for count in (1, 3, 2):
        step(iter(_one_batch(images, labels)), count)
    assert step.global_step.numpy() == 6
    assert step.traces == {"loop": 1}
    weights = tf.ones_like(labels, tf.float32)
    evaluation = tf.data.Dataset.from_tensors((images, labels, weights)).repeat(2)
    eval_step = compile_eval(model, ModeTable(), Metrics())
    for count in (1, 2):
        eval_step(iter(evaluation), count)
    assert eval_step.traces == {"loop": 1}


def _trained_weights(jit_compile: bool, images, labels):
    keras.utils.set_random_seed(5)
    model = build_model(ModelConfig(image_size=16, dropout=0.0), 3)
    model.backbone.trainable = True
    optimizer = keras.optimizers.Adam(learning_rate=1e-2)
    optimizer.build(model.trainable_variables)
    step = compile_train(
        model,
        optimizer,
        ModeTable(),
        Metrics(),
        tf.Variable(0, dtype=tf.int64),
        _options(jit_compile=jit_compile),
    )
    step(iter(_one_batch(images, labels)), 3)
    return [np.array(v.numpy()) for v in model.trainable_variables], step


def test_jit_compiled_step_matches_the_plain_step():
    images, labels = _batch()
    plain, _ = _trained_weights(False, images, labels)
    jitted, step = _trained_weights(True, images, labels)
    assert step.traces == {"loop": 1, "xla": 1}  # the XLA part exists and ran
    # XLA fuses and reorders float32 arithmetic; after 3 Adam steps at lr 1e-2 the weights
    # agree to 3.3e-6 here, far below the 1e-2 scale of one update.
    for a, b in zip(plain, jitted, strict=True):
        assert np.allclose(a, b, atol=1e-4)


def _nan_policy_step(model, policy: str):
    optimizer = keras.optimizers.Adam(learning_rate=1e-2)
    optimizer.build(model.trainable_variables)
    counter = tf.Variable(0, dtype=tf.int64)
    metrics = Metrics()
    step = compile_train(
        model, optimizer, ModeTable(), metrics, counter, _options(nan_policy=policy)
    )
    return step, optimizer, metrics


def _batches_with_nan_at(positions: set[int], count: int):
    images, labels = _batch()
    poisoned = tf.tensor_scatter_nd_update(images, [[3, 0, 0, 0]], [float("nan")])
    batches = [(poisoned if i in positions else images, labels) for i in range(count)]
    return tf.data.Dataset.from_tensor_slices(
        (tf.stack([b[0] for b in batches]), tf.stack([b[1] for b in batches]))
    )


def test_a_nan_step_applies_no_update_and_skip_step_goes_on():
    model = build_model(ModelConfig(image_size=16), 3)
    step, optimizer, metrics = _nan_policy_step(model, "skip_step")
    batches = iter(_batches_with_nan_at({1}, 3))
    step(batches, 1)
    before, iterations = snapshot(model), int(optimizer.iterations.numpy())
    result = step(batches, 1)  # the poisoned batch: one image holds a NaN pixel
    assert result.nonfinite.tolist() == [2] and int(step.global_step.numpy()) == 2
    assert changed(before, snapshot(model)) == set()
    assert int(optimizer.iterations.numpy()) == iterations
    assert np.isfinite(metrics.result()["loss"]) and metrics.result()["examples"] == 16
    result = step(batches, 1)
    assert result.nonfinite.tolist() == [] and changed(before, snapshot(model))


def test_nan_policy_stop_ends_the_call_at_the_bad_step():
    model = build_model(ModelConfig(image_size=16), 3)
    step, optimizer, _ = _nan_policy_step(model, "stop")
    result = step(iter(_batches_with_nan_at({1}, 4)), 4)
    assert result.nonfinite.tolist() == [2]
    assert int(step.global_step.numpy()) == 2 and int(optimizer.iterations.numpy()) == 1
