"""LogME (tlloop.rank): the published evidence, computed another way here; a ranking that
tells a pretrained backbone from a random one; the command line's table and its errors."""

from __future__ import annotations

import json
import math
import os

import keras
import numpy as np
import pytest
from conftest import PRETRAINED, make_config, run_cli

import tlloop
from tlloop.cli.data import load_task_data
from tlloop.data.examples import StreamedExamples
from tlloop.ranking import log_evidence, logme

GOLDEN = (math.sqrt(5) - 1) / 2


def dense_evidence(features, y, alpha, beta) -> float:
    """log p(y | F, alpha, beta) of the Bayesian linear model, from its definition (no SVD):
    A = alpha I + beta F^T F, m = beta A^-1 F^T y."""
    n, d = features.shape
    a = alpha * np.eye(d) + beta * features.T @ features
    m = beta * np.linalg.solve(a, features.T @ y)
    error = np.sum((features @ m - y) ** 2)
    _, log_det = np.linalg.slogdet(a)
    return (
        d / 2 * np.log(alpha)
        + n / 2 * np.log(beta)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * error
        - alpha / 2 * m @ m
        - log_det / 2
    )


def golden_max(f, low, high, tol=1e-9) -> tuple[float, float]:
    """(argmax, max) of a unimodal f on [low, high] by golden-section search."""
    a, b = low, high
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc > fd:
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = f(d)
    x = (a + b) / 2
    return x, f(x)


def max_evidence(features, y) -> float:
    """max over (alpha, beta) of the dense evidence, divided by N: nested 1-D searches over
    log alpha (inner) and log beta (outer), on a coarse grid's best bracket."""

    def best_over_alpha(log_beta):
        return golden_max(
            lambda la: dense_evidence(features, y, np.exp(la), np.exp(log_beta)), -25, 25
        )[1]

    grid = np.linspace(-20, 20, 41)
    values = [best_over_alpha(lb) for lb in grid]
    i = int(np.argmax(values))
    _, best = golden_max(best_over_alpha, grid[max(i - 1, 0)], grid[min(i + 1, 40)])
    return best / len(y)


def test_logme_equals_the_evidence_maximised_directly():
    rng = np.random.default_rng(0)
    # N > D and N < D (then the features' column space holds every target).
    for n, d in ((40, 6), (12, 20)):
        features = rng.normal(size=(n, d)) + 0.5
        labels = rng.integers(0, 3, n)
        labels[:3] = [0, 1, 2]
        per_class = []
        for c in range(3):
            y = (labels == c).astype(np.float64)
            score, alpha, beta = log_evidence(features, y)
            direct = max_evidence(features, y)
            # The fixed point's evidence vs the dense formula's maximum found by search.
            assert score == pytest.approx(direct, rel=1e-6), (n, d, c)
            # At the fixed point, the dense formula gives the same evidence.
            assert dense_evidence(features, y, alpha, beta) / n == pytest.approx(score, rel=1e-9)
            per_class.append(direct)
        assert logme(features, labels) == pytest.approx(np.mean(per_class), rel=1e-6)


def test_logme_of_feature_maps_pools_them_and_real_targets_are_columns():
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(30, 2, 3, 5))
    targets = rng.normal(size=(30, 2))
    pooled = maps.mean(axis=(1, 2))
    expected = np.mean([log_evidence(pooled, targets[:, k])[0] for k in range(2)])
    assert logme(maps, targets) == pytest.approx(expected, rel=1e-12)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    config = make_config(str(tmp_path_factory.mktemp("rank")), per_class=40)
    return load_task_data(config.data).train_examples


def test_pretrained_backbone_ranks_above_pixels_and_random_initialisations(digits, tmp_path):
    pretrained = tlloop.load_backbone(PRETRAINED, 32)
    candidates = {"pretrained": pretrained}
    candidates["pixels"] = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten()])
    for seed in range(3):
        keras.utils.set_random_seed(seed)
        candidates[f"random{seed}"] = tlloop.load_backbone(PRETRAINED, 32, weights="none")
    # Streamed examples (a tf.data pipeline in its own order) are read the same way.
    streamed = StreamedExamples(digits.ordered())
    ranking = tlloop.rank(candidates, streamed, output=str(tmp_path))
    scores = {row["name"]: row["logme"] for row in ranking.rows}
    # Measured: pretrained 0.161, raw pixels 0.136, random initialisations 0.096 to 0.170
    # (9 draws; the pretrained one beats 7): above their mean, not above every draw.
    assert scores["pretrained"] > scores["pixels"] + 0.01, scores
    assert scores["pretrained"] > np.mean([scores[f"random{s}"] for s in range(3)]) + 0.01
    names = [row["name"] for row in ranking.rows]
    assert names == sorted(scores, key=lambda name: -scores[name])
    assert ranking.examples == 200 and ranking.targets == 5
    saved = json.loads((tmp_path / "rank.json").read_text())
    assert [row["name"] for row in saved["candidates"]] == names
    assert all(row["seconds"] >= row["feature_seconds"] > 0 for row in saved["candidates"])
    assert f"| {names.index('pretrained') + 1} | pretrained |" in (tmp_path / "rank.md").read_text()
    # The same score from in-memory examples in index order.
    again = tlloop.rank({"pretrained": pretrained}, digits)
    assert again.rows[0]["logme"] == pytest.approx(scores["pretrained"], rel=1e-5)


def test_rank_arguments_are_checked(digits):
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten()], name="flat")
    with pytest.raises(ValueError, match="backbones: empty"):
        tlloop.rank({}, digits)
    with pytest.raises(ValueError, match="batch_size=0"):
        tlloop.rank([model], digits, batch_size=0)


def test_command_line_prints_and_writes_the_table(workdir):
    result = run_cli(
        "--classes=5-9",
        "--train_examples_per_class=8",
        f"--backbone={PRETRAINED}",
        f"--candidates={PRETRAINED},{PRETRAINED}@none",
        f"--workdir={workdir}",
        module="tlloop.rank",
    )
    assert result.returncode == 0, result.stderr
    with open(os.path.join(workdir, "rank", "rank.json")) as file:
        table = json.load(file)
    rows = table["candidates"]
    assert {row["name"] for row in rows} == {PRETRAINED, f"{PRETRAINED}@none"}
    assert rows[0]["logme"] >= rows[1]["logme"]
    assert table["examples"] == 40
    assert "| 1 |" in result.stdout and "rank.md" in result.stdout


def test_command_line_refuses_a_bad_candidate_in_one_line(workdir):
    result = run_cli("--candidates=a,,b", f"--workdir={workdir}", module="tlloop.rank")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("tlloop.rank: error: --candidates=") and "accepted" in lines[-1]
    assert not os.path.exists(os.path.join(workdir, "rank"))
