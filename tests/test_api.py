"""The Python API with a model, data, loss, metrics and callbacks tlloop did not build.

Every promise of DESIGN.md section 1 is checked here on the API path itself: BatchNorm
statistics untouched, gradients only to the trainable set, a stale compiled step refused,
evaluation exactly once (1 replica here, 2 in test_api_distributed), exact resume after SIGKILL
(test_api_resume), TensorBoard; plus custom tasks and Keras callbacks.
"""

from __future__ import annotations

import csv
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import brightest_channel, changed, run_python, snapshot
from tensorboard.backend.event_processing import event_accumulator

import tlloop
from tlloop import checkpoints as checkpoint_lib
from tlloop import lr_range
from tlloop.data.examples import InMemoryExamples, StreamedExamples, as_examples, example_index
from tlloop.loop.position import stored

SIZE, CLASSES = 12, 3


def _data(count: int, seed: int):
    """Images whose class is the brightest colour channel: learnable in a few steps."""
    return brightest_channel(count, seed, SIZE, CLASSES)


def _model(dropout: float = 0.0) -> tlloop.TransferModel:
    """A user's backbone: conv, BatchNorm with moving statistics far from their initial
    values (as a pretrained one has), ReLU; and a user's head."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(6, 3, name="conv")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    backbone = keras.Model(inputs, keras.layers.ReLU()(x), name="backbone")
    bn = backbone.get_layer("bn")
    bn.moving_mean.assign(np.linspace(-0.2, 0.2, 6).astype("float32"))
    bn.moving_variance.assign(np.linspace(0.5, 2.0, 6).astype("float32"))
    features = keras.Input(backbone.outputs[0].shape[1:])
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    pooled = keras.layers.Dropout(dropout)(pooled)
    head = keras.Model(features, keras.layers.Dense(CLASSES, name="logits")(pooled), name="head")
    return tlloop.TransferModel(backbone, head)


def _phases(head: int = 1, finetune: int = 1):
    return [
        tlloop.Phase("head", head, 3e-2, tlloop.Unfreeze("none")),
        tlloop.Phase("finetune", finetune, 1e-2, tlloop.Unfreeze("all")),
    ]


def _quiet(**kw):
    return tlloop.LoggingConfig(quiet=True, **kw)


def _tensors(logdir: str, tag: str) -> dict[int, float]:
    events = event_accumulator.EventAccumulator(logdir, size_guidance={"tensors": 0})
    events.Reload()
    return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)}


def test_promises_hold_for_a_users_model_and_arrays(tmp_path):
    model = _model()
    bn_before = snapshot(model.backbone.get_layer("bn"))
    train, evaluation = _data(48, 1), _data(13, 2)
    head_only = tlloop.Trainer(
        str(tmp_path / "head"),
        phases=_phases(2, 0),
        task=tlloop.Classification(CLASSES),
        logging=_quiet(),
    )
    backbone_before, head_before = snapshot(model.backbone), snapshot(model.head)
    results = head_only.fit(model, train, evaluation, batch_size=8, eval_batch_size=5)
    # Gradients only to the trainable set: the frozen backbone is bit-identical, the head moved.
    assert changed(backbone_before, snapshot(model.backbone)) == set()
    assert changed(head_before, snapshot(model.head))
    assert results.phases[0]["eval"]["examples"] == 13  # 3 batches of 5, the last padded

    both = tlloop.Trainer(
        str(tmp_path / "both"),
        phases=_phases(1, 2),
        task=tlloop.Classification(CLASSES),
        checkpoint=tlloop.CheckpointConfig(export="last"),  # the model keeps its last weights
        logging=_quiet(),
    )
    results = both.fit(model, train, evaluation, batch_size=8, eval_batch_size=5)
    assert changed(backbone_before, snapshot(model.backbone)) >= {"conv/kernel"}
    # The backbone ran in inference mode though it trained: BatchNorm statistics untouched.
    assert changed(bn_before, snapshot(model.backbone.get_layer("bn"))) == set()
    assert [p["eval"]["examples"] for p in results.phases] == [13, 13]
    assert results.phases[-1]["eval"]["accuracy"] > 1 / CLASSES + 0.2


def test_a_phase_brings_its_own_optimizer(tmp_path):
    optimizer = keras.optimizers.SGD(learning_rate=0.0, momentum=0.9)  # rate 0: nothing moves
    phases = [
        tlloop.Phase("head", 1, optimizer=optimizer),
        tlloop.Phase("finetune", 1, 1e-2, unfreeze="all"),
    ]
    model = _model()
    head_before, backbone_before = snapshot(model.head), snapshot(model.backbone)
    trainer = tlloop.Trainer(
        str(tmp_path), phases=phases, checkpoint=tlloop.CheckpointConfig(export="last")
    )
    head_only = tlloop.Trainer(str(tmp_path / "h"), phases=phases[:1])
    head_only.fit(model, _data(16, 1), _data(4, 2), batch_size=8, export=False)
    assert changed(head_before, snapshot(model.head)) == set()  # SGD at rate 0, not Adam
    assert not optimizer.built  # the phase's optimizer is a template: each stage gets a copy
    trainer.fit(model, _data(16, 1), _data(4, 2), batch_size=8)
    assert changed(backbone_before, snapshot(model.backbone)) >= {"conv/kernel"}
    with pytest.raises(ValueError, match=r"give a learning rate or an optimizer"):
        tlloop.Phase("head", 1, 1e-3, optimizer=optimizer)


def test_a_phase_can_set_its_mode_table(tmp_path):
    dropout_on = tlloop.ModeTable(train=tlloop.Modes(augment=False, backbone=True, head=True))
    phases = [tlloop.Phase("finetune", 1, 1e-3, unfreeze="all", modes=dropout_on)]
    model = _model()
    trainer = tlloop.Trainer(str(tmp_path), phases=phases)
    assert "| train | training=False | training=True | training=True |" in trainer.describe(model)
    bn = snapshot(model.backbone.get_layer("bn"))
    trainer.fit(model, _data(16, 1), _data(4, 2), batch_size=8)
    # The backbone ran in training mode, but its BatchNorm was left untrainable (bn_mode
    # "frozen"), and BatchNorm uses batch statistics only when it is also trainable.
    assert changed(bn, snapshot(model.backbone.get_layer("bn"))) == set()
    with pytest.raises(ValueError, match=r"given together with a mode table"):
        tlloop.Phase("finetune", 1, 1e-3, bn_mode="train", modes=dropout_on)


def test_the_range_test_runs_from_python_on_any_model_and_data():
    model = _model()
    before = snapshot(model)
    phase = tlloop.Phase("head", 1, "auto")  # the rate is what the test finds
    result = lr_range.range_test(
        model, _data(32, 1), phase, batch_size=8, low=1e-4, high=1.0, steps=8
    )
    rates = np.asarray(result.rates)
    assert len(rates) == len(result.losses) == len(result.smoothed) >= 2
    assert rates[0] == pytest.approx(1e-4, rel=1e-5) and rates.max() <= 1.0 * (1 + 1e-5)
    assert np.all(np.diff(rates) > 0)  # the curve: one loss per rate, the rate rising
    # The suggestion, a tenth of a rate the test ran, lies in the swept range (over ten).
    assert np.min(np.abs(rates - 10 * result.suggestion)) <= 1e-6 * result.suggestion
    assert changed(before, snapshot(model)) == set()  # every weight put back
    with pytest.raises(tlloop.ConfigError, match=r"^low=1\.0: not below high=0\.1"):
        lr_range.range_test(model, _data(32, 1), phase, low=1.0, high=0.1)
    with pytest.raises(tlloop.ConfigError, match=r"^steps=1: too few"):
        lr_range.range_test(model, _data(32, 1), phase, steps=1)
    with pytest.raises(tlloop.ConfigError, match=r"^batch_size=0: not positive"):
        lr_range.range_test(model, _data(32, 1), phase, batch_size=0)
    with pytest.raises(tlloop.ConfigError, match=r"^head\.epochs=0: the phase does not train"):
        lr_range.range_test(model, _data(32, 1), tlloop.Phase("head", 0, "auto"))


class _Unfreezer(keras.callbacks.Callback):
    """Changes the trainable set behind the trainer's back, after the first epoch."""

    def on_epoch_end(self, epoch, logs=None):
        self.model.backbone.trainable = True


def test_a_stale_compiled_step_is_refused(tmp_path):
    trainer = tlloop.Trainer(
        str(tmp_path), phases=_phases(2, 0), callbacks=[_Unfreezer()], logging=_quiet()
    )
    with pytest.raises(RuntimeError, match="trainable set changed under a compiled train step"):
        trainer.fit(_model(), _data(16, 1), _data(5, 2), batch_size=8)


def _double_crossentropy(labels, logits):
    """A custom loss: twice the cross-entropy, one value per example."""
    return 2.0 * keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def test_custom_loss_and_metrics_reach_tensorboard_jsonl_results_and_the_best(tmp_path):
    task = tlloop.Task(
        _double_crossentropy,
        [
            keras.metrics.SparseCategoricalAccuracy(name="acc"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2"),
        ],
        step_metrics={
            "hit": lambda y, out: tf.cast(tf.argmax(out, -1, output_type=y.dtype) == y, "float32")
        },
    )
    workdir = str(tmp_path)
    trainer = tlloop.Trainer(
        workdir,
        phases=_phases(2, 1),
        task=task,
        checkpoint=tlloop.CheckpointConfig(
            best_metric=tlloop.BestMetric("top2", "max"), export="last"
        ),
        logging=_quiet(log_every_steps=2),
    )
    model = _model()
    evaluation = _data(13, 2)
    results = trainer.fit(model, _data(32, 1), evaluation, batch_size=8)
    last = results.phases[-1]["eval"]
    assert set(last) == {"loss", "acc", "top2", "examples"}
    assert results.best["metric"] == "top2:max"
    # The reported loss is the custom one, on the model as it ended (the last weights).
    logits = tlloop.predict(model, evaluation[0])
    expected = np.mean(_double_crossentropy(evaluation[1], logits))
    assert last["loss"] == pytest.approx(float(expected), rel=1e-5)
    with open(os.path.join(workdir, "metrics.jsonl")) as file:
        rows = [json.loads(line) for line in file]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["top2"] for r in evals][-1] == pytest.approx(last["top2"])
    trains = [r for r in rows if r["kind"] == "train"]
    assert trains and all({"loss", "hit", "learning_rate"} <= set(r) for r in trains)
    logdir = os.path.join(workdir, "tensorboard")
    top2 = _tensors(os.path.join(logdir, "eval"), "top2")
    assert sorted(top2) == [r["step"] for r in evals]
    assert top2[evals[-1]["step"]] == pytest.approx(last["top2"], rel=1e-6)
    assert _tensors(os.path.join(logdir, "train"), "hit")


def test_csv_logger_rows_hold_the_values_tensorboard_has(tmp_path):
    workdir, log = str(tmp_path / "run"), str(tmp_path / "epochs.csv")
    trainer = tlloop.Trainer(
        workdir,
        phases=_phases(2, 1),
        task=tlloop.Classification(CLASSES),
        callbacks=[keras.callbacks.CSVLogger(log)],
        logging=_quiet(),
    )
    results = trainer.fit(_model(), _data(24, 1), _data(7, 2), batch_size=8)
    with open(log) as file:
        rows = list(csv.DictReader(file))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]  # epochs counted across phases
    steps = [3, 6, 9]  # 3 steps an epoch
    logdir = os.path.join(workdir, "tensorboard")
    for name, writer, tag in (
        ("loss", "train", "epoch/loss"),
        ("accuracy", "train", "epoch/accuracy"),
        ("val_loss", "eval", "loss"),
        ("val_accuracy", "eval", "accuracy"),
    ):
        logged = _tensors(os.path.join(logdir, writer), tag)
        assert [float(r[name]) for r in rows] == pytest.approx([logged[s] for s in steps])
    assert float(rows[-1]["val_loss"]) == pytest.approx(results.phases[-1]["eval"]["loss"])


def test_terminate_on_nan_ends_each_phase_cleanly_with_the_checkpoint_intact(tmp_path):
    images, labels = _data(32, 1)
    images[5, 0, 0, 0] = np.nan  # one poisoned example: its step's loss is NaN
    workdir = str(tmp_path)
    trainer = tlloop.Trainer(
        workdir,
        phases=_phases(2, 2),
        callbacks=[keras.callbacks.TerminateOnNaN()],
        nan_policy="skip_step",
        logging=_quiet(log_every_steps=1),
    )
    model = _model()
    results = trainer.fit(model, (images, labels), _data(5, 2), batch_size=8)
    # model.stop_training ends the phase under way at the NaN step (as it ends one fit); the
    # next phase runs and meets the same example.
    head, finetune = results.phases
    assert head["stopped_by"] == finetune["stopped_by"] == "callback"
    assert head["stopped_early"] and head["epochs_run"] == 1 and head["last_step"] < 4
    assert finetune["stopped_early"] and finetune["last_step"] < head["last_step"] + 8
    assert results["nonfinite_steps_skipped"] == 2
    latest = checkpoint_lib.latest(os.path.join(workdir, "checkpoints"))
    fresh = _model()
    tf.train.Checkpoint(model=fresh).restore(latest).expect_partial()
    assert all(np.all(np.isfinite(v.numpy())) for v in fresh.weights)
    assert stored(latest)[1] == finetune["last_step"]
    # The run is over: calling again resumes a finished run and trains nothing more.
    again = trainer.fit(_model(), (images, labels), _data(5, 2), batch_size=8)
    assert again.weights_sha256 == results.weights_sha256


def test_early_stopping_ends_each_phase_and_results_say_what_ran(tmp_path):
    # No evaluation improves by 2: each phase's first is its best (EarlyStopping starts afresh
    # at each phase, as at each fit), its second stops it (patience 1).
    stop = keras.callbacks.EarlyStopping("val_accuracy", mode="max", min_delta=2.0, patience=1)
    trainer = tlloop.Trainer(str(tmp_path), phases=_phases(3, 3), callbacks=[stop])
    model = _model()
    results = trainer.fit(model, _data(16, 1), _data(5, 2), batch_size=8)
    assert [p["name"] for p in results.phases] == ["head", "finetune"]
    assert [p["last_step"] for p in results.phases] == [4, 8]  # 2 steps an epoch
    for phase in results.phases:
        assert phase["epochs"] == 3 and phase["epochs_run"] == 2 and phase["stopped_early"]
        assert phase["stopped_by"] == "callback"
    with open(os.path.join(str(tmp_path), "results.json")) as file:
        assert json.load(file)["phases"][0]["epochs_run"] == 2
    exported = keras.saving.load_model(results.export["model"])
    images = _data(4, 3)[0]
    np.testing.assert_array_equal(np.asarray(exported(images)), tlloop.predict(model, images))


@pytest.mark.parametrize(
    "callback",
    [
        keras.callbacks.ReduceLROnPlateau(),
        keras.callbacks.LearningRateScheduler(lambda epoch, rate: rate),
    ],
    ids=lambda c: type(c).__name__,
)
def test_callbacks_that_set_the_optimizers_rate_are_refused_before_training(tmp_path, callback):
    with pytest.raises(
        ValueError, match=r"^callbacks: \w+ sets model.optimizer's .*TrainingConfig"
    ):
        tlloop.Trainer(str(tmp_path), phases=_phases(), callbacks=[callback])
    assert not os.listdir(tmp_path)


class _Boom(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise ValueError("disk on fire")


def test_a_callback_that_raises_stops_the_run_naming_it_and_damages_nothing(tmp_path):
    workdir = str(tmp_path)
    train, evaluation = _data(16, 1), _data(5, 2)
    trainer = tlloop.Trainer(workdir, phases=_phases(2, 1), callbacks=[_Boom()], logging=_quiet())
    with pytest.raises(tlloop.CallbackError, match=r"_Boom\.on_epoch_end raised ValueError"):
        trainer.fit(_model(), train, evaluation, batch_size=8)
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    latest = checkpoint_lib.latest(os.path.join(workdir, "checkpoints"))
    assert stored(latest) == (0, 4)  # saved at the step it stopped
    # The same call without the failing callback resumes there and finishes.
    done = tlloop.Trainer(workdir, phases=_phases(2, 1), logging=_quiet())
    results = done.fit(_model(), train, evaluation, batch_size=8)
    assert results.phases[-1]["last_step"] == 6


def test_a_streamed_tf_data_pipeline_batched_or_not(tmp_path):
    images, labels = _data(21, 1)
    batched = tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(21, seed=3).batch(4)
    examples = as_examples(batched, argument="train")
    assert isinstance(examples, StreamedExamples) and examples.size == 21
    evaluation = tf.data.Dataset.from_tensor_slices(_data(11, 2))
    trainer = tlloop.Trainer(str(tmp_path), phases=_phases(1, 1), logging=_quiet())
    results = trainer.fit(_model(), batched, evaluation, batch_size=8, eval_batch_size=4)
    assert results["train_size"] == 21 and results.phases[-1]["eval"]["examples"] == 11
    assert results.phases[0]["feature_cache"].startswith("off: the data is a stream")
    assert results.phases[-1]["last_step"] == 6  # ceil(21 / 8) steps an epoch


def test_in_memory_order_is_a_seeded_permutation_per_epoch_that_resumes_anywhere():
    examples = InMemoryExamples(np.arange(10, dtype="float32")[:, None], np.zeros(10, "int32"))
    stream = examples.training_batches(4, seed=7)
    seen = np.concatenate([x.numpy()[:, 0] for x, _ in stream.take(5)])  # 20 = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])  # each epoch its own order
    # The stream is the documented order function, position by position.
    assert seen.tolist() == [int(example_index(k, 10, 7)) for k in range(20)]
    late = next(iter(examples.training_batches(4, seed=7, start_step=3)))[0].numpy()[:, 0]
    assert np.array_equal(late, seen[12:16])  # step 4's batch, read directly
    other = np.concatenate([x.numpy()[:, 0] for x, _ in examples.training_batches(4, 8).take(5)])
    assert not np.array_equal(seen, other)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(TypeError, match=r"^model: "):
        tlloop.Trainer(str(tmp_path), phases=_phases()).fit(keras.Sequential(), None, None)
    with pytest.raises(ValueError, match=r"^train: inputs and labels hold different numbers"):
        tlloop.Trainer(str(tmp_path), phases=_phases()).fit(_model(), (np.zeros((3, 2)), [1]), None)
    with pytest.raises(ValueError, match=r"^best_metric=auc:max: the task has no metric 'auc'"):
        tlloop.Trainer(
            str(tmp_path),
            phases=_phases(),
            checkpoint=tlloop.CheckpointConfig(best_metric=tlloop.BestMetric("auc", "max")),
        ).fit(_model(), _data(8, 1), _data(4, 2))
    with pytest.raises(ValueError, match=r"^unfreeze=top:9: the backbone has only 1 layers"):
        phases = [tlloop.Phase("finetune", 1, 1e-3, tlloop.Unfreeze("top", 9))]
        tlloop.Trainer(str(tmp_path), phases=phases).fit(_model(), _data(8, 1), _data(4, 2))
    with pytest.raises(TypeError, match=r"^callbacks: int is not a keras.callbacks.Callback"):
        tlloop.Trainer(str(tmp_path), phases=_phases(), callbacks=[3])
    with pytest.raises(ValueError, match=r"^loss='nope': Keras knows no such loss"):
        tlloop.Task("nope")
    assert not os.listdir(tmp_path)  # nothing written by any of them


def test_import_tlloop_registers_what_load_model_needs(tmp_path):
    trainer = tlloop.Trainer(str(tmp_path), phases=_phases(1, 0), logging=_quiet())
    model = _model()
    results = trainer.fit(model, _data(8, 1), _data(4, 2), batch_size=4)
    images = _data(3, 3)[0]
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "expected.npy", tlloop.predict(model, images))
    script = (
        "import sys, keras, numpy as np, tlloop\n"
        "model = keras.saving.load_model(sys.argv[1])\n"
        "out = np.asarray(model(np.load(sys.argv[2])))\n"
        "print(float(np.max(np.abs(out - np.load(sys.argv[3])))))\n"
    )
    paths = [results.export["model"], tmp_path / "images.npy", tmp_path / "expected.npy"]
    done = run_python("-c", script, *map(str, paths), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 1e-5
