"""An experiment's quoted result re-derived: the flagfile's comment says what it gives at seed 0,
and running it as the comment says gives that."""

from __future__ import annotations

import json
import os
import re

import pytest
from conftest import REPO, run_cli

FLAGFILE = os.path.join("experiments", "h5_grayscale_cut.flags")


def _quoted() -> tuple[float, float]:
    """(head phase, end) evaluation accuracy the flagfile's comment quotes for seed 0."""
    with open(os.path.join(REPO, FLAGFILE)) as file:
        comment = " ".join(line.lstrip("# ").strip() for line in file if line.startswith("#"))
    match = re.search(
        r"seeds 0/1/2, [^:]*: ([0-9.]+)/[0-9./]+ at the end \(([0-9.]+)/[0-9./]+ after the head",
        comment,
    )
    assert match, "the comment no longer quotes seed 0's result in the expected words"
    return float(match.group(2)), float(match.group(1))


def test_the_h5_grayscale_cut_experiment_gives_the_result_its_flagfile_quotes(tmp_path):
    workdir = str(tmp_path / "run")
    done = run_cli(
        f"--flagfile={FLAGFILE}", f"--workdir={workdir}", "--seed=0", "--quiet", "--nosummaries"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with open(os.path.join(workdir, "results.json")) as file:
        phases = json.load(file)["phases"]
    head, end = _quoted()
    # Within 2 of the 269 evaluation digits: float round-off may move an example or two.
    assert phases[0]["eval"]["accuracy"] == pytest.approx(head, abs=2 / 269)
    assert phases[-1]["eval"]["accuracy"] == pytest.approx(end, abs=2 / 269)
