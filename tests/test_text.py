"""Text classification from a KerasHub text backbone: a tiny randomly initialised BERT saved
with save_to_preset (no network), a generated text folder whose classes differ by words, end
to end through the head and fine-tune phases to a SavedModel that takes strings."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import flag_error, make_config, run_cli
from task_data import write_bert_preset, write_text_folder

import tlloop
from tlloop import phases as phase_lib
from tlloop.cli.config import DataConfig
from tlloop.cli.data import load_task_data
from tlloop.cli.experiment import build_experiment, train

keras_hub = pytest.importorskip("keras_hub")

WORDS = ("the", "a", "movie", "plot", "actor", "scene", "and", "was")
WORDS += ("bad", "awful", "boring", "good", "great", "fun")


@pytest.fixture(scope="module")
def bert_preset(tmp_path_factory) -> str:
    """A one-layer BERT with Dropout 0.1 and its preprocessor, saved as a local preset."""
    return write_bert_preset(str(tmp_path_factory.mktemp("bert")), WORDS, dropout=0.1)


def test_text_folder_fine_tunes_a_bert_preset_with_dropout_on_and_serves_strings(
    tmp_path, bert_preset
):
    folder = write_text_folder(tmp_path, per_class=24)
    config = make_config(
        str(tmp_path / "run"),
        dataset="text_folder",
        data_dir=folder,
        classes="",
        per_class=0,
        val_split=0.25,
        backbone=bert_preset,
        batch_size=8,
        head_epochs=3,
        head_lr=3e-2,
        finetune_epochs=8,
        finetune_lr=1e-2,
        dropout=0.0,
    )
    experiment = build_experiment(config)
    assert experiment.data.class_names == ("negative", "positive")
    head, finetune = experiment.phases
    # The mode table and the phase-start report: Dropout of the encoder on only while it
    # fine-tunes; the image default (backbone in inference mode) is unchanged elsewhere.
    assert not head.modes.train.backbone and finetune.modes.train.backbone
    phase_lib.apply_trainability(experiment.model, finetune)
    report = phase_lib.trainability_report(experiment.model, finetune)
    assert "| backbone | True |" in report
    assert "| train | training=True | training=True | training=True |" in finetune.modes.to_text()
    texts = tf.constant(["the good movie was fun", "a bad plot and awful actor"])
    model = experiment.model
    one, two = (model.forward(texts, finetune.modes.row("train")) for _ in range(2))
    assert np.abs(one.numpy() - two.numpy()).max() > 1e-6  # Dropout draws differ
    first, second = (model.forward(texts, finetune.modes.row("eval")) for _ in range(2))
    np.testing.assert_array_equal(first.numpy(), second.numpy())

    results = train(experiment, config.workdir)
    head_eval, finetune_eval = (phase["eval"] for phase in results.phases)
    assert finetune_eval["examples"] == 12  # a quarter of each class, every example once
    # A random encoder's features barely separate the classes; fine-tuning it does.
    assert finetune_eval["accuracy"] >= 0.9 > head_eval["accuracy"]
    assert finetune_eval["loss"] < 0.5 * head_eval["loss"]
    served = tf.saved_model.load(results.export["saved_model"]).signatures["serving_default"]
    out = served(text=texts)
    expected = tf.nn.softmax(model.forward(texts, finetune.modes.row("eval"))).numpy()
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
    assert [n.decode() for n in out["class_name"].numpy()] == [
        experiment.data.class_names[i] for i in expected.argmax(-1)
    ]
    with open(os.path.join(config.workdir, "results.json")) as file:
        assert json.load(file)["class_names"] == ["negative", "positive"]
    # model.keras loads with its tokenizer (the vocabulary is an asset KerasHub loads last).
    loaded = keras.saving.load_model(results.export["model"])
    np.testing.assert_allclose(loaded(texts).numpy(), model(texts).numpy(), atol=1e-5)
    # tlloop.predict reads image files: a text run's export is refused in one line.
    done = run_cli(f"--workdir={config.workdir}", "any.png", module="tlloop.predict")
    error = [line for line in done.stderr.splitlines() if line.startswith("tlloop.predict:")]
    assert done.returncode == 2 and len(error) == 1, done.stderr[-2000:]
    assert "takes text, not images" in error[0] and "import tensorflow_text" in error[0]


def test_the_library_builds_a_text_backbone_and_names_a_bad_source(tmp_path, bert_preset):
    backbone = tlloop.text_backbone(bert_preset)
    assert backbone.inputs[0].dtype == "string" and backbone.outputs[0].shape == (None, 16)
    with pytest.raises(ValueError, match=r"^source='.*': not a KerasHub preset directory"):
        tlloop.text_backbone(str(tmp_path))
    # A preset with a backbone but no text preprocessor is named too.
    encoder_only = str(tmp_path / "encoder")
    keras_hub.models.Backbone.from_preset(bert_preset).save_to_preset(encoder_only)
    with pytest.raises(ValueError, match=r"^source='.*encoder': no text preprocessor"):
        tlloop.text_backbone(encoder_only)


@pytest.mark.parametrize(("flag", "value"), [("data_cache", "cache"), ("data_memory", "0")])
def test_data_flags_that_cannot_act_on_texts_are_refused(tmp_path, flag, value):
    csv = tmp_path / "texts.csv"
    csv.write_text("text,label\ngood day,pos\nbad day,neg\nfine,pos\nawful,neg\n")
    config = DataConfig(dataset="csv", train_csv=str(csv), **{flag: value})
    with flag_error(rf"^--{flag}='{value}': the examples are texts"):
        load_task_data(config)
