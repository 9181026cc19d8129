"""What a researcher inspects: TensorBoard summaries and a machine-readable metrics.jsonl.

Writers live under WORKDIR/tensorboard: `train` and `eval` hold the scalars, images,
histograms and text; the directory itself holds the run's hparams, so several runs under one
TensorBoard logdir compare in the HParams dashboard. On a non-chief task everything is a no-op.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api
from tensorboard.plugins.pr_curve import summary as pr_curve_summary
from tensorflow.core.util import event_pb2
from tensorflow.python.ops import summary_ops_v2

from tlloop.workdir import write_text


class Summaries:
    """TensorBoard writers for one run, plus WORKDIR/metrics.jsonl; all on one global step."""

    def __init__(self, workdir: str, *, enabled: bool = True) -> None:
        logdir = os.path.join(workdir, "tensorboard")
        self.workdir = workdir
        self.enabled = enabled
        self.writers = {
            name: tf.summary.create_file_writer(os.path.join(logdir, name))
            if enabled
            else tf.summary.create_noop_writer()
            for name in ("train", "eval")
        }
        self.root = tf.summary.create_file_writer(logdir) if enabled else None
        self._jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self._jsonl = None
        if enabled:
            self._jsonl = open(self._jsonl_path, "a")  # noqa: SIM115  closed in close()

    def start_session(self, step: int) -> None:
        """Marks a (re)start at `step`: TensorBoard then drops what a killed run wrote past it.

        Each writer gets a SessionLog.START event at step + 1. TensorBoard ignores a run's
        first START and, at each later one, discards the events at or after its step; the
        resumed run writes those steps again. metrics.jsonl drops its lines past `step` too.
        """
        if self._jsonl is None:
            return
        start = event_pb2.Event(
            step=step + 1, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        )
        for writer in self.writers.values():
            with writer.as_default():
                # No public TF2 call writes a SessionLog; this op is what writes raw events.
                summary_ops_v2.import_event(tf.constant(start.SerializeToString()))
        self._jsonl.close()
        with open(self._jsonl_path) as file:
            kept = [line.rstrip("\n") + "\n" for line in file if _step_of(line) <= step]
        write_text(self._jsonl_path, "".join(kept))
        self._jsonl = open(self._jsonl_path, "a")  # noqa: SIM115  closed in close()

    def default(self, split: str = "train"):
        """A context in which in-graph summaries (the train step's) go to `split`'s writer."""
        return self.writers[split].as_default()

    def scalars(self, split: str, values: dict[str, float], step: int) -> None:
        with self.writers[split].as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def text(self, name: str, markdown: str, step: int) -> None:
        with self.writers["train"].as_default(step=step):
            tf.summary.text(name, markdown)

    def image(self, split: str, name: str, pixels: np.ndarray, step: int) -> None:
        """One image, float pixels in [0, 1], shape (height, width, channels)."""
        with self.writers[split].as_default(step=step):
            tf.summary.image(name, np.asarray(pixels, np.float32)[None], step=step)

    def pr_curve(self, split: str, name: str, tp, fp, tn, fn, step: int) -> None:
        """One precision-recall curve for TensorBoard's PR curves dashboard, from the weighted
        true/false positive/negative counts at each of its thresholds (ascending, evenly spaced
        from 0 to 1)."""
        tp, fp, tn, fn = (np.asarray(c, np.float64) for c in (tp, fp, tn, fn))
        precision = tp / np.maximum(tp + fp, 1e-7)
        recall = tp / np.maximum(tp + fn, 1e-7)
        summary = pr_curve_summary.raw_data_pb(
            name, tp, fp, tn, fn, precision, recall, num_thresholds=len(tp)
        )
        with self.writers[split].as_default(step=step):
            tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=step)

    def hparams(self, values: dict, trial: str, metric_names=("accuracy",)) -> None:
        """Records the run's hyperparameters, and the eval scalars (`metric_names` and the
        loss) as its metrics, for the HParams dashboard (which infers no metrics without this
        experiment config)."""
        if self.root is not None:
            metrics = [
                hparams_api.Metric(tag, group="eval", display_name=f"eval {tag}")
                for tag in (*metric_names, "loss")
            ]
            with self.root.as_default():
                hparams_api.hparams_config(
                    hparams=[hparams_api.HParam(name) for name in values], metrics=metrics
                )
                hparams_api.hparams(values, trial_id=trial)
            self.root.flush()

    def record(self, kind: str, step: int, values: dict) -> None:
        """Appends one line to metrics.jsonl: {"kind": kind, "step": step, **values}."""
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
            self._jsonl.flush()

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in (*self.writers.values(), self.root):
            if writer is not None:
                writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def image_grid(images: np.ndarray, max_images: int = 16) -> np.ndarray:
    """Up to `max_images` images (pixels in [0, 255]) tiled in a square grid, scaled to [0, 1]."""
    images = np.clip(np.asarray(images[:max_images], np.float32) / 255.0, 0.0, 1.0)
    count, height, width, channels = images.shape
    side = math.ceil(math.sqrt(count))
    grid = np.ones((side * (height + 1) + 1, side * (width + 1) + 1, channels), np.float32)
    for i, image in enumerate(images):
        row, column = divmod(i, side)
        top, left = 1 + row * (height + 1), 1 + column * (width + 1)
        grid[top : top + height, left : left + width] = image
    return grid


def confusion_image(matrix: list[list[int]], cell: int = 12) -> np.ndarray:
    """A heat map of a confusion matrix: rows are labels, columns predictions.

    Each row is normalised by its count, so the diagonal shows per-class recall; white is 0,
    dark blue is 1.
    """
    counts = np.asarray(matrix, np.float32)
    recall = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    white, blue = np.array([1.0, 1.0, 1.0]), np.array([0.03, 0.19, 0.42])
    colours = white + recall[..., None] * (blue - white)
    return np.kron(colours, np.ones((cell, cell, 1))).astype(np.float32)


def confusion_text(matrix: list[list[int]], class_names: tuple[str, ...]) -> str:
    """A Markdown table of the confusion counts (rows: labels, columns: predictions)."""
    header = "| label \\\\ predicted | " + " | ".join(class_names) + " |"
    lines = [header, "|---" * (len(class_names) + 1) + "|"]
    for name, row in zip(class_names, matrix, strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def scatter_image(histogram: np.ndarray, cell: int = 4) -> np.ndarray:
    """A (predicted, true) histogram as an RGB image in [0, 1]: counts on a log scale from
    white to dark blue, the diagonal (predicted = true) in grey where no example falls."""
    counts = np.asarray(histogram, np.float64)
    shade = np.log1p(counts) / max(np.log1p(counts.max()), 1e-12)
    white, blue = np.array([1.0, 1.0, 1.0]), np.array([0.03, 0.19, 0.42])
    colours = white + shade[..., None] * (blue - white)
    bins = len(counts)
    diagonal = (np.arange(bins)[::-1], np.arange(bins))
    empty = counts[diagonal] == 0
    colours[diagonal[0][empty], diagonal[1][empty]] = 0.75
    return np.kron(colours, np.ones((cell, cell, 1))).astype(np.float32)


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; infinite for one a killed process left unfinished
    (not JSON), so that it is dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
