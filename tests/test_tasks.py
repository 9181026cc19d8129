"""Multi-label and regression tasks through the library API: metrics against numpy on the same
predictions, learning on generated sets where the answer is a known function of the image, and
exports that serve the task's outputs."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

import tlloop
from tlloop.data.examples import InMemoryExamples

SIZE, LABELS = 12, 3
NAMES = ("red", "green", "blue")


def _images(count: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng, rng.uniform(0, 120, (count, SIZE, SIZE, 3)).astype("float32")


def _multilabel_data(count: int, seed: int):
    """Label j is on when colour channel j is brightened: separable, several labels at once."""
    rng, images = _images(count, seed)
    labels = (rng.uniform(size=(count, LABELS)) < 0.4).astype("float32")
    images += 100.0 * labels[:, None, None, :]
    return images, labels


def _regression_data(count: int, seed: int):
    """Two targets in very different units, each a known function of one channel's mean."""
    rng, images = _images(count, seed)
    images[..., :2] += rng.uniform(0, 100, (count, 1, 1, 2))
    red, green = images[..., 0].mean(axis=(1, 2)), images[..., 1].mean(axis=(1, 2))
    return images, np.stack([1000.0 + 20.0 * red, 0.01 * green - 1.0], axis=1).astype("float32")


def _backbone() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, name="conv")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    return keras.Model(inputs, keras.layers.ReLU()(x), name="backbone")


def _phases(head: int, finetune: int, lr: float = 3e-2):
    return [
        tlloop.Phase("head", head, lr, tlloop.Unfreeze("none")),
        tlloop.Phase("finetune", finetune, lr / 3, tlloop.Unfreeze("all")),
    ]


def _events(workdir: str) -> event_accumulator.EventAccumulator:
    events = event_accumulator.EventAccumulator(
        os.path.join(workdir, "tensorboard", "eval"), size_guidance={"tensors": 0, "images": 0}
    )
    events.Reload()
    return events


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _f1(tp, fp, fn):
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1e-12), 0.0)


def _pr_auc(probabilities, labels, thresholds):
    """Area under each label's precision-recall curve, interpolated between thresholds as
    Davis & Goadrich (2006) do (precision linear in the true positives), then the mean."""
    over = probabilities[None] > np.asarray(thresholds)[:, None, None]  # (T, N, L)
    tp = (over * labels[None]).sum(axis=1)
    fp = (over * (1 - labels[None])).sum(axis=1)
    fn = ((~over) * labels[None]).sum(axis=1)
    p = tp + fp
    areas = []
    for j in range(labels.shape[1]):
        area = 0.0
        for t in range(len(thresholds) - 1):
            d_tp, d_p = tp[t, j] - tp[t + 1, j], p[t, j] - p[t + 1, j]
            slope = d_tp / d_p if d_p > 0 else 0.0
            intercept = tp[t + 1, j] - slope * p[t + 1, j]
            ratio = p[t, j] / p[t + 1, j] if p[t, j] > 0 and p[t + 1, j] > 0 else 1.0
            positives = tp[t + 1, j] + fn[t + 1, j]
            if positives > 0:
                area += slope * (d_tp + intercept * np.log(ratio)) / positives
        areas.append(area)
    return float(np.mean(areas))


def test_multilabel_learns_its_metrics_match_numpy_and_the_export_serves_label_names(tmp_path):
    train, evaluation = _multilabel_data(96, 1), _multilabel_data(21, 2)
    task = tlloop.MultiLabel(class_names=NAMES, threshold=0.5)
    backbone = _backbone()
    model = tlloop.TransferModel(backbone, tlloop.classification_head(backbone, LABELS))
    before = tlloop.evaluate(model, evaluation, task=task, batch_size=8)
    trainer = tlloop.Trainer(
        str(tmp_path),
        phases=_phases(5, 1, lr=1e-1),
        task=task,
        checkpoint=tlloop.CheckpointConfig(best_metric=tlloop.BestMetric.parse("macro_f1")),
        logging=tlloop.LoggingConfig(quiet=True),
    )
    results = trainer.fit(model, train, evaluation, batch_size=16)
    assert results.best["metric"] == "macro_f1:max"
    after = tlloop.evaluate(model, evaluation, task=task, batch_size=8)
    assert after["examples"] == 21
    assert after["loss"] < 0.7 * before["loss"]
    # All-positive predictions: the best constant for micro-F1 (all-negative scores 0).
    positives = evaluation[1].mean()
    assert after["micro_f1"] > max(0.0, 2 * positives / (1 + positives)) + 0.15

    # Every reported metric from the same predictions, in numpy (the padded last batch of 5
    # examples must count once).
    logits = tlloop.predict(model, evaluation[0])
    probabilities, labels = _sigmoid(logits), evaluation[1]
    predicted = probabilities > 0.5
    tp = (predicted * labels).sum(0)
    fp = (predicted * (1 - labels)).sum(0)
    fn = (~predicted * labels).sum(0)
    assert after["micro_f1"] == pytest.approx(float(_f1(tp.sum(), fp.sum(), fn.sum())), abs=1e-6)
    assert after["macro_f1"] == pytest.approx(float(_f1(tp, fp, fn).mean()), abs=1e-6)
    thresholds = keras.metrics.AUC(num_thresholds=200).thresholds
    assert after["pr_auc"] == pytest.approx(_pr_auc(probabilities, labels, thresholds), abs=1e-6)
    bce = -(labels * np.log(probabilities) + (1 - labels) * np.log(1 - probabilities))
    assert after["loss"] == pytest.approx(float(bce.mean()), abs=1e-6)

    # TensorBoard: a PR curve per label after each evaluation, read by TensorBoard's reader;
    # at the lowest threshold every example is predicted positive.
    events = _events(str(tmp_path))
    for j, name in enumerate(NAMES):
        curves = events.Tensors(f"{name}/pr_curves")
        assert len(curves) == 6  # one per epoch
        tp, fp, tn, fn, precision, recall = tf.make_ndarray(curves[-1].tensor_proto)
        assert (tp[0], fp[0], tn[0], fn[0]) == (labels[:, j].sum(), 21 - labels[:, j].sum(), 0, 0)
        assert recall[0] == 1.0 and np.all(np.diff(tp) <= 0)
        assert precision[0] == pytest.approx(labels[:, j].mean())
    assert events.SummaryMetadata("red/pr_curves").plugin_data.plugin_name == "pr_curves"

    served = tf.saved_model.load(results.export["saved_model"]).signatures["serving_default"]
    out = served(images=tf.constant(evaluation[0][:6]))
    np.testing.assert_allclose(out["probabilities"].numpy(), probabilities[:6], atol=1e-5)
    np.testing.assert_array_equal(out["predicted"].numpy(), predicted[:6].astype(int))
    expected = [";".join(n for n, on in zip(NAMES, row, strict=True) if on) for row in predicted]
    assert [s.decode() for s in out["labels"].numpy()] == expected[:6]


def test_multilabel_training_loss_weights_positives_and_smooths_labels():
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]], np.float32)
    weights = tlloop.positive_weights(labels)
    np.testing.assert_allclose(weights, [1 / 3, 3.0, 4.0])  # negatives / positives; none: /1
    # class_weights="auto" takes the same weights from the training examples when a fit starts.
    examples = InMemoryExamples(np.zeros((4, 2), np.float32), labels)
    auto = tlloop.MultiLabel(3, class_weights="auto").prepared(examples)
    np.testing.assert_array_equal(auto.class_weights, weights)
    logits = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    task = tlloop.MultiLabel(3, class_weights=weights, label_smoothing=0.2)
    smoothed = labels * 0.8 + 0.1
    p = _sigmoid(logits)
    expected = -(weights * smoothed * np.log(p) + (1 - smoothed) * np.log(1 - p)).mean(-1)
    np.testing.assert_allclose(task.train_loss(labels, logits).numpy(), expected, rtol=1e-5)
    # Evaluation reports the plain loss.
    plain = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean(-1)
    np.testing.assert_allclose(task.eval_loss(labels, logits).numpy(), plain, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_labels": 0}, "num_labels=0"),
        ({"num_labels": 3, "threshold": 1.0}, "threshold=1.0"),
        (
            {"num_labels": 3, "class_weights": "balanced"},
            "class_weights='balanced': accepted: 'auto'",
        ),
        ({"num_labels": 3, "class_weights": [1.0, 2.0]}, "class_weights: shape"),
        ({"class_names": ["a"], "num_labels": 2}, "class_names: 1 names"),
    ],
)
def test_multilabel_refuses_bad_arguments_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tlloop.MultiLabel(**kwargs)


def test_regression_beats_the_constant_baseline_and_exports_original_units(tmp_path):
    train, evaluation = _regression_data(96, 1), _regression_data(32, 2)
    task = tlloop.Regression(2, loss="mse", targets=train[1])
    backbone = _backbone()
    model = tlloop.TransferModel(backbone, tlloop.regression_head(backbone, task))
    trainer = tlloop.Trainer(
        str(tmp_path),
        phases=_phases(8, 1, lr=3e-1),
        task=task,
        checkpoint=tlloop.CheckpointConfig(best_metric=tlloop.BestMetric.parse("loss")),
        logging=tlloop.LoggingConfig(quiet=True),
    )
    results = trainer.fit(model, train, evaluation, batch_size=16)
    after = tlloop.evaluate(model, evaluation, task=task, batch_size=8)
    targets = evaluation[1]
    constant = np.sqrt(np.mean((targets - train[1].mean(0)) ** 2))
    assert after["root_mean_squared_error"] < 0.5 * constant
    # The metrics in the targets' units and the loss standardised, from the same predictions.
    predictions = tlloop.predict(model, evaluation[0]).astype(np.float64)
    error = targets - predictions
    assert after["root_mean_squared_error"] == pytest.approx(np.sqrt(np.mean(error**2)), rel=1e-5)
    assert after["mean_absolute_error"] == pytest.approx(np.mean(np.abs(error)), rel=1e-5)
    std = train[1].std(0)
    assert after["loss"] == pytest.approx(np.mean((error / std) ** 2), rel=1e-4)
    r2 = 1 - (error**2).sum(0) / ((targets - targets.mean(0)) ** 2).sum(0)
    assert after["r2"] == pytest.approx(float(r2.mean()), abs=1e-4)
    # TensorBoard: a predicted-vs-true scatter per output after each evaluation.
    events = _events(str(tmp_path))
    images = events.Tensors("predicted_vs_true/1")
    assert len(images) == 9
    width, height, png = tf.make_ndarray(images[-1].tensor_proto)
    assert (int(width), int(height)) == (192, 192) and png.startswith(b"\x89PNG")
    assert events.SummaryMetadata("predicted_vs_true/1").plugin_data.plugin_name == "images"
    # The export predicts in the targets' units: about 1000 + 20 x red, and -1 + 0.01 x green.
    served = tf.saved_model.load(results.export["saved_model"]).signatures["serving_default"]
    out = served(images=tf.constant(evaluation[0]))["predictions"].numpy()
    np.testing.assert_allclose(out, predictions, rtol=1e-5, atol=1e-5)
    assert np.all(np.abs(out.mean(0) - targets.mean(0)) < 0.5 * targets.std(0))
    assert 1000 < out[:, 0].mean() < 4000 and -1 < out[:, 1].mean() < 1


def test_regression_losses_compare_standardised_values():
    targets = np.array([[0.0, 100.0], [2.0, 300.0], [4.0, 500.0]], np.float32)
    predictions = np.array([[1.0, 150.0], [2.0, 100.0], [3.0, 900.0]], np.float32)
    std = targets.std(0)
    z = (targets - predictions) / std
    for loss, expected in (
        ("mse", (z**2).mean(-1)),
        ("mae", np.abs(z).mean(-1)),
        ("huber", np.where(np.abs(z) <= 1, 0.5 * z**2, np.abs(z) - 0.5).mean(-1)),
    ):
        task = tlloop.Regression(2, loss=loss, targets=targets)
        np.testing.assert_allclose(task.eval_loss(targets, predictions), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="loss='l3'"):
        tlloop.Regression(1, loss="l3")
    with pytest.raises(ValueError, match="targets: shape"):
        tlloop.Regression(3, targets=targets)


def test_regression_fit_histogram_counts_each_weighted_example_once_on_the_diagonal():
    from tlloop.tasks import RegressionFit

    fit = RegressionFit(mean=[10.0], std=[2.0], bins=8, span=2.0)
    targets = np.array([[6.0], [8.0], [10.0], [12.0], [30.0]], np.float32)
    fit.update_state(targets, targets, sample_weight=np.array([1, 1, 1, 1, 0], np.float32))
    histogram = np.asarray(fit.histogram)[0]
    assert histogram.sum() == 4  # the padding example (weight 0) counts for nothing
    rows, columns = np.nonzero(histogram)
    np.testing.assert_array_equal(rows, 7 - columns)  # predicted = true: the diagonal
    assert float(fit.result()) == pytest.approx(1.0)


def test_mixing_is_refused_for_regression_and_for_inputs_that_are_not_images(tmp_path):
    train = _regression_data(16, 1)
    task = tlloop.Regression(2, targets=train[1])
    backbone = _backbone()
    model = tlloop.TransferModel(backbone, tlloop.regression_head(backbone, task))
    mixing = tlloop.TrainingConfig(mixup=0.2)
    trainer = tlloop.Trainer(str(tmp_path / "r"), phases=_phases(1, 0), task=task, training=mixing)
    with pytest.raises(ValueError, match=r"^training.mixup=0.2: a Regression task's loss of"):
        trainer.fit(model, train, train)
    texts = (np.array(["a b", "c d"] * 4, dtype=object), np.array([0, 1] * 4, np.int32))
    classify = tlloop.Trainer(
        str(tmp_path / "t"), phases=_phases(1, 0), task=tlloop.Classification(2), training=mixing
    )
    with pytest.raises(ValueError, match=r"^training.mixup=0.2: the inputs are TensorSpec"):
        classify.fit(model, texts, texts)
    assert not (tmp_path / "r").exists() and not (tmp_path / "t").exists()  # nothing written


@pytest.mark.parametrize(
    ("kind", "best"),
    [("multilabel", "micro_f1:max"), ("regression", "root_mean_squared_error:min")],
)
def test_the_default_best_metric_is_the_tasks_own_and_results_name_it(tmp_path, kind, best):
    # No best metric given: "auto" must not mean accuracy, which these tasks do not report.
    if kind == "multilabel":
        train = _multilabel_data(16, 1)
        task = tlloop.MultiLabel(LABELS)
        head = tlloop.classification_head
    else:
        train = _regression_data(16, 1)
        task = tlloop.Regression(2, targets=train[1])
        head = tlloop.regression_head
    backbone = _backbone()
    model = tlloop.TransferModel(backbone, head(backbone, LABELS if kind == "multilabel" else task))
    trainer = tlloop.Trainer(
        str(tmp_path), phases=_phases(1, 0), task=task, logging=tlloop.LoggingConfig(quiet=True)
    )
    results = trainer.fit(model, train, train, batch_size=8, export=False)
    assert results.best["metric"] == best
    with open(tmp_path / "results.json") as file:
        assert json.load(file)["best"]["metric"] == best
