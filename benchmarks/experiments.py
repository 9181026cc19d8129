"""Re-derives the results an experiment flagfile quotes: its run at each seed, as the CLI runs it.

    python -m benchmarks.experiments [--experiment=experiments/h5_grayscale_cut.flags]
        [--seeds=0,1,2] [--variant=--backbone_range=0:1 ...] [--output=FILE.json]

Each run is `python -m tlloop.run --flagfile=EXPERIMENT --seed=S` (plus a variant's flags) into
a fresh temporary workdir, in its own process with a timeout; the evaluation value of the run's
best metric (accuracy, micro_f1, ...) after each phase is read from its results.json. The
flagfile's comment quotes these numbers, the README too; benchmarks/results/
EXPERIMENTS-NAME.json holds the last output for experiments/NAME.flags.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_FLAGFILE = flags.DEFINE_string(
    "experiment", "experiments/h5_grayscale_cut.flags", "The experiment's flagfile."
)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, one run each.")
_VARIANTS = flags.DEFINE_multi_string(
    "variant", [], "Extra flags for a variant (space-separated); the plain run is always made."
)
_OUTPUT = flags.DEFINE_string("output", "", "Write the results as JSON here.")
_TIMEOUT = flags.DEFINE_integer("timeout", 900, "Seconds one run may take.")


def run_once(flagfile: str, seed: int, extra: list[str], timeout: int) -> dict:
    """One run of `flagfile` at `seed` with `extra` flags: each phase's evaluation value of
    the run's best metric (accuracy unless named) and the best evaluation's (3 decimals), and
    the run's seconds."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [
            sys.executable,
            "-m",
            "tlloop.run",
            f"--flagfile={flagfile}",
            f"--workdir={workdir}",
            f"--seed={seed}",
            "--quiet",
            "--nosummaries",
            *extra,
        ]
        started = time.perf_counter()
        done = subprocess.run(command, timeout=timeout, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        seconds = time.perf_counter() - started
        with open(os.path.join(workdir, "results.json")) as file:
            results = json.load(file)
    metric = results["best"]["metric"].split(":")[0]  # the task's: accuracy, micro_f1, ...
    return {
        "seed": seed,
        **({} if metric == "accuracy" else {"metric": metric}),
        **{p["name"]: round(p["eval"][metric], 3) for p in results["phases"]},
        "best": round(results["best"]["value"], 3),
        "seconds": round(seconds, 1),
    }


def main(argv: list[str]) -> None:
    del argv
    out = {"experiment": _FLAGFILE.value, "runs": {}}
    for variant in ["", *_VARIANTS.value]:
        rows = [
            run_once(_FLAGFILE.value, int(seed), variant.split(), _TIMEOUT.value)
            for seed in _SEEDS.value
        ]
        out["runs"][variant or "as quoted"] = rows
        for row in rows:
            print(variant or "as quoted", row, flush=True)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as file:
            json.dump(out, file, indent=1)
            file.write("\n")


if __name__ == "__main__":
    app.run(main)
