"""`tlloop.inspect_backbone` and `python -m tlloop.backbone`: a backbone's layer table and its
cut points, worded for the command line (`--backbone_layer=NAME`); the facts come from the
library's `tlloop.models.inspection`."""

from __future__ import annotations

from collections.abc import Callable


def inspect_backbone(
    source, *, safe_mode: bool = True, print_fn: Callable[[str], None] | None = print
) -> str:
    """The layer table and cut points of `source` (what --backbone accepts, or a
    keras.Model), printed with `print_fn` (None: not printed) and returned. Raises ConfigError
    for a source --backbone would refuse."""
    import keras

    from tlloop.models.backbones import load_source
    from tlloop.models.inspection import cut_points, layer_rows, shape_text
    from tlloop.phases import unused_layers

    model = source if isinstance(source, keras.Model) else load_source(source, safe_mode=safe_mode)
    name = source if isinstance(source, str) else model.name
    rows = layer_rows(model)
    lines = [
        f"{name}: {type(model).__name__} {model.name!r}, input "
        f"{shape_text(getattr(model, 'inputs', None))}, {model.count_params():,} parameters",
        "",
        f"{'-N':>5}  {'layer':<32} {'class':<24} {'output shape':<22} {'params':>10}  BatchNorm",
    ]
    lines += [
        f"{row.index:>5}  {row.name:<32.32} {row.kind:<24.24} "
        f"{row.output_shape:<22} {row.params:>10,}  {row.batch_norms}"
        for row in rows
    ]
    lines += ["", f"BatchNorm layers: {sum(row.batch_norm_count for row in rows)}"]
    unused = unused_layers(model)
    if unused:
        lines.append(
            "Held but not used by its forward pass (never trained): "
            + ", ".join(layer.name for layer in unused)
        )
    lines += ["", "Suggested --backbone_layer cut points:"]
    lines += [f"  --backbone_layer={n:<24} {why}" for n, why in cut_points(model)] or [
        "  none: use the whole model (a token sequence is pooled by tlloop)"
    ]
    text = "\n".join(lines)
    if print_fn is not None:
        print_fn(text)
    return text
