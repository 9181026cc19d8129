"""tlloop: transfer learning and fine-tuning with TensorFlow 2 and Keras 3, as a library.

    import tlloop

    model = tlloop.TransferModel(backbone, tlloop.classification_head(backbone, 5))
    trainer = tlloop.Trainer(
        "runs/mine",
        phases=[tlloop.Phase("head", epochs=3, learning_rate=1e-3),
                tlloop.Phase("finetune", epochs=3, learning_rate=1e-4, unfreeze="top:2")],
        task=tlloop.Classification(5),
        callbacks=[keras.callbacks.CSVLogger("runs/mine/epochs.csv")],
    )
    results = trainer.fit(model, (x_train, y_train), (x_eval, y_eval))

`import tlloop` registers every Keras class tlloop saves, so `keras.saving.load_model` reads
its `.keras` files. The public names are listed in `__all__`; `python -m tlloop.run` is the
command line over the same objects.
"""

from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

# Public name -> the module that defines it (and the name there).
_PUBLIC = {
    "Trainer": ("tlloop.trainer", "Trainer"),
    "Results": ("tlloop.trainer", "Results"),
    "TransferModel": ("tlloop.models", "TransferModel"),
    "ModeTable": ("tlloop.models", "ModeTable"),
    "Modes": ("tlloop.models", "Modes"),
    "classification_head": ("tlloop.models.heads", "classification_head"),
    "regression_head": ("tlloop.models.heads", "regression_head"),
    "Phase": ("tlloop.config", "PhaseConfig"),
    "Unfreeze": ("tlloop.config", "Unfreeze"),
    "TrainingConfig": ("tlloop.config", "TrainingConfig"),
    "CheckpointConfig": ("tlloop.config", "CheckpointConfig"),
    "LoggingConfig": ("tlloop.config", "LoggingConfig"),
    "BestMetric": ("tlloop.config", "BestMetric"),
    "Task": ("tlloop.tasks", "Task"),
    "Classification": ("tlloop.tasks", "Classification"),
    "MultiLabel": ("tlloop.tasks", "MultiLabel"),
    "Regression": ("tlloop.tasks", "Regression"),
    "positive_weights": ("tlloop.tasks", "positive_weights"),
    "Examples": ("tlloop.data.examples", "Examples"),
    "InMemoryExamples": ("tlloop.data.examples", "InMemoryExamples"),
    "EncodedImages": ("tlloop.data.streaming", "EncodedImages"),
    "StreamedExamples": ("tlloop.data.examples", "StreamedExamples"),
    "evaluate": ("tlloop.evaluation", "evaluate_model"),
    "predict": ("tlloop.evaluation", "predict"),
    "export": ("tlloop.export", "export_model"),
    "load_backbone": ("tlloop.models.backbones", "load_backbone"),
    "text_backbone": ("tlloop.models.hub", "text_backbone"),
    "inspect_backbone": ("tlloop.cli.layer_table", "inspect_backbone"),
    "rank": ("tlloop.ranking", "rank"),
    "ConfigError": ("tlloop.errors", "ConfigError"),
    "RunFailed": ("tlloop.errors", "RunFailed"),
    "CallbackError": ("tlloop.errors", "CallbackError"),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tlloop' has no attribute {name!r}")
    module, attribute = _PUBLIC[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


# `python -m tlloop.run` (and the other entry points) import this package first, with
# sys.argv[0] still "-m": they check their flags before TensorFlow loads, so a typo fails in a
# fraction of a second, and import what they need afterwards. Any other import loads the API,
# which registers tlloop's Keras classes.
if sys.argv[:1] != ["-m"]:
    for _name in __all__:
        __getattr__(_name)
