"""Result quality of the default recipe, at equal epochs, on real transfers.

    python -m benchmarks.quality [--seeds=3] [--output=benchmarks/results]

Each task is a real transfer built from images that ship inside tlloop: the small CNN pretrained
on UCI digits 0-4 (experiments/pretrained/small_cnn_digits0-4.keras) transferred to digits 5-9
with 5, 20 or all training examples per class, evaluated on the same 269 held-out digits. Per
task and seed, at the epochs `--recipe=auto` chooses for it:

- auto: `--recipe=auto`, nothing else given;
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

import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from absl import app, flags, logging

from tlloop import config as config_lib
from tlloop import trainer

_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per task and contender.")
_OUTPUT = flags.DEFINE_string("output", "benchmarks/results", "Directory for QUALITY.md/json.")
_TASKS = flags.DEFINE_list("tasks", ["5", "20", "0"], "Training examples per class (0: all).")
_SWEEP_TASKS = flags.DEFINE_list(
    "sweep_tasks", ["5", "20", "0"], "The tasks (of --tasks) that get the learning-rate sweep."
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


def _values(per_class: int, seed: int, **extra) -> dict:
    return {
        "workdir": "unused",
        "dataset": "digits",
        "classes": "5-9",
        "train_examples_per_class": per_class,
        "backbone": PRETRAINED,
        "seed": seed,
        "summaries": False,
        "quiet": True,
        "checkpoint_every_secs": 0.0,
        **extra,
    }


def run_tlloop(values: dict) -> tuple[float, dict]:
    """(final eval accuracy, the recipe's choices) of one tlloop run, in a temporary workdir."""
    config = config_lib.from_flags(values)
    experiment = trainer.build_experiment(config)
    with tempfile.TemporaryDirectory() as workdir:
        trainer_ = experiment.trainer()
        trainer_.workdir = workdir
        data = experiment.data
        results = trainer_.fit(
            experiment.model,
            data.train_examples,
            data.eval_examples,
            batch_size=experiment.config.data.batch_size,
            export=False,
        )
    chosen = experiment.recipe.to_json() if experiment.recipe else {}
    return results.phases[-1]["eval"]["accuracy"], {**chosen, "config": experiment.config}


def run_fit(per_class: int, seed: int, head_epochs: int, finetune_epochs: int) -> float:
    """The Keras guide's recipe through compile + fit on the same backbone and split."""
    config = config_lib.from_flags(_values(per_class, seed, recipe="guide"))
    experiment = trainer.build_experiment(config)  # seeds, loads the data, builds the model
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
    seeds = range(_SEEDS.value)
    tasks = []
    for per_class in map(int, _TASKS.value):
        scores: dict[str, list[float]] = {}
        recipe = None
        for seed in seeds:
            accuracy, recipe = run_tlloop(_values(per_class, seed))
            scores.setdefault("auto", []).append(accuracy)
            head_epochs = recipe["config"].phases[0].epochs
            finetune_epochs = recipe["config"].phases[1].epochs
            epochs = {"head_epochs": head_epochs, "finetune_epochs": finetune_epochs}
            if not _SWEEP_ONLY.value:
                guide, _ = run_tlloop(_values(per_class, seed, recipe="guide", **epochs))
                scores.setdefault("guide (tlloop)", []).append(guide)
                scores.setdefault("guide (fit)", []).append(
                    run_fit(per_class, seed, head_epochs, finetune_epochs)
                )
                hand, _ = run_tlloop(_values(per_class, seed, **HAND_TUNED))
                scores.setdefault("hand-tuned", []).append(hand)
            head_lr = recipe["config"].phases[0].learning_rate
            finetune_lr = recipe["config"].phases[1].learning_rate
            for factor in SWEEP if str(per_class) in _SWEEP_TASKS.value else ():
                if factor == 1.0:
                    value = accuracy
                else:
                    rates = {"head_lr": head_lr * factor, "finetune_lr": finetune_lr * factor}
                    value, _ = run_tlloop(_values(per_class, seed, **rates))
                scores.setdefault(f"sweep x{factor:g}", []).append(value)
            print(per_class, seed, {k: round(v[-1], 4) for k, v in scores.items()}, flush=True)
        train_examples = recipe["train_examples"]
        tasks.append(
            {
                "task": f"digits 0-4 -> 5-9, {per_class or 'all'} per class "
                f"({train_examples} training examples)",
                "recipe": {k: v for k, v in recipe.items() if k != "config"},
                "scores": scores,
            }
        )
        write(tasks, time.perf_counter() - started)  # after each task: a partial table
    print(markdown(tasks, time.perf_counter() - started))


def write(tasks: list[dict], seconds: float) -> None:
    os.makedirs(_OUTPUT.value, exist_ok=True)
    with open(os.path.join(_OUTPUT.value, "QUALITY.json"), "w") as file:
        json.dump({"seconds": round(seconds, 1), "tasks": tasks}, file, indent=2, default=str)
    with open(os.path.join(_OUTPUT.value, "QUALITY.md"), "w") as file:
        file.write(markdown(tasks, seconds) + "\n")


def markdown(tasks: list[dict], seconds: float) -> str:
    contenders = ("auto", "guide (tlloop)", "guide (fit)", "hand-tuned")
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
