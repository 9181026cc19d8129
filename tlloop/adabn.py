"""AdaBN (Li, Wang, Shi, Liu, Hou, 2016, "Revisiting Batch Normalization for Practical Domain
Adaptation"): every BatchNormalization of the backbone takes the statistics of the target data.

`bn_mode="adapt"` (on any phase; the command line's sets it on both of its phases) runs, once
before the first phase, passes of the backbone in inference mode over the training examples
(no augmentation, Dropout off; in memory or streamed), recording what each BatchNormalization
at any depth receives: per channel, the count, mean and sum of squared deviations of each
batch, merged in float64 (Chan et al.'s pairwise update), so the result is the exact
population mean and (biased, as BatchNormalization's own batch statistics) variance over every
example and position. These replace the layer's moving mean and variance. A layer's inputs
change once the layers before it are adapted, so passes repeat until no statistic moves: each
layer then holds the statistics of its inputs as the adapted network computes them (a chain
of L BatchNorm layers takes L passes, at most). Every phase then runs them frozen, exactly as
`bn_mode="frozen"`.

The passes run on the host over the whole training set, outside any replica: the statistics are
those of the global data on 1 or N replicas (and the same on every worker of a cluster, which
each make the same passes). Assigning them in cross-replica context updates every replica's copy.
The run's checkpoint holds the adapted statistics (with the model) and a `bn_adapt` record (done,
and per layer how far the statistics moved): a resumed run reads it and does not adapt again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np
import tensorflow as tf
from absl import logging

from tlloop.data.examples import Examples
from tlloop.errors import ConfigError
from tlloop.models.walk import batch_norms

MODE = "adapt"
# Per layer, in the checkpoint's `moved` matrix and results.json: how far its statistics moved,
# and the count of values (examples x positions) they came from.
MOVED = ("mean_shift", "mean_change", "variance_change")
RECORDED = ("count", *MOVED)


@dataclasses.dataclass
class _Moments:
    """Running float64 count, mean and sum of squared deviations of one layer's channels."""

    count: float = 0.0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    def merge(self, count: float, mean: np.ndarray, m2: np.ndarray) -> None:
        if count == 0:
            return
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * count / total)
        self.count = total


def _batch_moments(layer, inputs, mask):
    """(count, mean, sum of squared deviations) per channel of what `layer` received, float32."""
    x = tf.cast(inputs, tf.float32)
    axis = layer.axis % x.shape.rank
    axes = [i for i in range(x.shape.rank) if i != axis]
    if mask is None:
        weights = tf.ones_like(x)
    else:  # as BatchNormalization's own moments: the mask covers every axis but the last
        weights = tf.broadcast_to(tf.cast(tf.expand_dims(mask, -1), tf.float32), tf.shape(x))
    count = tf.reduce_sum(weights, axes)
    mean = tf.reduce_sum(weights * x, axes) / tf.maximum(count, 1.0)
    shape = [1] * x.shape.rank
    shape[axis] = -1
    m2 = tf.reduce_sum(weights * tf.square(x - tf.reshape(mean, shape)), axes)
    return tf.reduce_max(count), mean, m2


@contextlib.contextmanager
def _recording(layers: list):
    """While open, each layer's call also appends its batch moments to `records[i]` (a list
    per layer, filled while a tf.function traces); the layers' calls are put back after."""
    records: list[list] = [[] for _ in layers]

    def recorder(index, layer, original):
        def call(inputs, *args, **kwargs):
            mask = kwargs.get("mask")
            records[index].append(_batch_moments(layer, inputs, mask))
            return original(inputs, *args, **kwargs)

        return call

    patched = []
    try:
        for index, layer in enumerate(layers):
            original = layer.call
            layer.call = recorder(index, layer, original)
            patched.append(layer)
        yield records
    finally:
        for layer in patched:
            del layer.call  # the class's own call again


# A pass changes a layer's statistics when its upstream statistics changed: stopped when no
# mean or variance moves by more than this (relative to its channels' scale).
SETTLED = 1e-6


def statistics_passes(backbone, examples: Examples, batch_size: int = 64):
    """Yields, for each pass of the backbone in inference mode over every example of
    `examples`, per BatchNormalization (in `batch_norms` order) the float64 (mean, variance,
    count) of what it received over every example and position; (None, None, 0) for a layer
    the pass never calls. Compiled once: statistics assigned between passes take effect in the
    next."""
    layers = batch_norms(backbone)
    with _recording(layers) as records:

        @tf.function(reduce_retracing=True)
        def moments_of(inputs):
            for record in records:
                record.clear()  # a retrace records afresh
            backbone(inputs, training=False)
            # A layer called twice per pass (shared) has two records per batch.
            return [list(record) for record in records]

        while True:
            moments = [_Moments() for _ in layers]
            for inputs, _ in examples.ordered().batch(batch_size):
                for total, calls in zip(moments, moments_of(inputs), strict=True):
                    for count, mean, m2 in calls:
                        total.merge(float(count), np.float64(mean), np.float64(m2))
            yield [
                (m.mean, m.m2 / m.count, m.count) if m.count else (None, None, 0.0) for m in moments
            ]


def adapt(backbone, examples: Examples, batch_size: int = 64) -> dict:
    """Sets every BatchNormalization of `backbone` to the population mean and variance of its
    inputs over `examples`, as the adapted network computes them: passes (see
    `statistics_passes`) repeat until none moves, as a layer's inputs change when the layers
    before it are adapted (one pass per BatchNorm depth, plus one that finds nothing moved; at
    most one per BatchNorm layer). Nothing else changes. Returns {"passes": passes made,
    "layers": per layer its name, the count of values (examples x positions), and how far
    its statistics moved: `mean_shift` (the RMS over channels of the mean's change in old
    standard deviations), `mean_change` and `variance_change` (||new - old|| / ||old||)}."""
    layers = batch_norms(backbone)
    old = [
        (np.float64(layer.moving_mean.numpy()), np.float64(layer.moving_variance.numpy()))
        for layer in layers
    ]
    found, passes = None, 0
    generator = statistics_passes(backbone, examples, batch_size)
    for found in generator:
        passes += 1
        moved = False
        for layer, (mean, variance, _) in zip(layers, found, strict=True):
            if mean is None:  # held but never called: nothing to adapt to
                continue
            current = np.float64(layer.moving_mean.numpy())
            current_variance = np.float64(layer.moving_variance.numpy())
            scale = np.sqrt(current_variance + layer.epsilon)
            if (
                passes == 1
                or np.max(np.abs(mean - current) / scale) > SETTLED
                or np.max(np.abs(variance - current_variance) / (current_variance + layer.epsilon))
                > SETTLED
            ):
                moved = True
                layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
                layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
        if not moved or passes >= len(layers):  # after L passes every depth is exact
            break
    generator.close()  # the layers' own calls again
    report = []
    for layer, (old_mean, old_variance), (mean, variance, count) in zip(
        layers, old, found, strict=True
    ):
        row = {"layer": layer.path if hasattr(layer, "path") else layer.name, "count": count}
        if mean is None:
            report.append({**row, **dict.fromkeys(MOVED, 0.0)})
            continue
        mean = np.float64(layer.moving_mean.numpy())
        variance = np.float64(layer.moving_variance.numpy())
        shift = (mean - old_mean) / np.sqrt(old_variance + layer.epsilon)
        report.append(
            {
                **row,
                "mean_shift": float(np.sqrt(np.mean(shift**2))),
                "mean_change": _relative(mean, old_mean),
                "variance_change": _relative(variance, old_variance),
            }
        )
    return {"passes": passes, "layers": report}


def _relative(new: np.ndarray, old: np.ndarray) -> float:
    return float(np.linalg.norm(new - old) / max(np.linalg.norm(old), 1e-12))


class Record(tf.Module):
    """What the checkpoint keeps of the adaptation: done (0/1), the passes it made, and per
    layer the `MOVED` numbers and the count (float64 [layers, 4], columns `RECORDED`)."""

    def __init__(self, layers: int) -> None:
        super().__init__(name="bn_adapt")
        self.done = tf.Variable(0, dtype=tf.int64, trainable=False, name="done")
        self.passes = tf.Variable(0, dtype=tf.int64, trainable=False, name="passes")
        self.moved = tf.Variable(
            tf.zeros((layers, len(RECORDED)), tf.float64), trainable=False, name="moved"
        )


def asked(plan) -> bool:
    """True if any phase of `plan` (phases.PlannedPhase) has bn_mode "adapt"."""
    return any(phase.config.bn_mode == MODE for phase in plan)


def before_run(
    backbone, train: Examples, plan, state: tf.Module, resume_from: str | None, *, batch_size: int
) -> dict:
    """AdaBN before a run's first phase, if a phase of `plan` asks for it: adapts `backbone`
    on `train` and records it on `state` (the run's checkpointed RunState, as `bn_adapt`), or,
    resuming from a checkpoint that records it, leaves the statistics to that checkpoint's
    restore. Logs each layer (and to the default summary writer, at step 0, on adaptation).
    Returns {"bn_adapt": per-layer report, with "resumed"} or {} when not asked. Raises
    ConfigError when resuming a checkpoint of a run that did not adapt."""
    if not asked(plan):
        return {}
    layers = batch_norms(backbone)
    record = Record(len(layers))
    state.bn_adapt = record  # tracked: every checkpoint of the run holds it
    names = [layer.path if hasattr(layer, "path") else layer.name for layer in layers]
    if resume_from:
        key = "state/bn_adapt/{}/.ATTRIBUTES/VARIABLE_VALUE"
        try:
            done, passes, moved = (
                tf.train.load_variable(resume_from, key.format(name))
                for name in ("done", "passes", "moved")
            )
        except (tf.errors.OpError, ValueError):
            done, passes, moved = 0, 0, None
        if not done or moved is None or moved.shape != (len(layers), len(RECORDED)):
            raise ConfigError(
                "bn_mode",
                "adapt",
                f"checkpoint {resume_from!r} is of a run that did not adapt its BatchNorm "
                "statistics",
                "the bn_mode that run used, or $overwrite to start afresh",
            )
        logging.info("bn_mode=adapt: done before the first phase (from the checkpoint)")
        report = [
            {"layer": name, **{key: float(value) for key, value in zip(RECORDED, row, strict=True)}}
            for name, row in zip(names, moved, strict=True)
        ]
        return {"bn_adapt": {"resumed": True, "passes": int(passes), "layers": report}}
    adapted = adapt(backbone, train, batch_size)
    report, passes = adapted["layers"], adapted["passes"]
    record.moved.assign(np.array([[row[k] for k in RECORDED] for row in report], np.float64))
    record.passes.assign(passes)
    record.done.assign(1)
    lines = [
        f"bn_mode=adapt: {len(report)} BatchNorm layers took the statistics of {train.size} "
        f"training examples in {passes} passes (mean moved by, in old standard deviations; "
        "relative changes)"
    ]
    lines += [
        f"  {row['layer']}: mean {row['mean_shift']:.3g} std (rel. {row['mean_change']:.3g}), "
        f"variance rel. {row['variance_change']:.3g}"
        + ("" if row["count"] else " (never called: unchanged)")
        for row in report
    ]
    logging.info("%s", "\n".join(lines))
    table = [
        "| layer | mean shift (old std) | mean change | variance change |",
        "|---|---|---|---|",
    ]
    for row in report:
        table.append(
            f"| {row['layer']} | {row['mean_shift']:.4g} | {row['mean_change']:.4g} | "
            f"{row['variance_change']:.4g} |"
        )
        for key in MOVED:
            tf.summary.scalar(f"bn_adapt/{key}/{row['layer']}", row[key], step=0)
    tf.summary.text("bn_adapt", "\n".join(table), step=0)
    if not math.isfinite(sum(row["mean_shift"] for row in report)):
        logging.warning("bn_mode=adapt: a layer's old variance was 0 or not finite")
    return {"bn_adapt": {"resumed": False, "passes": passes, "layers": report}}
