"""Streamed data at scale: memory, start-up, input speed, training speed, resume cost.

    python -m benchmarks.streaming [--images=50000] [--small=2000] [--rounds=3]
        [--data=/tmp/tlloop-streaming] [--output=benchmarks/results] [--parts=memory,input,...]

Generates --images JPEG files at 224 px in ten class folders under --data (kept for the next
run), the same images as TFRecord shards, and a folder of links to the first --small of them;
then measures, each over --rounds rounds (input: at least 5), reported as min-max, speeds
also per CPU second of the process (less sensitive to other work on the machine):

- peak resident memory of a `python -m tlloop.run` training MobileNetV2 (weights=None, 224
  px, batch 32) on the streamed small folder and the streamed full folder, stopped by SIGTERM
  after 20 steps (goal: the two differ by under 300 MB), and the seconds from its start to its
  first training step;
- input examples/s of tlloop's streamed batches (folder and TFRecord) against
  `keras.utils.image_dataset_from_directory` on the same folder, both 224 px, batch 32,
  shuffled, prefetched (goal: >= 1.0x);
- training examples/s of MobileNetV2 fine-tuned at 224 px fed by the stream against the same
  step fed one resident batch (the input pipeline must not be the bottleneck);
- the seconds from asking for the training batches of a resumed run to its first batch, at
  step 10 and at step 100,000 (goal: within 2x of each other).

Writes STREAMING.md and STREAMING.json under --output.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf
from absl import app, flags

from tlloop import config as config_lib
from tlloop import phases as phase_lib
from tlloop.cli import config as cli_config
from tlloop.cli.data import load_data
from tlloop.cli.model import build_model
from tlloop.optim import make_optimizer
from tlloop.steps import Metrics, StepOptions, compile_train

_IMAGES = flags.DEFINE_integer("images", 50000, "Images in the full set.")
_SMALL = flags.DEFINE_integer("small", 2000, "Images in the small set.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of each measurement.")
_DATA = flags.DEFINE_string("data", "/tmp/tlloop-streaming", "Where the generated data lives.")
_OUTPUT = flags.DEFINE_string("output", "benchmarks/results", "Directory for the results.")
PARTS = ("memory", "input", "training", "resume")
_PARTS = flags.DEFINE_list("parts", list(PARTS), "Which measurements to run (others are kept).")

SIZE, BATCH, CLASSES, SHARDS = 224, 32, 10, 32


def generate(root: str, count: int) -> tuple[str, str, str]:
    """(full folder, TFRecord glob, small folder): made once, reused when complete."""
    folder, records = os.path.join(root, "full"), os.path.join(root, "records")
    small = os.path.join(root, "small")
    done = os.path.join(root, f"done-{count}")
    if not os.path.exists(done):
        _write_images(folder, count)
        _write_records(folder, records)
        open(done, "w").close()
    if not os.path.isdir(small):
        for name in sorted(os.listdir(folder)):
            os.makedirs(os.path.join(small, name))
            for file in sorted(os.listdir(os.path.join(folder, name)))[: _SMALL.value // CLASSES]:
                os.symlink(os.path.join(folder, name, file), os.path.join(small, name, file))
    return folder, os.path.join(records, "train-*.tfrecord"), small


def _write_images(folder: str, count: int) -> None:
    """Smooth random 224 px images (JPEG, quality 90), a class tint each: photo-like sizes."""
    for label in range(CLASSES):
        os.makedirs(os.path.join(folder, f"class{label}"), exist_ok=True)

    def write(index):
        label = index % CLASSES
        seed = tf.stack([index, tf.constant(7, tf.int64)])
        coarse = tf.random.stateless_uniform((14, 14, 3), seed, 0, 200)
        image = tf.image.resize(coarse, (SIZE, SIZE)) + tf.one_hot(label % 3, 3) * 55.0
        data = tf.io.encode_jpeg(tf.cast(image, tf.uint8), quality=90)
        name = tf.strings.join(
            [
                folder,
                "/class",
                tf.strings.as_string(label),
                "/",
                tf.strings.as_string(index),
                ".jpg",
            ]
        )
        tf.io.write_file(name, data)
        return index

    written = tf.data.Dataset.range(count).map(write, num_parallel_calls=tf.data.AUTOTUNE)
    for _ in written.batch(1024):
        pass


def _write_records(folder: str, records: str) -> None:
    os.makedirs(records, exist_ok=True)
    files = sorted(
        (os.path.join(folder, name, file), label)
        for label, name in enumerate(sorted(os.listdir(folder)))
        for file in os.listdir(os.path.join(folder, name))
    )
    writers = [
        tf.io.TFRecordWriter(os.path.join(records, f"train-{i:03d}.tfrecord"))
        for i in range(SHARDS)
    ]
    for i, (path, label) in enumerate(files):
        with open(path, "rb") as file:
            feature = {
                "image/encoded": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[file.read()])
                ),
                "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            }
        example = tf.train.Example(features=tf.train.Features(feature=feature))
        writers[i % SHARDS].write(example.SerializeToString())
    for writer in writers:
        writer.close()


def rss_and_start(small: str, full: str) -> dict:
    rows = {"small": [], "full": [], "start_small": [], "start_full": []}
    for round_ in range(_ROUNDS.value):
        for name, folder in (("small", small), ("full", full)):
            workdir = os.path.join(_DATA.value, f"run-{name}-{round_}")
            subprocess.run(["rm", "-rf", workdir], check=True)
            rss, start = _measure(folder, workdir, 20)
            rows[name].append(rss)
            rows[f"start_{name}"].append(start)
    return rows


def _measure(folder: str, workdir: str, steps: int) -> tuple[float, float]:
    """(peak RSS in MB, seconds from its start to its first training step) of a CLI run on
    `folder`, streamed, stopped by SIGTERM as step `steps` + 1 begins (its own rusage)."""
    args = [
        sys.executable,
        "-m",
        "tlloop.run",
        "--dataset=folder",
        f"--data_dir={folder}",
        "--data_memory=0",
        "--backbone=MobileNetV2",
        "--weights=none",
        f"--image_size={SIZE}",
        f"--batch_size={BATCH}",
        "--head_epochs=1",
        "--finetune_epochs=0",
        "--feature_cache=off",
        "--log_every_steps=1",
        "--quiet",
        f"--workdir={workdir}",
    ]
    env = {**os.environ, "TLLOOP_FAULT": f"SIGTERM@{steps + 1}"}
    started = time.perf_counter()
    os.makedirs(workdir)
    log = os.path.join(_DATA.value, f"{os.path.basename(workdir)}.log")
    quiet = [
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
    ]
    pid = os.posix_spawn(sys.executable, args, env, file_actions=quiet)
    metrics, first = os.path.join(workdir, "metrics.jsonl"), None
    while True:
        done, _, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if first is None and os.path.exists(metrics):
            with open(metrics) as file:
                if '"train"' in file.read():
                    first = time.perf_counter() - started
        time.sleep(0.05)
    return usage.ru_maxrss / 1024, first or float("nan")


def input_speed(full: str, records: str, rounds: int, batches: int = 120) -> dict:
    """Examples/s of each input pipeline, rounds alternating between them."""
    config = cli_config.DataConfig(
        dataset="folder", data_dir=full, image_size=SIZE, batch_size=BATCH, data_memory="0"
    )
    folder_stream = load_data(config).train_examples.training_batches(BATCH, 0)
    record_config = cli_config.DataConfig(
        dataset="tfrecord", train_files=records, image_size=SIZE, batch_size=BATCH, data_memory="0"
    )
    record_stream = load_data(record_config).train_examples.training_batches(BATCH, 0)
    keras_stream = (
        keras.utils.image_dataset_from_directory(
            full, image_size=(SIZE, SIZE), batch_size=BATCH, seed=0, verbose=False
        )
        .repeat()
        .prefetch(tf.data.AUTOTUNE)
    )
    pipelines = {"tlloop folder": folder_stream, "tlloop tfrecord": record_stream}
    pipelines["keras image_dataset_from_directory"] = keras_stream
    iterators = {name: iter(p) for name, p in pipelines.items()}
    for iterator in iterators.values():  # warm-up: threads, autotuning, file cache
        for _ in range(20):
            next(iterator)
    return _alternate(iterators, lambda iterator: next(iterator), batches, rounds, drain=40)


def _alternate(contenders: dict, call, count: int, rounds: int, drain: int) -> dict:
    """Per contender, per round: examples/s (wall clock) and examples per CPU second of this
    process (all its threads: less sensitive to other processes on the machine); the rounds
    alternate between the contenders. Each round first makes `drain` calls untimed: what a
    pipeline prefetched while the others were timed is not counted as its speed."""
    speeds = {name: {"wall": [], "cpu": []} for name in contenders}
    for _ in range(rounds):
        for name, contender in contenders.items():
            for _ in range(drain):
                call(contender)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(count):
                call(contender)
            speeds[name]["wall"].append(count * BATCH / (time.perf_counter() - wall))
            speeds[name]["cpu"].append(count * BATCH / (time.process_time() - cpu))
    return speeds


def training_speed(full: str, rounds: int, steps: int = 8) -> dict:
    """Examples/s of MobileNetV2 fine-tuned at 224 px: fed by the stream, and fed one batch."""
    keras.utils.set_random_seed(0)
    model = build_model(
        cli_config.ModelConfig(backbone="MobileNetV2", weights="none", image_size=SIZE), CLASSES
    )
    fine_tune = config_lib.PhaseConfig("finetune", 1, 1e-4, config_lib.Unfreeze("all"))
    phase = phase_lib.plan_phases([fine_tune], model)[0]
    phase_lib.apply_trainability(model, phase)
    step = compile_train(
        model,
        make_optimizer(phase.config, model.trainable_variables),
        phase.modes,
        Metrics(),
        tf.Variable(0, dtype=tf.int64),
        StepOptions(batch_size=BATCH, eval_batch_size=BATCH, log_every_steps=0),
    )
    config = cli_config.DataConfig(
        dataset="folder", data_dir=full, image_size=SIZE, batch_size=BATCH, data_memory="0"
    )
    streamed = iter(load_data(config).train_examples.training_batches(BATCH, 0))
    resident = iter(tf.data.Dataset.from_tensors(next(streamed)).repeat())
    feeds = {"streamed input": streamed, "one resident batch": resident}
    for feed in feeds.values():
        step(feed, 2)
    return _alternate(feeds, lambda feed: step(feed, 1), steps, rounds, drain=2)


def resume_cost(full: str, rounds: int) -> dict:
    """Seconds from asking for a resumed run's training batches to holding its first one."""
    config = cli_config.DataConfig(
        dataset="folder", data_dir=full, image_size=SIZE, batch_size=BATCH, data_memory="0"
    )
    examples = load_data(config).train_examples
    seconds = {10: [], 100_000: []}
    for _ in range(rounds):
        for step in seconds:
            started = time.perf_counter()
            next(iter(examples.training_batches(BATCH, 0, start_step=step)))
            seconds[step].append(time.perf_counter() - started)
    return {f"step {step}": values for step, values in seconds.items()}


def _range(values: list[float], digits: int = 1) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def main(argv: list[str]) -> None:
    del argv
    full, records, small = generate(_DATA.value, _IMAGES.value)
    rounds = _ROUNDS.value
    path = os.path.join(_OUTPUT.value, "STREAMING.json")
    results = {}
    if set(_PARTS.value) != set(PARTS) and os.path.exists(path):
        with open(path) as file:
            results = json.load(file)  # the parts not re-run are kept
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, TF {tf.__version__}"
    if "memory" in _PARTS.value:  # the counts the memory rows name
        results.update({"images": _IMAGES.value, "small": _SMALL.value})
    for part in _PARTS.value:  # the folder each part read (--images may differ run to run)
        results[f"{part}_images"] = _IMAGES.value
    measure = {
        "memory": lambda: rss_and_start(small, full),
        "input": lambda: input_speed(full, records, max(rounds, 5)),
        "training": lambda: training_speed(full, rounds),
        "resume": lambda: resume_cost(full, rounds),
    }
    for part in _PARTS.value:
        results[part] = measure[part]()
    os.makedirs(_OUTPUT.value, exist_ok=True)
    with open(path, "w") as file:
        json.dump(results, file, indent=1)
    text = table(results)
    with open(os.path.join(_OUTPUT.value, "STREAMING.md"), "w") as file:
        file.write(text)
    print(text)


def table(results: dict) -> str:
    """STREAMING.md: each measure's min-max over its rounds; ratios round by round."""
    memory, images, small = results["memory"], results["images"], results["small"]
    lines = [
        f"# Streamed data ({results['machine']}; min-max over rounds)",
        "",
        "| measure | value (ratios: to the last row of the group, round by round) |",
        "|---|---|",
        f"| peak RSS, {small} images streamed (MB) | {_range(memory['small'], 0)} |",
        f"| peak RSS, {images} images streamed (MB) | {_range(memory['full'], 0)} |",
        "| difference, round by round (MB) | "
        + _range([f - s for f, s in zip(memory["full"], memory["small"], strict=True)], 0)
        + " |",
        f"| seconds to the first step, {small} images | {_range(memory['start_small'])} |",
        f"| seconds to the first step, {images} images | {_range(memory['start_full'])} |",
    ]
    rows = [("input", "keras image_dataset_from_directory", "input")]
    rows += [("training", "one resident batch", "MobileNetV2 224 px training")]
    for part, reference, label in rows:
        base = results[part][reference]
        label += f" ({results.get(f'{part}_images', images)} images)"
        for name, speed in results[part].items():
            wall = [a / b for a, b in zip(speed["wall"], base["wall"], strict=True)]
            cpu = [a / b for a, b in zip(speed["cpu"], base["cpu"], strict=True)]
            lines.append(
                f"| {label} examples/s, {name} | {_range(speed['wall'], 1)}; ratio median "
                f"{statistics.median(wall):.2f}x ({_range(wall, 2)}), per CPU second "
                f"{statistics.median(cpu):.2f}x ({_range(cpu, 2)}) |"
            )
    for name, values in results["resume"].items():
        lines.append(f"| seconds to the first batch resumed at {name} | {_range(values, 3)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
