"""Client side of the exported SavedModel: load it, decode image files, say what it serves."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from tlloop.data.images import read_image


def served_inputs(directory: str) -> dict[str, list[str]]:
    """{signature name: its input names} of the SavedModel in `directory`, read from its
    saved_model.pb without loading it (loading a text model needs tensorflow_text's ops)."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(directory, "saved_model.pb"), "rb") as file:
        saved.ParseFromString(file.read())
    signatures = saved.meta_graphs[0].signature_def if saved.meta_graphs else {}
    return {name: sorted(signature.inputs) for name, signature in signatures.items()}


class Predictor:
    """A tlloop SavedModel (see tlloop.export) ready to rank classes for image files."""

    def __init__(self, directory: str) -> None:
        loaded = tf.saved_model.load(directory)
        self._serve = loaded.signatures["serving_uint8"]
        names = loaded.signatures["class_names"]()["class_names"].numpy()
        self.class_names = tuple(name.decode() for name in names)
        self._loaded = loaded  # the signatures need the object alive
        outputs = set(self._serve.structured_outputs)
        #: What the model serves: "classification", "multilabel" or "regression".
        self.kind = (
            "regression"
            if "predictions" in outputs
            else "multilabel"
            if "predicted" in outputs
            else "classification"
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (batch, classes) for uint8 images (batch, height, width, 3)."""
        return self._serve(images=tf.constant(images, tf.uint8))["probabilities"].numpy()

    def describe(self, path: str, k: int) -> list[str]:
        """What the model says of the image file `path`, as printable fields: the `k` most
        probable classes (classification), the labels over the threshold then the `k` most
        probable labels (multi-label), or each target's value (regression). One call of the
        model. Raises ConfigError naming the file if it cannot be read or decoded."""
        served = self._serve(images=tf.constant(read_image(path)[None], tf.uint8))
        if self.kind == "regression":
            values = served["predictions"].numpy().reshape(-1)
            names = self.class_names or tuple(f"target{i}" for i in range(len(values)))
            return [f"{name} {value:.6g}" for name, value in zip(names, values, strict=True)]
        probabilities = served["probabilities"].numpy()[0]
        ranked = [f"{name} {p:.4f}" for name, p in self._ranked(probabilities, k)]
        if self.kind == "multilabel":
            return [f"labels={served['labels'].numpy()[0].decode()}", *ranked]
        return ranked

    def top_k(self, path: str, k: int) -> list[tuple[str, float]]:
        """The `k` most probable (class name, probability) for the image file `path`, most
        probable first. Raises ConfigError naming the file if it cannot be read or decoded."""
        return self._ranked(self.probabilities(read_image(path)[None])[0], k)

    def _ranked(self, probabilities: np.ndarray, k: int) -> list[tuple[str, float]]:
        order = np.argsort(-probabilities, kind="stable")[:k]
        return [(self.class_names[i], float(probabilities[i])) for i in order]
