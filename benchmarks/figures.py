"""The single figures the docs quote in prose, re-measured with tlloop on the embedded digits.

    python -m benchmarks.figures [--only=logme,adabn,l2sp,tflite,distributed]

Each figure is the setup its docs passage describes (and the test it comes from):
- logme: LogME of the shipped backbone (pretrained on digits 0-4), raw pixels and 9 random
  initialisations of the same network on digits 5-9, 40 per class (tests/test_rank.py);
- adabn: how far --bn_mode=adapt moves the shipped backbone's BatchNorm statistics on 250
  images of digits 5-9 (tests/test_adabn.py);
- l2sp: per-layer drift after SGD fine-tuning at 3e-3 for 6 steps, plain and with --l2sp=300
  (tests/test_anchors.py);
- tflite: the quickstart exported to every TFLite format: size, agreement, latency
  (tests/test_tflite.py);
- distributed: a 2-replica run on 2 logical CPUs against one device, plain and with
  --jit_compile (tests/test_distribute.py).
Writes benchmarks/results/FIGURES.json and FIGURES.md (a figure not re-run keeps its old entry).
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
PRETRAINED = "experiments/pretrained/small_cnn_digits0-4.keras"
FIGURES = ("logme", "adabn", "l2sp", "tflite", "distributed")
flags.DEFINE_list("only", list(FIGURES), f"the figures to re-measure, of {','.join(FIGURES)}")


def run(workdir: str, *args: str) -> dict:
    """`python -m tlloop.run ARGS --workdir=WORKDIR` from the repository; its results.json."""
    command = [sys.executable, "-m", "tlloop.run", *args, "--quiet", f"--workdir={workdir}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}\n{done.stderr[-3000:]}")
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as file:
        return json.load(file)


def logme(root: str) -> dict:
    import keras

    import tlloop
    from tlloop.cli import config as cli_config
    from tlloop.cli.data import load_task_data

    values = {"classes": "5-9", "train_examples_per_class": 40, "workdir": root}
    data = load_task_data(cli_config.from_flags(values).data)
    digits = data.train_examples
    candidates = {"pretrained": tlloop.load_backbone(os.path.join(REPO, PRETRAINED), 32)}
    candidates["pixels"] = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten()])
    for seed in range(9):
        keras.utils.set_random_seed(seed)
        candidates[f"random{seed}"] = tlloop.load_backbone(
            os.path.join(REPO, PRETRAINED), 32, weights="none"
        )
    scores = {row["name"]: row["logme"] for row in tlloop.rank(candidates, digits).rows}
    random = [scores[f"random{s}"] for s in range(9)]
    probes = {name: ridge_probe(candidates[name], digits, data.eval_examples) for name in scores}
    random_probes = [probes[f"random{s}"] for s in range(9)]
    return {
        "examples": 200,
        "pretrained": round(scores["pretrained"], 3),
        "pixels": round(scores["pixels"], 3),
        "random": [round(s, 3) for s in random],
        "random_min": round(min(random), 3),
        "random_max": round(max(random), 3),
        "pretrained_beats": int(sum(scores["pretrained"] > s for s in random)),
        "ridge_probe_eval_examples": data.eval_examples.size,
        "ridge_probe_pretrained": round(probes["pretrained"], 3),
        "ridge_probe_pixels": round(probes["pixels"], 3),
        "ridge_probe_random_min": round(min(random_probes), 3),
        "ridge_probe_random_max": round(max(random_probes), 3),
    }


def ridge_probe(backbone, train, held_out, penalty: float = 1.0) -> float:
    """Held-out accuracy of a ridge classifier (one-hot targets, features standardised on the
    training examples, `penalty` x identity) on the backbone's pooled features."""
    from tlloop import feature_cache

    def pooled(examples):
        found = feature_cache.features(feature_cache.inference_call(backbone), examples)
        x = found.inputs.reshape(len(found.labels), -1, found.inputs.shape[-1]).mean(axis=1)
        return x.astype(np.float64), found.labels

    (x, y), (x_test, y_test) = pooled(train), pooled(held_out)
    classes = np.unique(y)
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-8
    x, x_test = (x - mean) / scale, (x_test - mean) / scale
    targets = (y[:, None] == classes[None, :]).astype(np.float64)
    w = np.linalg.solve(x.T @ x + penalty * np.eye(x.shape[1]), x.T @ targets)
    return float(np.mean(classes[np.argmax(x_test @ w, axis=1)] == y_test))


SMALL = ["--classes=5-9", "--batch_size=16", f"--backbone={PRETRAINED}", "--recipe=guide"]


def adabn(root: str) -> dict:
    started = time.perf_counter()
    results = run(
        os.path.join(root, "adabn"),
        *SMALL,
        "--train_examples_per_class=50",
        "--bn_mode=adapt",
        "--head_epochs=1",
        "--finetune_epochs=0",
    )
    layers = results["bn_adapt"]["layers"]
    return {
        "examples": 250,
        "passes": results["bn_adapt"]["passes"],
        "layers": [row["layer"] for row in layers],
        "mean_shift": [round(row["mean_shift"], 3) for row in layers],
        "variance_change": [round(row["variance_change"], 3) for row in layers],
        "run_seconds": round(time.perf_counter() - started, 1),
    }


def l2sp(root: str) -> dict:
    figures = {}
    for name, alpha in (("plain", "0"), ("l2sp_300", "300")):
        results = run(
            os.path.join(root, name),
            *SMALL,
            "--train_examples_per_class=8",
            "--head_epochs=0",
            "--finetune_epochs=2",
            "--optimizer=sgd",
            "--finetune_lr=3e-3",
            "--unfreeze=all",
            "--steps_per_loop=1",
            f"--l2sp={alpha}",
        )
        drift = results["phases"][-1]["drift"]
        figures[name] = {k: round(v, 2) for k, v in sorted(drift.items())}
    return figures


def tflite(root: str) -> dict:
    results = run(
        os.path.join(root, "quickstart"),
        "--flagfile=experiments/quickstart.flags",
        "--export_tflite=float32,dynamic,int8",
        "--tflite_min_agreement=0.98",  # the docs say what the default 0.99 does with dynamic
    )
    reports = results["export"]["tflite"]
    figures = {
        fmt: {
            "kib": round(report["bytes"] / 1024),
            "agreement": round(report["agreement"], 3),
            "max_probability_difference": float(f"{report['max_probability_difference']:.1g}"),
            "latency_ms": round(report["latency_ms"], 3),
        }
        for fmt, report in reports.items()
    }
    speedup = reports["float32"]["latency_ms"] / reports["int8"]["latency_ms"]
    figures["int8_speedup_over_float32"] = round(speedup, 1)
    return figures


def distributed(root: str) -> dict:
    import keras

    small = [
        "--flagfile=experiments/quickstart.flags",
        "--train_examples_per_class=13",
        "--head_epochs=2",
        "--finetune_epochs=2",
        "--dropout=0",
        "--augment=",
        "--eval_batch_size=7",
        "--log_every_steps=1",
        "--export=last",
    ]
    mirrored = ["--strategy=mirrored", "--logical_devices=2"]
    runs = {"single": ["--strategy=default"], "plain": mirrored}
    runs["jit"] = [*mirrored, "--jit_compile"]
    weights, losses = {}, {}
    for name, extra in runs.items():
        workdir = os.path.join(root, f"distributed-{name}")
        run(workdir, *small, *extra)
        model = keras.saving.load_model(os.path.join(workdir, "export", "model.keras"))
        weights[name] = {v.path: v.numpy() for v in model.weights if "seed_generator" not in v.path}
        with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as file:
            rows = [json.loads(line) for line in file]
        losses[name] = np.array([row["loss"] for row in rows if row["kind"] == "train"])
    figures = {}
    for name in ("plain", "jit"):
        differences = np.concatenate(
            [np.abs(weights[name][k] - weights["single"][k]).ravel() for k in weights["single"]]
        )
        loss = np.abs(losses[name] - losses["single"]) / np.abs(losses["single"])
        figures[name] = {
            "max_weight_difference": float(f"{differences.max():.2g}"),
            "percent_within_1e-5": round(100 * float(np.mean(differences <= 1e-5)), 2),
            "max_loss_relative_difference": float(f"{loss.max():.2g}"),
        }
    return figures


def write(figures: dict) -> None:
    with open(os.path.join(RESULTS, "FIGURES.json"), "w", encoding="utf-8") as file:
        json.dump(figures, file, indent=1)
    lines = ["# Figures quoted in the docs (python -m benchmarks.figures)", ""]
    for name in FIGURES:
        if name not in figures:
            continue
        entry = figures[name]
        lines += [f"## {name} ({entry.get('seconds')} s)", ""]
        lines += [f"- {k}: {json.dumps(v)}" for k, v in entry.items() if k != "seconds"]
        lines.append("")
    with open(os.path.join(RESULTS, "FIGURES.md"), "w", encoding="utf-8") as file:
        file.write("\n".join(lines))
    print("\n".join(lines), flush=True)


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    unknown = set(flags.FLAGS.only) - set(FIGURES)
    if unknown:
        raise app.UsageError(f"--only={','.join(flags.FLAGS.only)}: accepted: {','.join(FIGURES)}")
    path = os.path.join(RESULTS, "FIGURES.json")
    figures = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            figures = json.load(file)
    measures = {"logme": logme, "adabn": adabn, "l2sp": l2sp, "tflite": tflite}
    measures["distributed"] = distributed
    with tempfile.TemporaryDirectory() as root:
        for name in FIGURES:
            if name in flags.FLAGS.only:
                started = time.perf_counter()
                figures[name] = measures[name](root)
                figures[name]["seconds"] = round(time.perf_counter() - started)
                print(name, figures[name], flush=True)
                write(figures)


if __name__ == "__main__":
    app.run(main)
