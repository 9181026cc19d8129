"""Which backbone to choose: LogME scores of candidate backbones on the target training data.

`python -m tlloop.rank --flagfile=experiments/NAME.flags --candidates=A,B,C` (and
`tlloop.rank(backbones, data)`) runs each candidate once, frozen and in inference mode, over
the training examples (the feature cache's pass: in memory or streamed), and scores its
features with LogME (You, Liu, Wang, Long, ICML 2021): the log evidence of a Bayesian linear
model from the features to each target, its prior precision alpha and noise precision beta
set by maximising that evidence, divided by the number of examples and averaged over the
targets (one-vs-rest indicator targets for classification). Higher is better: the candidate
whose features a linear model explains best is expected to fine-tune best. The table (score
and seconds per candidate) is printed and written as rank.json and rank.md.

Implemented from the paper's description: with F = U diag(sigma) V^T (thin SVD) and z = U^T y,
alpha and beta are iterated to their fixed point (MacKay's updates gamma = sum beta s /
(alpha + beta s), alpha = gamma / |m|^2, beta = (N - gamma) / |Fm - y|^2, s = sigma^2), each
step O(min(N, D)) per target once the SVD is made.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np
from absl import app, flags

from tlloop.cli import flags as tlloop_flags
from tlloop.config import ConfigError

# The fixed point is iterated until alpha and beta each change by less than this (relative).
TOLERANCE = 1e-12
MAX_ITERATIONS = 100_000


def log_evidence(features: np.ndarray, target: np.ndarray) -> tuple[float, float, float]:
    """(maximum log evidence / N, alpha, beta) of the Bayesian linear model target ~
    N(features @ w, 1/beta), w ~ N(0, I/alpha), for `features` [N, D] and `target` [N]."""
    return _evidences(features, target[:, None])[0]


def logme(features: np.ndarray, targets: np.ndarray) -> float:
    """LogME of `features` [N, D] (or [N, ..., D]: averaged over the middle axes, as a pooling
    head does) for `targets`: integer class labels [N] (one-vs-rest indicator targets, one per
    class present) or real targets / multi-hot labels [N, K]. The mean over targets of the
    maximum log evidence divided by N."""
    features = np.asarray(features, np.float64)
    if features.ndim > 2:
        features = features.mean(axis=tuple(range(1, features.ndim - 1)))
    features = features.reshape(len(features), -1)
    return float(np.mean([e for e, _, _ in _evidences(features, target_matrix(targets))]))


def target_matrix(targets: np.ndarray) -> np.ndarray:
    """[N, K] float64 targets: integer labels [N] become indicator columns of the classes
    present (in label order); [N, K] targets are kept."""
    targets = np.asarray(targets)
    if targets.ndim == 1 and np.issubdtype(targets.dtype, np.integer):
        return (targets[:, None] == np.unique(targets)[None, :]).astype(np.float64)
    return np.asarray(targets, np.float64).reshape(len(targets), -1)


def _evidences(features: np.ndarray, targets: np.ndarray) -> list[tuple[float, float, float]]:
    n, d = features.shape
    u, sigma, _ = np.linalg.svd(features, full_matrices=False)
    s = sigma**2
    k = len(s)
    found = []
    for y in targets.T:
        z = u.T @ y
        # The part of y outside the features' column space: no weight can explain it.
        outside = max(float(y @ y - z @ z), 0.0)
        alpha, beta = 1.0, 1.0
        for _ in range(MAX_ITERATIONS):
            t = alpha + beta * s
            gamma = float(np.sum(beta * s / t))
            m2 = float(np.sum((beta * sigma * z / t) ** 2))
            residual = float(np.sum((alpha * z / t) ** 2)) + outside
            new_alpha = gamma / max(m2, 1e-300)
            new_beta = (n - gamma) / max(residual, 1e-300)
            done = (
                abs(new_alpha - alpha) <= TOLERANCE * alpha
                and abs(new_beta - beta) <= TOLERANCE * beta
            )
            alpha, beta = new_alpha, new_beta
            if done:
                break
        t = alpha + beta * s
        m2 = float(np.sum((beta * sigma * z / t) ** 2))
        residual = float(np.sum((alpha * z / t) ** 2)) + outside
        log_det = float(np.sum(np.log(t))) + (d - k) * math.log(alpha)
        evidence = (
            d / 2 * math.log(alpha)
            + n / 2 * math.log(beta)
            - n / 2 * math.log(2 * math.pi)
            - beta / 2 * residual
            - alpha / 2 * m2
            - log_det / 2
        )
        found.append((evidence / n, alpha, beta))
    return found


@dataclasses.dataclass(frozen=True)
class Ranking:
    """Candidates best first: per candidate its name, LogME score, the seconds of its feature
    pass and of LogME, its feature size; with the number of examples and targets scored."""

    rows: list[dict]
    examples: int
    targets: int

    def to_json(self) -> dict:
        return {
            "metric": "LogME",
            "examples": self.examples,
            "targets": self.targets,
            "candidates": self.rows,
        }

    def to_markdown(self) -> str:
        lines = [
            f"LogME on {self.examples} training examples, {self.targets} targets (higher is "
            "better)",
            "",
            "| rank | candidate | LogME | seconds | features | feature dims |",
            "|---|---|---|---|---|---|",
        ]
        for i, row in enumerate(self.rows, 1):
            lines.append(
                f"| {i} | {row['name']} | {row['logme']:.4f} | {row['seconds']:.2f} | "
                f"{row['feature_seconds']:.2f} | {row['feature_dims']} |"
            )
        return "\n".join(lines) + "\n"

    def save(self, directory: str) -> tuple[str, str]:
        """Writes rank.json and rank.md into `directory` (made if missing); their paths."""
        from tlloop.workdir import write_json, write_text

        os.makedirs(directory, exist_ok=True)
        paths = os.path.join(directory, "rank.json"), os.path.join(directory, "rank.md")
        write_json(paths[0], self.to_json())
        write_text(paths[1], self.to_markdown())
        return paths


def rank(
    backbones: Mapping[str, object] | Sequence[object],
    data,
    *,
    batch_size: int = 64,
    output: str | None = None,
) -> Ranking:
    """Scores each backbone (a Keras model taking the examples' inputs; a mapping names them,
    a sequence is named by each model's name) with LogME on `data`: (inputs, labels) arrays, a
    finite tf.data.Dataset of (inputs, label) pairs, or tlloop Examples (streamed ones too),
    read once per backbone in inference mode. Labels: integer classes, or [N, K] targets.
    Returns the Ranking, best first; with `output`, also writes rank.json and rank.md there.
    Raises ValueError/TypeError naming the argument at fault."""
    from tlloop import feature_cache
    from tlloop.data.examples import as_examples

    named = dict(backbones) if isinstance(backbones, Mapping) else {m.name: m for m in backbones}
    if not named or len(named) != len(backbones):
        raise ValueError(
            "backbones: empty or two with one name; accepted: a mapping name -> Keras model, "
            "or models with distinct names"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: not positive; accepted: >= 1")
    examples = as_examples(data, argument="data")
    rows, targets = [], None
    for name, backbone in named.items():
        started = time.perf_counter()
        found = feature_cache.features(feature_cache.inference_call(backbone), examples, batch_size)
        if not isinstance(found.inputs, np.ndarray):
            raise ValueError(
                f"backbones[{name!r}]: returns {type(found.inputs).__name__} of tensors; "
                "accepted: a backbone with one feature output"
            )
        feature_seconds = time.perf_counter() - started
        targets = target_matrix(found.labels)
        score = logme(found.inputs, targets)
        rows.append(
            {
                "name": name,
                "logme": score,
                "seconds": round(time.perf_counter() - started, 4),
                "feature_seconds": round(feature_seconds, 4),
                "feature_dims": int(found.inputs.shape[-1]),
            }
        )
    rows.sort(key=lambda row: -row["logme"])
    ranking = Ranking(rows, examples.size, int(targets.shape[1]))
    if output:
        ranking.save(output)
    return ranking


# The command line. Its flags are defined only when run as `python -m tlloop.rank`: the module
# is also the library's (`tlloop.rank`), imported next to other entry points.


def _define_flags() -> None:
    tlloop_flags.define_flags(flags.FLAGS)
    flags.mark_flag_as_required("workdir")
    flags.DEFINE_list(
        "candidates",
        [],
        "Backbones to score, each a --backbone value, optionally with its own --weights after "
        "@ (small_cnn@none, model.keras@none: random initialisation); empty: --backbone alone. "
        "Each is built with the other model flags (--image_size, --backbone_layer, ...).",
    )
    flags.DEFINE_string("output", "", "Directory for rank.json and rank.md; empty: WORKDIR/rank.")


def candidate_specs(candidates: Sequence[str], backbone: str, weights: str) -> list[tuple]:
    """(name, source, weights) per --candidates entry (or --backbone alone)."""
    specs = []
    for entry in candidates or [backbone]:
        source, _, own = entry.partition("@")
        if not source:
            raise ConfigError(
                f"--candidates={','.join(candidates)}: an empty backbone in {entry!r}; "
                "accepted: BACKBONE or BACKBONE@WEIGHTS, comma-separated"
            )
        specs.append((entry, source, own if "@" in entry else weights))
    if len({name for name, _, _ in specs}) != len(specs):
        raise ConfigError(
            f"--candidates={','.join(candidates)}: a candidate is named twice; accepted: "
            "distinct entries"
        )
    return specs


def main(argv: list[str]) -> int:
    values = flags.FLAGS
    try:
        if len(argv) > 1:
            raise ConfigError(f"unexpected arguments {argv[1:]}; accepted: only --name=value flags")
        config = tlloop_flags.to_config(values)
        output = values.output or os.path.join(config.workdir, "rank")
        model = config.model
        specs = candidate_specs(values.candidates, model.backbone, model.weights)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        from tlloop.data.text import is_text, load_task_data
        from tlloop.models.backbones import build_backbone

        if is_text(config.data):
            raise ConfigError(
                f"--dataset={config.data.dataset}: tlloop.rank scores image backbones; "
                "accepted: an image dataset"
            )
        data = load_task_data(config.data)
        backbones = {
            name: build_backbone(
                source,
                weights,
                model.image_size,
                safe_mode=not model.unsafe_deserialization,
                layer=model.backbone_layer,
                channels=model.backbone_channels,
                value_range=model.backbone_range,
            )
            for name, source, weights in specs
        }
    except ConfigError as error:
        print(f"tlloop.rank: error: {tlloop_flags.flag_line(error)}", file=sys.stderr)
        return 2
    ranking = rank(backbones, data.train_examples, batch_size=config.data.eval_batch)
    paths = ranking.save(output)
    print(ranking.to_markdown(), end="")
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    _define_flags()
    app.run(main)
