"""Every promise on every model a researcher brings (issue 23): each member of the zoo
(tests/model_zoo.py) through `Trainer.fit`, a head phase then a fine-tune phase whose backbone
runs in training mode (its Dropout on) with bn_mode="frozen".

For each: BatchNorm moving statistics and gamma/beta bit-identical through both phases; exactly
the layers the unfreeze policy names change, every other backbone variable bit-identical;
`describe` names them (and the layers held but never used) and leaves trainability as it was.
For every member, in one subprocess per property (tests/zoo_script.py): SIGKILLed mid fine-tune
and resumed, the weights are bit-identical to an uninterrupted run's with deterministic=True
(the KerasHub text encoder in-process, stopped by a raising callback); tlloop.evaluate on a
MirroredStrategy of 2 counts each example once and gives the 1-replica metrics; the export's
model.keras loads after `import tlloop` (and the zoo's registrations) and its SavedModel serves
the model's outputs.
"""

from __future__ import annotations

import json
import os
import signal

import keras
import model_zoo as zoo
import numpy as np
import pytest
from conftest import REPO, changed, make_config, run_python, snapshot
from model_zoo import FINETUNE_MODES, MEMBERS, Member, all_layers, flags, layer_of, zoo_trainer

import tlloop
from tlloop import checkpoints as checkpoint_lib
from tlloop.cli import experiment as cli_experiment
from tlloop.cli.head_lr import experiment_range_test

SCRIPT = os.path.join(REPO, "tests", "zoo_script.py")


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
    pytest.importorskip("keras_hub")
    return zoo.text_member(str(tmp_path_factory.mktemp("bert")))


def test_a_text_encoder_trains_exactly_its_named_layers(text_member, tmp_path):
    model = _check(text_member, tmp_path, batch_norm=False)
    # Every random state of the encoder (its embeddings', attention's, feed-forward's
    # Dropout), not only those of the top-level layers.
    generators = [v for v in model.variables if "seed_generator_state" in v.path]
    assert len(generators) == 5
    assert {id(v) for v in checkpoint_lib.rng_states(model)} == {id(v) for v in generators}


def _check(member, workdir, batch_norm: bool = True, modes=FINETUNE_MODES) -> tlloop.TransferModel:
    model = member.build()
    trainer = zoo_trainer(workdir, member, modes=modes)
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


def test_a_text_encoder_resumes_after_a_stop_bit_identical(text_member, tmp_path):
    # The text member in-process (a raising callback): its KerasHub import and preset would
    # cost every one of the SIGKILL test's processes.
    train, evaluation = text_member.data(24, 1), text_member.data(8, 2)

    def fit(workdir, **kwargs):
        trainer = zoo_trainer(workdir, text_member, finetune_epochs=2, deterministic=True, **kwargs)
        return trainer.fit(text_member.build(), train, evaluation, batch_size=8, export=False)

    whole = fit(tmp_path / "whole")
    with pytest.raises(tlloop.CallbackError):
        fit(tmp_path / "cut", callbacks=[_StopAfterFirstFinetuneEpoch()])
    resumed = fit(tmp_path / "cut")
    assert resumed.phases[-1]["last_step"] == whole.phases[-1]["last_step"] == 9
    assert resumed.weights_sha256 == whole.weights_sha256


def test_every_member_sigkilled_mid_fine_tune_resumes_bit_identical(tmp_path):
    # One process per kill: each run finishes the member killed before, runs the next one
    # whole, then kills itself in that member's fine-tune (see zoo_script.py).
    root = tmp_path / "zoo"
    for _ in range(len(MEMBERS)):
        done = run_python(SCRIPT, "resume", str(root), timeout=240)
        assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    done = run_python(SCRIPT, "resume", str(root), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in MEMBERS:
        digests = json.loads((root / f"{name}.json").read_text())
        assert digests["killed"], name
        assert digests["resumed"] == digests["whole"], name


def test_every_member_evaluated_on_two_replicas_counts_each_example_once():
    done = run_python(SCRIPT, "evaluate", "unused", timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(results) == set(MEMBERS)
    for name, (one, two) in results.items():
        # 13 examples in batches of 4 over 2 replicas: the last batch padded, none twice.
        assert one["examples"] == two["examples"] == 13, name
        assert one.keys() == two.keys(), name
        for metric in one:
            assert two[metric] == pytest.approx(one[metric], abs=1e-5), (name, metric)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """Each member trained (a head epoch) with its export, and its outputs on 3 examples."""
    root = tmp_path_factory.mktemp("exports")
    written = {}
    for name, member in MEMBERS.items():
        trainer = tlloop.Trainer(
            str(root / name),
            phases=[tlloop.Phase("head", 1, 3e-2)],
            task=tlloop.Classification(zoo.CLASSES),
            logging=tlloop.LoggingConfig(quiet=True),
            checkpoint=tlloop.CheckpointConfig(export="last"),
        )
        model = member.build()
        results = trainer.fit(model, member.data(8, 1), member.data(4, 2), batch_size=4)
        assert results.export["saved_model"] is not None, name
        inputs = member.data(3, 3)[0]
        arrays = inputs if isinstance(inputs, dict) else {"": inputs}
        np.savez(root / f"{name}.npz", expected=tlloop.predict(model, inputs), **arrays)
        written[name] = os.path.dirname(results.export["model"])
    return {"root": root, "directories": written}


# A new process: tlloop and the module that registers the zoo's classes, nothing else.
LOAD_EXPORTS = """
import json, sys, keras, numpy as np, tensorflow as tf, tlloop
sys.path.insert(0, sys.argv[2]); import model_zoo
errors = {}
for name, directory in json.loads(sys.argv[1]).items():
    saved = np.load(sys.argv[3] + "/" + name + ".npz")
    expected = saved["expected"]
    inputs = {k: saved[k] for k in saved.files if k != "expected"}
    inputs = inputs.pop("") if "" in inputs else inputs
    loaded = keras.saving.load_model(directory + "/model.keras")
    keras_error = np.max(np.abs(np.asarray(loaded(inputs)) - expected))
    serve = tf.saved_model.load(directory + "/saved_model").signatures["serving_default"]
    named = serve.structured_input_signature[1]
    feed = inputs if isinstance(inputs, dict) else {next(iter(named)): inputs}
    served = serve(**{k: tf.constant(v) for k, v in feed.items()})["probabilities"].numpy()
    served_error = np.max(np.abs(served - tf.nn.softmax(expected).numpy()))
    errors[name] = [float(keras_error), float(served_error)]
print(json.dumps(errors))
"""


def test_every_member_exports_files_that_load_and_serve_the_same_outputs(exports):
    done = run_python(
        "-c",
        LOAD_EXPORTS,
        json.dumps(exports["directories"]),
        os.path.dirname(__file__),
        str(exports["root"]),
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(errors) == set(MEMBERS)
    for name, (keras_error, served_error) in errors.items():
        assert keras_error < 1e-5 and served_error < 1e-5, name


def test_every_random_state_at_any_depth_is_checkpointed():
    model = MEMBERS["custom"].build()
    states = checkpoint_lib.rng_states(model)
    # Keras' own list of every seed generator's state (Layer.variables includes them).
    expected = [v for v in model.variables if "seed_generator_state" in v.path]
    assert len(expected) == 3  # the two blocks' Dropout, the custom head layer's
    assert {id(v) for v in states} == {id(v) for v in expected} and len(states) == 3


def test_the_range_test_puts_random_states_back(tmp_path):
    experiment = cli_experiment.build_experiment(make_config(str(tmp_path), dropout=0.5))
    states = checkpoint_lib.rng_states(experiment.model)
    assert states
    before = [np.array(v.numpy()) for v in states]
    experiment_range_test(experiment, 0, 1e-4, 1e-2, steps=3)
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, states, strict=True))
