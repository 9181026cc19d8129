"""Entry point: `python -m tlloop.backbone SOURCE [--unsafe_deserialization]`.

Prints what `--backbone=SOURCE` would load, before any cut or adapter: its input, each
top-level layer (its -N index from the end for --backbone_layer, name, class, output shape,
parameters, BatchNorm layers inside at any depth), the layers with weights it holds but its
forward pass never uses, and suggested --backbone_layer cut points. SOURCE is
anything --backbone accepts (a model file, a KerasHub preset, a keras.applications name).
`inspect_backbone` is the same in Python. Bad input: one line naming SOURCE, exit 2.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable

from absl import app, flags

from tlloop.cli.flags import flag_line
from tlloop.config import ConfigError

FLAGS = flags.FLAGS


def inspect_backbone(
    source, *, safe_mode: bool = True, print_fn: Callable[[str], None] | None = print
) -> str:
    """The layer table and cut points of `source` (what --backbone accepts, or a
    keras.Model), printed with `print_fn` (None: not printed) and returned. Raises ConfigError
    for a source --backbone would refuse."""
    import keras

    from tlloop.models import walk
    from tlloop.models.backbones import load_source

    model = source if isinstance(source, keras.Model) else load_source(source, safe_mode=safe_mode)
    name = source if isinstance(source, str) else model.name
    layers = model.layers
    lines = [
        f"{name}: {type(model).__name__} {model.name!r}, input "
        f"{_shape(getattr(model, 'inputs', None))}, {model.count_params():,} parameters",
        "",
        f"{'-N':>5}  {'layer':<32} {'class':<24} {'output shape':<22} {'params':>10}  BatchNorm",
    ]
    norms_total = 0
    for position, layer in enumerate(layers):
        norms = walk.batch_norms(layer)
        norms_total += len(norms)
        mark = "" if not norms else ("yes" if norms == [layer] else f"{len(norms)} inside")
        lines.append(
            f"{position - len(layers):>5}  {layer.name:<32.32} {type(layer).__name__:<24.24} "
            f"{_shape(_output(layer)):<22} {_params(layer):>10,}  {mark}"
        )
    lines += ["", f"BatchNorm layers: {norms_total}"]
    unused = _unused(model)
    if unused:
        lines.append(
            "Held but not used by its forward pass (never trained): "
            + ", ".join(layer.name for layer in unused)
        )
    lines += ["", "Suggested --backbone_layer cut points:"]
    suggestions = cut_points(model)
    lines += [f"  --backbone_layer={n:<24} {why}" for n, why in suggestions] or [
        "  none: use the whole model (a token sequence is pooled by tlloop)"
    ]
    text = "\n".join(lines)
    if print_fn is not None:
        print_fn(text)
    return text


def cut_points(model) -> list[tuple[str, str]]:
    """(layer name, why) of good --backbone_layer cuts: the features a classifier's last Dense
    reads, the last feature map, and the last layer of each feature-map resolution."""
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


def _shape(tensors) -> str:
    if tensors is None:
        return "?"
    if isinstance(tensors, (list, tuple)):
        shapes = [_shape(t) for t in tensors]
        return shapes[0] if len(shapes) == 1 else "[" + ", ".join(shapes) + "]"
    return str(tuple(tensors.shape)) if hasattr(tensors, "shape") else "?"


def _params(layer) -> int:
    return sum(math.prod(w.shape) for w in layer.weights)


def _unused(model) -> list:
    from tlloop.phases import unused_layers

    return unused_layers(model)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(
            "tlloop: error: expected one SOURCE (a model file, a KerasHub preset or a "
            "keras.applications name): python -m tlloop.backbone SOURCE",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        inspect_backbone(argv[1], safe_mode=not FLAGS.unsafe_deserialization)
    except ConfigError as error:
        print(f"tlloop: error: {flag_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # Defined here, not at import: `import tlloop` imports this module for inspect_backbone,
    # and tlloop.run defines its own --unsafe_deserialization.
    flags.DEFINE_bool(
        "unsafe_deserialization", False, "Allow a model file to run code when loaded (trusted)."
    )
    app.run(main)
