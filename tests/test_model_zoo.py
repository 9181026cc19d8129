"""Every promise on every model a researcher brings (issue 23): each member of the zoo
(tests/model_zoo.py) through `Trainer.fit`, a head phase then a fine-tune phase whose backbone
runs in training mode (its Dropout on) with bn_mode="frozen".

For each: BatchNorm moving statistics and gamma/beta bit-identical through both phases; exactly
the layers the unfreeze policy names change, every other backbone variable bit-identical;
`describe` names them (and the layers held but never used) and leaves trainability as it was.
Resume after a stop is bit-identical with deterministic=True for the member whose Dropout sits
inside custom layers (backbone and head), the subclassed one and the KerasHub text encoder.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import changed, make_config, snapshot
from model_zoo import CLASSES, MEMBERS, Member, all_layers, flags, layer_of
from task_data import write_bert_preset

import tlloop
from tlloop import checkpoints as checkpoint_lib
from tlloop import lr_range, trainer

FINETUNE_MODES = tlloop.ModeTable().with_backbone_training(True)  # Dropout on, BN left alone


def _trainer(
    workdir, member, finetune_epochs: int = 1, modes=FINETUNE_MODES, **kwargs
) -> tlloop.Trainer:
    return tlloop.Trainer(
        str(workdir),
        phases=[
            tlloop.Phase("head", 1, 3e-2),
            tlloop.Phase("finetune", finetune_epochs, 1e-2, unfreeze=member.unfreeze, modes=modes),
        ],
        task=tlloop.Classification(CLASSES),
        logging=tlloop.LoggingConfig(quiet=True),
        checkpoint=tlloop.CheckpointConfig(export="last"),
        **kwargs,
    )


def _trained_names(description: str, phase: int) -> set[str]:
    section = description.split(f"phase {phase} ")[1]
    line = next(x for x in section.splitlines() if x.startswith("backbone layers that train"))
    return set(line.split(": ", 1)[1].split(", "))


@pytest.mark.parametrize("name", list(MEMBERS))
def test_exactly_the_named_layers_train_and_batch_norm_never_moves(name, tmp_path):
    _check(MEMBERS[name], tmp_path)


def test_with_the_default_modes_too_inner_batch_norm_is_not_trained(tmp_path):
    _check(MEMBERS["custom"], tmp_path, modes=None)  # the backbone in inference mode


@pytest.fixture(scope="module")
def text_member(tmp_path_factory) -> Member:
    """A one-layer KerasHub BERT (Dropout 0.1) saved with save_to_preset, strings in."""
    pytest.importorskip("keras_hub")
    preset = write_bert_preset(str(tmp_path_factory.mktemp("bert")), WORDS, dropout=0.1)

    def build():
        keras.utils.set_random_seed(7)
        backbone = tlloop.text_backbone(preset)
        return tlloop.TransferModel(backbone, tlloop.classification_head(backbone, CLASSES))

    return Member(
        "text", build, _texts, "top:2", frozenset({"feedforward_output_dense", "pooled_dense"})
    )


def test_a_text_encoder_trains_exactly_its_named_layers(text_member, tmp_path):
    model = _check(text_member, tmp_path, batch_norm=False)
    # Every random state of the encoder (its embeddings', attention's, feed-forward's
    # Dropout), not only those of the top-level layers.
    generators = [v for v in model.variables if "seed_generator_state" in v.path]
    assert len(generators) == 5
    assert {id(v) for v in checkpoint_lib.rng_states(model)} == {id(v) for v in generators}


WORDS = ("good", "great", "fun", "bad", "awful", "dull", "the", "movie", "was", "plot")


def _texts(count: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, count).astype("int32")
    own = (("good", "great"), ("bad", "awful"), ("dull", "plot"))
    texts = [" ".join([*rng.choice(WORDS[6:9], 3), *rng.choice(own[label], 2)]) for label in labels]
    return np.array(texts), labels


def _check(member, workdir, batch_norm: bool = True, modes=FINETUNE_MODES) -> tlloop.TransferModel:
    model = member.build()
    trainer = _trainer(workdir, member, modes=modes)
    before_flags = flags(model)
    description = trainer.describe(model)
    assert flags(model) == before_flags  # describe leaves trainability as it was
    assert _trained_names(description, 1) == {"none"}
    assert _trained_names(description, 2) == member.trains
    for unused in member.unused:
        assert unused in description.split("held but not used")[1]

    norms = {
        layer.name
        for layer in all_layers(model.backbone)
        if isinstance(layer, keras.layers.BatchNormalization)
    }
    assert bool(norms) == batch_norm
    before = snapshot(model.backbone)
    train, evaluation = member.data(24, 1), member.data(8, 2)
    results = trainer.fit(model, train, evaluation, batch_size=8, export=False)
    assert [phase["eval"]["examples"] for phase in results.phases] == [8, 8]
    owner = layer_of(model.backbone)
    moved = {owner[path] for path in changed(before, snapshot(model.backbone))}
    assert not moved & norms  # moving statistics, gamma and beta bit-identical
    assert moved == member.trains
    return model


class _StopAfterFirstFinetuneEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:  # epochs count across phases: the head's is 0
            raise RuntimeError("stopped")


@pytest.mark.parametrize("name", ["custom", "subclassed", "text"])
def test_resume_after_a_stop_is_bit_identical(name, request, tmp_path):
    member = request.getfixturevalue("text_member") if name == "text" else MEMBERS[name]
    train, evaluation = member.data(24, 1), member.data(8, 2)

    def fit(workdir, **kwargs):
        trainer = _trainer(workdir, member, finetune_epochs=2, deterministic=True, **kwargs)
        return trainer.fit(member.build(), train, evaluation, batch_size=8, export=False)

    whole = fit(tmp_path / "whole")
    with pytest.raises(tlloop.CallbackError):
        fit(tmp_path / "cut", callbacks=[_StopAfterFirstFinetuneEpoch()])
    resumed = fit(tmp_path / "cut")
    assert resumed.phases[-1]["last_step"] == whole.phases[-1]["last_step"] == 9
    assert resumed.weights_sha256 == whole.weights_sha256


def test_every_random_state_at_any_depth_is_checkpointed():
    model = MEMBERS["custom"].build()
    states = checkpoint_lib.rng_states(model)
    # Keras' own list of every seed generator's state (Layer.variables includes them).
    expected = [v for v in model.variables if "seed_generator_state" in v.path]
    assert len(expected) == 3  # the two blocks' Dropout, the custom head layer's
    assert {id(v) for v in states} == {id(v) for v in expected} and len(states) == 3


def test_the_range_test_puts_random_states_back(tmp_path):
    experiment = trainer.build_experiment(make_config(str(tmp_path), dropout=0.5))
    states = checkpoint_lib.rng_states(experiment.model)
    assert states
    before = [np.array(v.numpy()) for v in states]
    lr_range.range_test(experiment, 0, 1e-4, 1e-2, steps=3)
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, states, strict=True))
