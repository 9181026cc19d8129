"""Streamed data: the same batches as in memory, any step first, one part per input pipeline,
a decoded cache on disk, bad images found before training or named when first read."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow as tf
from conftest import flag_error, run_cli

from tlloop.cli.config import DataConfig
from tlloop.cli.data import load_data
from tlloop.data.examples import InMemoryExamples, Part, StreamedExamples, example_index
from tlloop.data.storage import memory_budget
from tlloop.data.streaming import DiskImages, EncodedImages


def _png(index: int, label: int) -> bytes:
    """An image unique to `index` (its top-left pixel), of a size that varies with it, so that
    resizing is exercised."""
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, (9 + index % 4, 11, 3), dtype=np.uint8)
    pixels[..., label] = 255 - pixels[..., label] // 4
    return tf.io.encode_png(pixels).numpy()


def _folder(root, counts: dict[str, int]):
    index = 0
    for label, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i:02d}.png").write_bytes(_png(index, label))
            index += 1
    return root


def _records(path, labels: list[int], first: int) -> None:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for k, label in enumerate(labels):
            feature = {
                "image/encoded": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[_png(first + k, label)])
                ),
                "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            }
            writer.write(
                tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
            )


def _batches(dataset, count: int) -> list[tuple[np.ndarray, ...]]:
    return [tuple(t.numpy() for t in batch) for batch in dataset.take(count)]


def _same(first, second) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("images"), {"ant": 9, "bee": 8, "cow": 7})


def _config(**kw) -> DataConfig:
    return DataConfig(image_size=8, batch_size=4, seed=3, **kw)


@pytest.mark.parametrize("source", ["folder", "tfrecord"])
def test_streamed_examples_give_the_in_memory_batches_from_any_step(source, folder, tmp_path):
    if source == "folder":
        kw = {"dataset": "folder", "data_dir": str(folder)}
    else:  # two shards of records: the stream reads each record at its offset
        _records(tmp_path / "train-0.tfrecord", [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1], 0)
        _records(tmp_path / "train-1.tfrecord", [2, 1, 0, 2, 1, 0, 2, 1, 0, 2, 1, 0, 2], 11)
        kw = {"dataset": "tfrecord", "train_files": str(tmp_path / "train-*.tfrecord")}
    memory = load_data(_config(**kw))
    streamed = load_data(_config(data_memory="0", **kw))
    assert memory.storage["train"].startswith("memory (")
    assert streamed.storage["train"].startswith("streamed (")
    assert isinstance(memory.train_examples, InMemoryExamples)
    assert isinstance(streamed.train_examples, EncodedImages)
    size = streamed.train_size
    assert size == memory.train_size and size in (17, 18)
    for start in (0, 9):  # 9: a resumed run reads from its step, past an epoch's end
        _same(
            _batches(streamed.train_examples.training_batches(4, 3, start), 6),
            _batches(memory.train_examples.training_batches(4, 3, start), 6),
        )
    _same(_batches(streamed.eval, 99), _batches(memory.eval, 99))
    # The training order is the documented function of (seed, position).
    labels = np.concatenate([y for _, y in _batches(streamed.train, 5)])
    expected = [streamed.train_examples.labels[example_index(k, size, 3)] for k in range(20)]
    np.testing.assert_array_equal(labels, expected)


def test_each_input_pipeline_reads_only_its_part_of_every_batch(tmp_path):
    root = _folder(tmp_path / "images", {"ant": 8, "bee": 8})
    data = load_data(_config(dataset="folder", data_dir=str(root), val_split=0.25, data_memory="0"))
    examples = data.train_examples  # 12 examples, batch 4: 3 steps an epoch
    whole = _batches(examples.training_batches(4, 3), 3)
    parts = [_batches(examples.training_batches(4, 3, part=Part(i, 2, 1)), 3) for i in (0, 1)]
    for step in range(3):  # the two halves of each global batch, in order
        for column in (0, 1):
            joined = np.concatenate([parts[0][step][column], parts[1][step][column]])
            np.testing.assert_array_equal(joined, whole[step][column])
    # Two replicas fed by one pipeline: its part comes as one batch per replica.
    replicas = _batches(examples.eval_batches(4, Part(0, 1, 2)), 99)
    assert {len(batch[0]) for batch in replicas} == {2} and len(replicas) == 6
    assert sum(float(batch[2].sum()) for batch in replicas) == examples.size
    # Pipeline 1 of 2 never opens pipeline 0's files: with those files gone it still reads
    # its whole epoch, and pipeline 0 cannot.
    theirs = {int(example_index(4 * s + k, 12, 3)) for s in range(3) for k in (0, 1)}
    assert len(theirs) == 6  # an epoch holds every example once: the parts are disjoint
    for index in theirs:
        os.remove(examples.reader.items[index])
    mine = _batches(examples.training_batches(4, 3, part=Part(1, 2, 1)), 3)
    _same(mine, parts[1])
    with pytest.raises(tf.errors.NotFoundError):
        _batches(examples.training_batches(4, 3, part=Part(0, 2, 1)), 3)


def test_the_data_cache_is_written_once_and_read_as_the_same_batches(folder, tmp_path):
    cache = tmp_path / "cache"
    kw = {"dataset": "folder", "data_dir": str(folder), "data_cache": str(cache)}
    decoded = load_data(_config(data_memory="0", dataset="folder", data_dir=str(folder)))
    first = load_data(_config(data_memory="0", **kw))
    assert isinstance(first.train_examples, DiskImages)
    assert "--data_cache written" in first.storage["train"]
    written = sorted(p.name for p in cache.iterdir())
    assert len(written) == 4 and not any("partial" in name for name in written)
    again = load_data(_config(data_memory="0", **kw))
    assert "--data_cache found" in again.storage["train"]
    in_memory = load_data(_config(**kw))  # fits: read whole from the cache, no decoding
    assert "memory (" in in_memory.storage["train"] and "found" in in_memory.storage["train"]
    expected = _batches(decoded.train_examples.training_batches(4, 3, 2), 5)
    for data in (first, again, in_memory):
        _same(_batches(data.train_examples.training_batches(4, 3, 2), 5), expected)
        _same(_batches(data.eval, 99), _batches(decoded.eval, 99))
    # A cache file of the wrong size is refused, naming it.
    pixels = next(p for p in cache.iterdir() if p.suffix == ".pixels")
    pixels.write_bytes(b"\0" * 7)
    with flag_error(r"^--data_cache: '.*\.pixels' holds 7 bytes"):
        load_data(_config(data_memory="0", **kw))


def test_a_streamed_split_checks_first_bytes_before_training_and_skip_checks_everything(
    tmp_path,
):
    root = _folder(tmp_path / "images", {"ant": 6, "bee": 6})
    (root / "bee" / "03.png").write_bytes(b"not an image at all")
    (root / "ant" / "04.png").write_bytes(_png(0, 0)[:40])  # starts right, cut short
    streamed = _config(dataset="folder", data_dir=str(root), data_memory="0")
    # Strict: the file that is no image is named at load, before anything is decoded.
    with flag_error(r"^image file '.*/bee/03.png': cannot be read or "):
        load_data(streamed)
    # Skip: every image is decoded once at load, so the cut one is found too, and counted.
    data = load_data(
        _config(dataset="folder", data_dir=str(root), data_memory="0", bad_images="skip")
    )
    assert sorted(
        os.path.basename(os.path.dirname(f)) + "/" + os.path.basename(f) for f in data.skipped_files
    ) == [
        "ant/04.png",
        "bee/03.png",
    ]
    assert data.train_size + data.eval_size == 10
    assert "every image checked at load" in data.storage["train"]


def test_data_flags_are_checked():
    with flag_error(r"^--data_memory='lots': not a size; accepted: auto"):
        DataConfig(data_memory="lots")
    with flag_error(r"^--data_cache='c': --dataset=digits is decoded in"):
        DataConfig(data_cache="c")
    with flag_error(r"^--data_memory='0': --dataset=digits is always held"):
        DataConfig(data_memory="0")
    assert memory_budget("12") == 12 * 2**20
    assert 0 < memory_budget("auto") < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# The command line, end to end: a streamed run resumed after SIGKILL ends as the in-memory run
# does; two replicas count each streamed evaluation example once; a bad image met mid-stream.

RUN = [
    "--dataset=folder",
    "--backbone=small_cnn",
    "--weights=none",
    "--image_size=16",
    "--batch_size=4",
    "--eval_batch_size=4",
    "--val_split=0.25",
    "--head_epochs=2",
    "--finetune_epochs=1",
    "--deterministic",
    "--checkpoint_every_steps=1",
    "--quiet",
]


def _results(workdir) -> dict:
    return json.loads((workdir / "results.json").read_text())


def test_a_streamed_run_killed_and_resumed_ends_as_the_in_memory_run(folder, tmp_path):
    args = [*RUN, f"--data_dir={folder}"]
    memory = run_cli(*args, f"--workdir={tmp_path / 'memory'}")
    assert memory.returncode == 0, memory.stderr[-3000:]
    workdir = tmp_path / "streamed"
    streamed = [*args, "--data_memory=0", f"--workdir={workdir}"]
    fault = {"TLLOOP_FAULT": f"SIGKILL@7:once={tmp_path / 'killed'}"}
    killed = run_cli(*streamed, env=fault)
    assert killed.returncode != 0 and "ckpt-6" in killed.stderr  # killed as step 7 began
    resumed = run_cli(*streamed, "--nooverwrite", env=fault)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    results = _results(workdir)
    assert results["data_storage"]["train"].startswith("streamed (")
    assert _results(tmp_path / "memory")["data_storage"]["train"].startswith("memory (")
    assert results["weights_sha256"] == _results(tmp_path / "memory")["weights_sha256"]


def test_two_replicas_count_each_streamed_evaluation_example_once(folder, tmp_path):
    workdir = tmp_path / "run"
    done = run_cli(
        *RUN,
        f"--data_dir={folder}",
        "--data_memory=0",
        "--strategy=mirrored",
        "--logical_devices=2",
        "--finetune_epochs=0",
        f"--workdir={workdir}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = _results(workdir)
    assert results["replicas"] == 2 and results["eval_size"] == 6  # batches of 4: one padded
    assert [p["eval"]["examples"] for p in results["phases"]] == [6]


def test_an_image_that_fails_mid_stream_stops_the_run_naming_it(tmp_path):
    root = _folder(tmp_path / "images", {"ant": 14, "bee": 14})
    config = _config(dataset="folder", data_dir=str(root), val_split=0.25, data_memory="0")
    # The last training example: not among the first 16 a run previews, so the run meets it
    # in a training batch, past its first checkpoint.
    broken = pathlib.Path(load_data(config).train_examples.reader.items[-1])
    good = broken.read_bytes()
    broken.write_bytes(good[:60])  # starts like a PNG: only decoding it tells
    workdir = tmp_path / "run"
    args = [
        *RUN,
        f"--data_dir={root}",
        "--data_memory=0",
        "--head_epochs=3",
        f"--workdir={workdir}",
    ]
    failed = run_cli(*args)
    assert failed.returncode == 2
    lines = [line for line in failed.stderr.splitlines() if line.startswith("tlloop: error:")]
    assert len(lines) == 1 and f"image file '{broken}': cannot be read or decoded" in lines[0]
    assert "--bad_images=skip" in lines[0] and "last checkpoint is intact" in lines[0]
    # The checkpoints written before are intact: with the file mended, the same run resumes.
    saved = tf.train.latest_checkpoint(str(workdir / "checkpoints"))
    assert saved is not None
    broken.write_bytes(good)
    resumed = run_cli(*args, "--nooverwrite")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {saved}" in resumed.stderr


def test_the_library_streams_image_files_with_the_feature_cache_and_the_same_order(
    folder, tmp_path
):
    import keras

    import tlloop

    paths = sorted(str(p) for p in folder.glob("*/*.png"))
    labels = [["ant", "bee", "cow"].index(os.path.basename(os.path.dirname(p))) for p in paths]
    train = tlloop.EncodedImages.from_files(paths, labels, image_size=8)
    decoded = InMemoryExamples.from_dataset(train.ordered())  # the same images, in memory
    _same(
        _batches(train.training_batches(4, 5, 3), 4), _batches(decoded.training_batches(4, 5, 3), 4)
    )

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    backbone = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs / 255.0), name="backbone")
    model = tlloop.TransferModel(backbone, tlloop.classification_head(backbone, 3))
    trainer = tlloop.Trainer(
        str(tmp_path / "run"),
        phases=[tlloop.Phase("head", 2, 1e-2)],
        task=tlloop.Classification(3),
        logging=tlloop.LoggingConfig(quiet=True),
    )
    results = trainer.fit(model, train, train, batch_size=4, export=False)
    assert results["train_size"] == len(paths) == 24
    # Streamed files are tlloop's to order, so the frozen phase trains on cached features.
    assert results.phases[0]["feature_cache"].startswith("on:")
    assert results.phases[0]["eval"]["examples"] == 24


def test_label_counts_count_class_indices_and_multi_hot_labels():
    indices = InMemoryExamples(np.zeros((5, 2), "float32"), np.array([0, 2, 2, 1, 2]))
    assert indices.label_counts(4).tolist() == [1, 1, 3, 0]
    hot = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 1]], "float32")
    multi = InMemoryExamples(np.zeros((3, 2), "float32"), hot)
    assert multi.label_counts(3).tolist() == [2, 1, 3]
    streamed = tf.data.Dataset.from_tensor_slices((np.zeros((3, 2), "float32"), hot))
    assert StreamedExamples(streamed).label_counts(3).tolist() == [2, 1, 3]


def test_an_image_deleted_under_a_streamed_run_is_named_in_one_line(tmp_path):
    import keras

    import tlloop

    root = _folder(tmp_path / "images", {"ant": 6, "bee": 6})
    paths = sorted(str(p) for p in root.glob("*/*.png"))
    labels = [int("bee" in p) for p in paths]

    class DeleteOne(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0 and os.path.exists(paths[-1]):
                os.remove(paths[-1])

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    backbone = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs / 255.0), name="backbone")
    model = tlloop.TransferModel(backbone, tlloop.classification_head(backbone, 2))
    trainer = tlloop.Trainer(
        str(tmp_path / "run"),
        phases=[tlloop.Phase("tune", 3, 1e-2, unfreeze="all")],  # images read every epoch
        task=tlloop.Classification(2),
        logging=tlloop.LoggingConfig(quiet=True),
        callbacks=[DeleteOne()],
    )
    # Deleted after the examples were listed: met first by the run's preview of its first
    # images (read eagerly: NotFoundError), or later by a training step.
    for deleted in (paths[0], paths[-1]):
        train = tlloop.EncodedImages.from_files(paths, labels, image_size=8)
        if deleted == paths[0]:
            os.rename(deleted, deleted + ".away")
        with pytest.raises(ValueError) as error:  # a ConfigError, as the library raises it
            trainer.fit(model, train, train, batch_size=4, export=False)
        message = str(error.value)
        assert "\n" not in message
        assert message.startswith(f"image file '{deleted}': cannot be read or decoded (")
        assert "(No such file or directory)" in message
        if deleted == paths[0]:
            os.rename(deleted + ".away", deleted)
            shutil.rmtree(tmp_path / "run")
