"""Export: the trained model as .keras files a user can load and reuse."""

from __future__ import annotations

import os

from tlloop.models import TransferModel
from tlloop.workdir import write_atomic


def export_model(model: TransferModel, directory: str) -> dict[str, str]:
    """Writes `model.keras` (augment, backbone, head) and `backbone.keras` into `directory`.

    `backbone.keras` takes raw pixels and returns features, so it can serve as `--backbone`
    for another run: that is how a backbone pretrained by tlloop is transferred. Load either
    with `keras.saving.load_model` after `import tlloop` (which registers tlloop's classes).
    """
    paths = {
        "model": os.path.join(directory, "model.keras"),
        "backbone": os.path.join(directory, "backbone.keras"),
    }
    write_atomic(paths["model"], model.save)
    write_atomic(paths["backbone"], model.backbone.save)
    return paths
