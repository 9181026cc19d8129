"""MixUp and CutMix: pixels and soft labels follow the drawn lambda, training only."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import flag_error, make_config, run_python

from tlloop.cli import experiment as cli_experiment
from tlloop.cli.config import ModelConfig
from tlloop.cli.model import build_model
from tlloop.config import TrainingConfig
from tlloop.mixing import Mixing, mixed_loss, soft_labels
from tlloop.models import ModeTable
from tlloop.steps import Metrics, StepOptions, compile_eval, compile_train, mixing_of
from tlloop.tasks import Classification


def _images(shape=(8, 10, 12, 3), seed=0):
    # Continuous random pixels: no two examples share a pixel value.
    return tf.constant(np.random.default_rng(seed).uniform(0, 255, shape), tf.float32)


def test_mixup_blends_pixels_and_labels_with_the_drawn_lambda():
    images = _images()
    labels = tf.constant([0, 1, 2, 3, 4, 0, 1, 2])
    mixed = Mixing(mixup=0.4, seed=3).draw(images, step=5)
    lam = mixed.lam.numpy()
    assert np.all(lam == lam[0]) and 0 < lam[0] < 1
    assert sorted(mixed.partner.numpy()) == list(range(8))  # a permutation of the batch
    others = tf.gather(images, mixed.partner)
    expected = lam[0] * images + (1 - lam[0]) * others
    assert np.allclose(mixed.inputs.numpy(), expected.numpy(), atol=1e-4)
    soft = soft_labels(labels, mixed, 5).numpy()
    assert np.allclose(soft.sum(axis=1), 1.0, atol=1e-6)
    own, partner = labels.numpy(), labels.numpy()[mixed.partner.numpy()]
    for i in range(8):
        assert np.isclose(soft[i, own[i]], lam[0] + (1 - lam[0]) * (own[i] == partner[i]))
    # Stateless: the same (seed, step) draws the same; another step draws another lambda.
    again = Mixing(mixup=0.4, seed=3).draw(images, step=5)
    assert np.array_equal(again.inputs.numpy(), mixed.inputs.numpy())
    assert Mixing(mixup=0.4, seed=3).draw(images, step=6).lam.numpy()[0] != lam[0]


def test_cutmix_pastes_a_box_whose_area_is_one_minus_lambda():
    images = _images()
    for step in range(6):
        mixed = Mixing(cutmix=1.0, seed=1).draw(images, step=step)
        lam = float(mixed.lam.numpy()[0])
        out, own = mixed.inputs.numpy(), images.numpy()
        other = tf.gather(images, mixed.partner).numpy()
        from_other = np.all(out == other, axis=-1)
        assert np.all(from_other | np.all(out == own, axis=-1))  # each pixel is one or other
        moved = mixed.partner.numpy() != np.arange(8)
        # The lambda is the fraction of each image left its own (the clipped box's area).
        assert np.allclose(1 - from_other[moved].mean(axis=(1, 2)), lam)
        soft = soft_labels(tf.range(8) % 5, mixed, 5).numpy()
        assert np.allclose(soft.sum(axis=1), 1.0, atol=1e-6)


def test_mix_prob_leaves_some_batches_unmixed_and_both_methods_take_turns():
    images = _images((4, 8, 8, 3))
    mixing = Mixing(mixup=0.5, cutmix=0.5, prob=0.5, seed=0)
    draws = [mixing.draw(images, step=step) for step in range(40)]
    unmixed = [d for d in draws if d.lam.numpy()[0] == 1.0]
    assert 5 < len(unmixed) < 35
    assert all(np.array_equal(d.inputs.numpy(), images.numpy()) for d in unmixed)
    boxes = [d for d in draws if d.lam.numpy()[0] < 1 and _is_box(d, images)]
    assert 0 < len(boxes) < len(draws) - len(unmixed)  # CutMix some batches, MixUp others


def _is_box(mixed, images) -> bool:
    same = np.all(mixed.inputs.numpy() == images.numpy(), axis=-1)
    return bool(same.any())


def test_the_mixed_loss_is_the_soft_labels_loss_with_smoothing_and_class_weights():
    logits = tf.constant(np.random.default_rng(2).normal(size=(8, 5)), tf.float32)
    labels = tf.constant([0, 1, 2, 3, 4, 0, 1, 2])
    mixed = Mixing(mixup=1.0, seed=7).draw(_images(), step=0)
    smooth = Classification(5, label_smoothing=0.1)
    expected = keras.losses.categorical_crossentropy(
        soft_labels(labels, mixed, 5), logits, from_logits=True, label_smoothing=0.1
    )
    got = mixed_loss(smooth.train_loss, labels, logits, mixed)
    assert np.allclose(got.numpy(), expected.numpy(), atol=1e-5)
    weights = np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
    weighted = Classification(5, label_smoothing=0.1, class_weights=weights)
    got = mixed_loss(weighted.train_loss, labels, logits, mixed).numpy()
    own = smooth.train_loss(labels, logits).numpy() * weights[labels.numpy()]
    partner = labels.numpy()[mixed.partner.numpy()]
    other = smooth.train_loss(tf.constant(partner), logits).numpy() * weights[partner]
    lam = mixed.lam.numpy()
    assert np.allclose(got, lam * own + (1 - lam) * other, atol=1e-5)


def test_the_train_step_mixes_and_the_eval_step_does_not():
    images, labels = _images((16, 16, 16, 3)), tf.constant(np.arange(16) % 3)
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(image_size=16, dropout=0.0), 3)
    logits = model.head.get_layer("logits")
    # Confident logits, so that mixing visibly changes the loss.
    logits.set_weights([w * 100 for w in logits.get_weights()])
    optimizer = keras.optimizers.SGD(learning_rate=1e-12)
    optimizer.build(model.trainable_variables)
    mixing = Mixing(mixup=1.0, seed=4)
    metrics = Metrics()
    options = StepOptions(
        batch_size=16,
        eval_batch_size=16,
        seed=mixing.seed,
        training=TrainingConfig(mixup=mixing.mixup),
        log_every_steps=0,
    )
    step = compile_train(
        model, optimizer, ModeTable(), metrics, tf.Variable(3, dtype=tf.int64), options
    )
    assert mixing_of(options) == mixing  # the step mixes as `mixing` draws
    step(iter(tf.data.Dataset.from_tensors((images, labels)).repeat()), 1)
    drawn = mixing.draw(images, step=3)  # the step mixed at global step 3, replica 0
    task = Classification()
    want = mixed_loss(task.train_loss, labels, model(drawn.inputs), drawn).numpy().mean()
    plain = task.eval_loss(labels, model(images)).numpy().mean()
    assert np.isclose(metrics.result()["loss"], want, rtol=1e-4)
    assert not np.isclose(want, plain, rtol=1e-3)
    eval_metrics = Metrics()
    weights = tf.ones([16])
    compile_eval(model, ModeTable(), eval_metrics)(
        iter(tf.data.Dataset.from_tensors((images, labels, weights))), 1
    )
    assert np.isclose(eval_metrics.result()["loss"], plain, rtol=1e-4)


def test_mixing_turns_the_feature_cache_off_and_says_why(workdir):
    config = make_config(workdir, finetune_epochs=0, mixup=0.2, cutmix=1.0, mix_prob=0.5)
    results = cli_experiment.train(cli_experiment.build_experiment(config), workdir)
    reason = results.phases[0]["feature_cache"]
    assert reason.startswith("off: mixup 0.2 and cutmix 1.0 (alpha), probability 0.5")
    with open(os.path.join(workdir, "results.json")) as file:
        assert json.load(file)["phases"][0]["feature_cache"] == reason


def test_flags_and_arguments_that_cannot_act_are_refused():
    with flag_error(r"^--mix_prob=0\.5: there is no --mixup or --cutmix"):
        TrainingConfig(mix_prob=0.5)
    with flag_error(r"^--cutmix=-1\.0: out of range"):
        TrainingConfig(cutmix=-1.0)
    with pytest.raises(ValueError, match=r"^cutmix: inputs of rank 2"):
        Mixing(cutmix=1.0).draw(tf.zeros([4, 7]), step=0)
    with pytest.raises(ValueError, match=r"^mixup/cutmix: the inputs are dict"):
        Mixing(mixup=1.0).draw({"tokens": tf.zeros([4, 7], tf.int32)}, step=0)


# Two replicas on two logical CPUs, in a fresh process (devices are split before TF starts).
_TWO_REPLICAS = """
import json

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np

from tlloop.cli.config import ModelConfig
from tlloop.distribute import distribute_dataset
from tlloop.mixing import Mixing, mixed_loss
from tlloop.models import ModeTable
from tlloop.cli.model import build_model
from tlloop.config import TrainingConfig
from tlloop.steps import Metrics, StepOptions, compile_train
from tlloop.tasks import Classification

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
rng = np.random.default_rng(0)
images = tf.constant(rng.uniform(0, 255, (16, 16, 16, 3)), tf.float32)
labels = tf.constant(np.arange(16) % 3)
mixing = Mixing(mixup=1.0, seed=4)
with strategy.scope():
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(image_size=16, dropout=0.0), 3)
    logits = model.head.get_layer("logits")
    logits.set_weights([w * 100 for w in logits.get_weights()])
    optimizer = keras.optimizers.SGD(learning_rate=1e-12)
    optimizer.build(model.trainable_variables)
    metrics = Metrics()
    counter = tf.Variable(
        3, dtype=tf.int64, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA
    )
    options = StepOptions(batch_size=16, eval_batch_size=16, seed=mixing.seed,
                          training=TrainingConfig(mixup=mixing.mixup), log_every_steps=0)
    step = compile_train(model, optimizer, ModeTable(), metrics, counter, options)
batches = distribute_dataset(strategy, tf.data.Dataset.from_tensors((images, labels)).repeat())
step(iter(batches), 1)
task = Classification()
total, lams = 0.0, []
for replica in (0, 1):
    half = images[8 * replica : 8 * replica + 8]
    half_labels = labels[8 * replica : 8 * replica + 8]
    drawn = mixing.draw(half, 3, replica)
    lams.append(float(drawn.lam[0]))
    losses = mixed_loss(task.train_loss, half_labels, model(drawn.inputs), drawn)
    total += float(tf.reduce_sum(losses))
print(json.dumps([metrics.result()["loss"], total / 16, lams]))
"""


def test_each_replica_mixes_its_own_half_of_the_global_batch():
    result = run_python("-c", _TWO_REPLICAS, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    logged, expected, lams = json.loads(result.stdout.strip().splitlines()[-1])
    # The step's loss is the mean of each replica's mixed loss on its own 8 examples, each with
    # the lambda drawn for (seed, step, its replica id).
    assert np.isclose(logged, expected, rtol=1e-4)
    assert lams[0] != lams[1]
