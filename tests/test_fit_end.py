"""What a fit decides at its start and leaves at its end, on models and data as users bring
them: the export (checked before training, never lost after), the weights the best checkpoint
and the export hold under weight averages, when the feature cache may run, gradient
accumulation's last batches, and whether a user's tf.data dataset is batched."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import brightest_channel, run_python, snapshot

import tlloop

SIZE, CLASSES = 8, 3


def _data(count: int, seed: int):
    """Images whose class is the brightest colour channel: learnable in a few steps."""
    return brightest_channel(count, seed, SIZE, CLASSES)


def _model(dropout: float = 0.0, outputs: int = CLASSES) -> tlloop.TransferModel:
    """A functional backbone (Rescaling, Conv, optional Dropout, pooling) and the built-in
    head, from the same seed every time."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(keras.layers.Rescaling(1 / 255)(inputs))
    x = keras.layers.Dropout(dropout, name="drop")(x)
    backbone = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name="backbone")
    return tlloop.TransferModel(backbone, tlloop.classification_head((4,), outputs, dropout=0.0))


def _quiet() -> tlloop.LoggingConfig:
    return tlloop.LoggingConfig(quiet=True)


@keras.saving.register_keras_serializable(package="tlloop_tests")
class SubclassedBackbone(keras.Model):
    """A subclassed backbone, as researchers write them: layers made in __init__, used in
    call; it declares no inputs or outputs."""

    def __init__(self, filters: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        self.filters = filters
        self.scale = keras.layers.Rescaling(1 / 255)
        self.conv = keras.layers.Conv2D(filters, 3)
        self.pool = keras.layers.GlobalAveragePooling2D()

    def call(self, inputs):
        return self.pool(self.conv(self.scale(inputs)))

    def get_config(self) -> dict:
        return {**super().get_config(), "filters": self.filters}


class UnregisteredBackbone(SubclassedBackbone):
    """The same, never registered with Keras: its .keras file could not be loaded."""


class WrapperBackbone(keras.Model):
    """Registered below, but its __init__ takes a model and an array and it has no
    get_config: Keras cannot save it."""

    def __init__(self, inner, table, **kwargs) -> None:
        super().__init__(**kwargs)
        self.inner, self.table = inner, table

    def call(self, inputs):
        return self.inner(inputs)


keras.saving.register_keras_serializable(package="tlloop_tests")(WrapperBackbone)


def _subclassed(kind=SubclassedBackbone) -> tlloop.TransferModel:
    keras.utils.set_random_seed(0)
    backbone = (
        kind() if kind is not WrapperBackbone else WrapperBackbone(SubclassedBackbone(), np.ones(3))
    )
    backbone(np.zeros((1, SIZE, SIZE, 3), "float32"))  # builds its weights
    return tlloop.TransferModel(backbone, tlloop.classification_head((4,), CLASSES, dropout=0.0))


# The export, decided before training and never lost after (item 5).


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (
            UnregisteredBackbone,
            r"class test_fit_end\.UnregisteredBackbone is not registered with Keras",
        ),
        (WrapperBackbone, r"class WrapperBackbone cannot be saved: .* get_config"),
    ],
)
def test_a_model_keras_cannot_save_is_refused_before_anything_is_written(tmp_path, kind, message):
    workdir = str(tmp_path / "run")
    trainer = tlloop.Trainer(workdir, phases=[tlloop.Phase("head", 1, 1e-2)])
    with pytest.raises(ValueError, match=f"^export: {message}") as refused:
        trainer.fit(_subclassed(kind), _data(8, 1), _data(4, 2), batch_size=4)
    assert "\n" not in str(refused.value) and str(refused.value).endswith("or export=False")
    assert not os.path.exists(workdir)
    # Without the export the same model trains.
    results = trainer.fit(_subclassed(kind), _data(8, 1), _data(4, 2), batch_size=4, export=False)
    assert "export" not in results


def test_tflite_files_the_model_or_task_cannot_give_are_refused_before_training(tmp_path):
    workdir = str(tmp_path / "run")
    loss = tlloop.BestMetric("loss", "min")
    tflite = tlloop.CheckpointConfig(export_tflite=("float32",), best_metric=loss)
    regression = tlloop.Regression(1, targets=np.zeros((8, 1), "float32"))
    phases = [tlloop.Phase("head", 1, 1e-2)]
    trainer = tlloop.Trainer(workdir, phases=phases, task=regression, checkpoint=tflite)
    targets = (_data(8, 1)[0], np.zeros(8, "float32"))
    refused = r"^checkpoint.export_tflite=float32: "
    with pytest.raises(ValueError, match=refused + "task: TFLite export serves"):
        trainer.fit(_model(outputs=1), targets, targets)
    trainer = tlloop.Trainer(workdir, phases=phases, checkpoint=tflite)
    with pytest.raises(ValueError, match=refused + "model: the backbone takes no declared"):
        trainer.fit(_subclassed(), _data(8, 1), _data(4, 2))
    assert not os.path.exists(workdir)


def test_a_subclassed_backbone_exports_files_that_load_and_serve_the_same_outputs(tmp_path):
    trainer = tlloop.Trainer(
        str(tmp_path / "run"), phases=[tlloop.Phase("head", 1, 1e-2)], logging=_quiet()
    )
    model = _subclassed()
    results = trainer.fit(model, _data(8, 1), _data(4, 2), batch_size=4)
    assert results.export["saved_model"] is not None
    images = _data(3, 3)[0]
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "expected.npy", tlloop.predict(model, images))
    # A new process: tlloop and the module that registers the user's class, nothing else.
    script = (
        "import sys, keras, numpy as np, tensorflow as tf, tlloop\n"
        "sys.path.insert(0, sys.argv[4]); import test_fit_end\n"
        "images, expected = np.load(sys.argv[2]), np.load(sys.argv[3])\n"
        "loaded = keras.saving.load_model(sys.argv[1] + '/model.keras')\n"
        "print(float(np.max(np.abs(np.asarray(loaded(images)) - expected))))\n"
        "serve = tf.saved_model.load(sys.argv[1] + '/saved_model').signatures['serving_default']\n"
        "served = serve(images=tf.constant(images))['probabilities'].numpy()\n"
        "print(float(np.max(np.abs(served - tf.nn.softmax(expected).numpy()))))\n"
    )
    directory = os.path.dirname(results.export["model"])
    paths = [directory, tmp_path / "images.npy", tmp_path / "expected.npy"]
    done = run_python("-c", script, *map(str, paths), os.path.dirname(__file__), timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    keras_error, served_error = map(float, done.stdout.split()[-2:])
    assert keras_error < 1e-5 and served_error < 1e-5


class _ExportInTheWay(keras.callbacks.Callback):
    """Puts a file of its own where the export directory goes, as the run ends."""

    def on_train_end(self, logs=None):
        with open(os.path.join(self.workdir, "export"), "w") as file:
            file.write("mine")


def test_an_export_that_fails_at_the_end_loses_neither_results_nor_checkpoints(tmp_path):
    workdir = str(tmp_path / "run")
    in_the_way = _ExportInTheWay()
    in_the_way.workdir = workdir
    trainer = tlloop.Trainer(
        workdir, phases=[tlloop.Phase("head", 1, 1e-2)], callbacks=[in_the_way], logging=_quiet()
    )
    with pytest.raises(
        tlloop.RunFailed, match=r"model.keras, backbone.keras, saved_model not written"
    ):
        trainer.fit(_model(), _data(8, 1), _data(4, 2), batch_size=4)
    with open(os.path.join(workdir, "results.json")) as file:
        results = json.load(file)
    assert results["export"]["not_exported"] == ["model.keras", "backbone.keras", "saved_model"]
    assert results["phases"][0]["last_step"] == 2 and results["best"]["step"] == 2
    assert tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints", "best"))
    with open(os.path.join(workdir, "export")) as file:
        assert file.read() == "mine"  # the user's file, untouched


# Weight averages (item 6).


def test_with_weight_averages_the_best_checkpoint_and_export_hold_the_weights_evaluated(
    tmp_path,
):
    trainer = tlloop.Trainer(
        str(tmp_path),
        phases=[tlloop.Phase("head", 3, 5e-2)],
        training=tlloop.TrainingConfig(ema_decay=0.8),
        checkpoint=tlloop.CheckpointConfig(best_metric=tlloop.BestMetric("loss", "min")),
        logging=_quiet(),
    )
    model, evaluation = _model(), _data(10, 2)
    results = trainer.fit(model, _data(24, 1), evaluation, batch_size=8)
    assert results.export["weights"] == "best"
    best = results.best["value"]
    # The model after fit holds the export: scored on the same examples, the best's loss.
    assert tlloop.evaluate(model, evaluation)["loss"] == pytest.approx(best, rel=1e-5)
    exported = keras.saving.load_model(results.export["model"])
    assert tlloop.evaluate(exported, evaluation)["loss"] == pytest.approx(best, rel=1e-5)


# The feature cache and the mode table (item 7).


def test_a_frozen_phase_whose_backbone_runs_in_training_mode_is_not_cached(tmp_path):
    dropout_on = tlloop.ModeTable().with_backbone_training(True)
    trainer = tlloop.Trainer(
        str(tmp_path),
        phases=[tlloop.Phase("head", 1, 1e-2, modes=dropout_on)],
        logging=_quiet(),
    )
    model = _model(dropout=0.5)
    results = trainer.fit(model, _data(16, 1), _data(4, 2), batch_size=8, export=False)
    assert results.phases[0]["feature_cache"].startswith(
        "off: the mode table runs the backbone with training=True"
    )


# Gradient accumulation's leftover (item 8).


def _sgd_fit(tmp_path, name: str, batch_size: int, accumulate: int) -> dict:
    model = _model()
    trainer = tlloop.Trainer(
        str(tmp_path / name),
        phases=[tlloop.Phase("head", 1, 0.5)],
        training=tlloop.TrainingConfig(optimizer="sgd", grad_accum_steps=accumulate),
        logging=_quiet(),
    )
    before = snapshot(model.head)
    trainer.fit(model, _data(24, 1), _data(4, 2), batch_size=batch_size, export=False)
    return before, snapshot(model.head)


def test_accumulated_batches_left_at_an_epochs_end_are_applied_as_their_mean(tmp_path):
    # 3 batches of 8 an epoch, 4 to accumulate: the epoch's end applies the 3 as one update.
    before, accumulated = _sgd_fit(tmp_path, "accumulated", 8, 4)
    assert any(not np.array_equal(before[k], accumulated[k]) for k in before)
    # Their mean: the gradient of one batch of all 24 (the epoch's examples), to float error.
    _, whole = _sgd_fit(tmp_path, "whole", 24, 1)
    for path, value in whole.items():
        np.testing.assert_allclose(accumulated[path], value, rtol=0, atol=1e-6, err_msg=path)


# Batching of a user's dataset (item 9).


def test_a_batched_dataset_of_scalar_targets_is_read_as_batches(tmp_path):
    images, _ = _data(40, 1)
    targets = images.mean(axis=(1, 2, 3)).astype("float32") / 100.0  # one scalar each
    task = tlloop.Regression(1, targets=targets[:, None])
    model = _model(outputs=1)
    dataset = tf.data.Dataset.from_tensor_slices((images, targets)).batch(8)
    trainer = tlloop.Trainer(
        str(tmp_path),
        phases=[tlloop.Phase("head", 1, 1e-2)],
        task=task,
        checkpoint=tlloop.CheckpointConfig(best_metric=tlloop.BestMetric("loss", "min")),
        logging=_quiet(),
    )
    results = trainer.fit(model, dataset, dataset, batch_size=8, export=False)
    assert results["train_size"] == 40 and results.phases[0]["eval"]["examples"] == 40


def test_a_dataset_whose_batching_cannot_be_told_is_refused_before_anything_is_written(tmp_path):
    images, labels = _data(8, 1)

    def pairs():
        yield from zip(images, labels, strict=True)

    spec = (tf.TensorSpec((SIZE, SIZE, 3)), tf.TensorSpec((), tf.int32))
    generated = tf.data.Dataset.from_generator(pairs, output_signature=spec)
    workdir = str(tmp_path / "run")
    trainer = tlloop.Trainer(workdir, phases=[tlloop.Phase("head", 1, 1e-2)])
    # A backbone that declares no inputs and a generator: refused, naming the way out.
    with pytest.raises(ValueError, match=r"^train: cannot tell whether .* batched=True"):
        trainer.fit(_subclassed(), generated, generated, batch_size=4)
    assert not os.path.exists(workdir)
    # The explicit answer is taken.
    explicit = tlloop.StreamedExamples(generated, batched=False)
    assert explicit.size == 8


def test_a_missing_image_file_gets_the_one_line_error_of_an_unreadable_one(tmp_path):
    paths = []
    for i in range(6):
        path = str(tmp_path / f"{i}.png")
        tf.io.write_file(path, tf.io.encode_png(np.full((SIZE, SIZE, 3), 40 * i, np.uint8)))
        paths.append(path)
    labels = [i % CLASSES for i in range(6)]
    missing = str(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"^image file '.*missing.png': cannot be read or decoded"):
        tlloop.EncodedImages.from_files([*paths, missing], [*labels, 0], image_size=SIZE)
    # A file gone after the examples were made is met when read: the same line.
    images = tlloop.EncodedImages.from_files(paths, labels, image_size=SIZE)
    os.remove(paths[3])
    trainer = tlloop.Trainer(
        str(tmp_path / "run"), phases=[tlloop.Phase("head", 1, 1e-2)], logging=_quiet()
    )
    with pytest.raises(ValueError, match=r"^image file '.*3.png': cannot be read or decoded"):
        trainer.fit(_model(), images, images, batch_size=2, export=False)
