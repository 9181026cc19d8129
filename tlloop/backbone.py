"""Entry point: `python -m tlloop.backbone SOURCE [--unsafe_deserialization]`.

Prints what `--backbone=SOURCE` would load, before any cut or adapter: its input, each
top-level layer (its -N index from the end for --backbone_layer, name, class, output shape,
parameters, BatchNorm layers inside at any depth), the layers with weights it holds but its
forward pass never uses, and suggested --backbone_layer cut points. SOURCE is
anything --backbone accepts (a model file, a KerasHub preset, a keras.applications name).
`tlloop.inspect_backbone` is the same in Python. Bad input: one line naming SOURCE, exit 2.
Wiring only: the table is `tlloop.cli.layer_table`'s, the facts `tlloop.models.inspection`'s.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from tlloop.cli.entry import fail
from tlloop.errors import ConfigError

FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(
            "tlloop: error: expected one SOURCE (a model file, a KerasHub preset or a "
            "keras.applications name): python -m tlloop.backbone SOURCE",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tlloop.cli.layer_table import inspect_backbone

    try:
        inspect_backbone(argv[1], safe_mode=not FLAGS.unsafe_deserialization)
    except ConfigError as error:
        return fail("tlloop", error)
    return 0


if __name__ == "__main__":
    # Defined here, not at import: tlloop.run defines its own --unsafe_deserialization.
    flags.DEFINE_bool(
        "unsafe_deserialization", False, "Allow a model file to run code when loaded (trusted)."
    )
    app.run(main)
