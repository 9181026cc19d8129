"""What a backbone holds, layer by layer, and where it can be cut: the facts
`tlloop.inspect_backbone` (and `python -m tlloop.backbone`) print as a table."""

from __future__ import annotations

import dataclasses
import math

import keras

from tlloop.models import walk


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One top-level layer: its `index` from the end (-1 the last), name, class, output shape
    (text), parameter count, and its BatchNormalization layers ("yes": it is one; "N inside")."""

    index: int
    name: str
    kind: str
    output_shape: str
    params: int
    batch_norms: str
    batch_norm_count: int


def layer_rows(model: keras.Model) -> list[LayerRow]:
    """A LayerRow per top-level layer of `model`, in order."""
    layers = model.layers
    rows = []
    for position, layer in enumerate(layers):
        norms = walk.batch_norms(layer)
        mark = "" if not norms else ("yes" if norms == [layer] else f"{len(norms)} inside")
        rows.append(
            LayerRow(
                position - len(layers),
                layer.name,
                type(layer).__name__,
                shape_text(_output(layer)),
                _params(layer),
                mark,
                len(norms),
            )
        )
    return rows


def cut_points(model: keras.Model) -> list[tuple[str, str]]:
    """(layer name, why) of good places to cut `model` (load_backbone's `layer`): the features
    a classifier's last Dense reads, the last feature map, and the last layer of each
    feature-map resolution."""
    layers = model.layers
    points: dict[str, str] = {}
    denses = [layer for layer in layers if type(layer).__name__ == "Dense"]
    if denses and layers.index(denses[-1]) >= len(layers) - 2:
        feeder = _feeder(denses[-1])
        if feeder is not None and _rank(feeder) == 2:
            points[feeder.name] = f"the features the classifier {denses[-1].name!r} reads"
    inner = [layer for layer in layers if type(layer).__name__ != "InputLayer"]
    maps = [layer for layer in inner if _rank(layer) == 4 and _params(layer) == 0]
    maps = maps or [layer for layer in inner if _rank(layer) == 4]
    if maps:
        points.setdefault(maps[-1].name, "the last feature map")
        seen = {tuple(_output(maps[-1]).shape[1:3])}
        for layer in reversed(maps):
            resolution = tuple(_output(layer).shape[1:3])
            if resolution not in seen and None not in resolution:
                seen.add(resolution)
                points.setdefault(layer.name, f"the end of the {resolution} stage")
    return list(points.items())


def shape_text(tensors) -> str:
    """The shape of a tensor (or of each in a list) as text; "?" when unknown."""
    if tensors is None:
        return "?"
    if isinstance(tensors, (list, tuple)):
        shapes = [shape_text(t) for t in tensors]
        return shapes[0] if len(shapes) == 1 else "[" + ", ".join(shapes) + "]"
    return str(tuple(tensors.shape)) if hasattr(tensors, "shape") else "?"


def _output(layer):
    try:
        return layer.output
    except (AttributeError, ValueError):  # a layer called more than once, or never
        return None


def _rank(layer) -> int:
    output = _output(layer)
    return len(output.shape) if hasattr(output, "shape") else 0


def _feeder(layer):
    inputs = getattr(layer, "input", None)
    history = getattr(inputs, "_keras_history", None)
    return history.operation if history is not None else None


def _params(layer) -> int:
    return sum(math.prod(w.shape) for w in layer.weights)
