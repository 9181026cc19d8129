"""`python -m tlloop.rank`'s candidates: --candidates entries -> backbones built with the
run's other model flags, for the library's `tlloop.rank`."""

from __future__ import annotations

from collections.abc import Sequence

from tlloop.errors import ConfigError


def candidate_specs(candidates: Sequence[str], backbone: str, weights: str) -> list[tuple]:
    """(name, source, weights) per --candidates entry (or --backbone alone)."""
    specs = []
    for entry in candidates or [backbone]:
        source, _, own = entry.partition("@")
        if not source:
            raise ConfigError(
                "candidates",
                ",".join(candidates),
                f"an empty backbone in {entry!r}",
                "BACKBONE or BACKBONE@WEIGHTS, comma-separated",
            )
        specs.append((entry, source, own if "@" in entry else weights))
    if len({name for name, _, _ in specs}) != len(specs):
        raise ConfigError(
            "candidates", ",".join(candidates), "a candidate is named twice", "distinct entries"
        )
    return specs


def candidate_backbones(specs: Sequence[tuple], model_config) -> dict:
    """{name: backbone} for `candidate_specs`' entries, each built as --backbone is with the
    other model flags of `model_config` (a ModelConfig). Raises ConfigError naming the flag."""
    from tlloop.models.backbones import build_backbone

    return {
        name: build_backbone(
            source,
            weights,
            model_config.image_size,
            safe_mode=not model_config.unsafe_deserialization,
            layer=model_config.backbone_layer,
            channels=model_config.backbone_channels,
            value_range=model_config.backbone_range,
        )
        for name, source, weights in specs
    }
