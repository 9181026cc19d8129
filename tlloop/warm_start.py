"""Warm start (`init_checkpoint`): a backbone's weights from another run's checkpoint.

Distinct from resuming: a warm start loads only backbone weights into a fresh run, and a run
that resumes from its own workdir restores every weight over it. Variables are matched the way
`tf.train.Checkpoint` matches them, by their position in the object graph, with the backbone
looked for where tlloop keeps it (`model/backbone`) and where a plain checkpoint of a Keras
model would (`model`, `backbone`).
"""

from __future__ import annotations

import dataclasses
import os

import keras
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from tlloop.errors import ConfigError

_ACCEPTED = (
    "a tlloop workdir, a checkpoint directory, or a checkpoint path (PREFIX with PREFIX.index) "
    "holding the same backbone architecture"
)
_VALUE = "VARIABLE_VALUE"


@dataclasses.dataclass(frozen=True)
class WarmStartReport:
    """What a warm start loaded: from which checkpoint and where in it the backbone was found;
    the backbone variables loaded (`matched`) and left as built (`missing`); and the checkpoint
    values under the backbone that fit no variable (`unmatched`, by checkpoint key)."""

    checkpoint: str
    root: str
    matched: tuple[str, ...]
    missing: tuple[str, ...]
    unmatched: tuple[str, ...]

    def to_text(self) -> str:
        lines = [
            f"init checkpoint {self.checkpoint} (backbone at {self.root}): "
            f"{len(self.matched)} matched, {len(self.unmatched)} unmatched, "
            f"{len(self.missing)} missing"
        ]
        lines += [f"  missing (kept as built): {path}" for path in self.missing]
        lines += [f"  unmatched (ignored): {key}" for key in self.unmatched]
        return "\n".join(lines)


def resolve(path: str) -> str:
    """The checkpoint `path` names: a tlloop workdir's best checkpoint (else its latest), the
    latest in a checkpoint directory, or a checkpoint prefix. Raises ConfigError naming
    `init_checkpoint`."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
        found = tf.train.latest_checkpoint(os.path.join(path, "best"))
        found = found or tf.train.latest_checkpoint(path)
    elif os.path.isdir(path):
        found = tf.train.latest_checkpoint(path)
    else:
        found = path if tf.io.gfile.exists(path + ".index") else None
    if not found:
        raise ConfigError("init_checkpoint", repr(path), "no checkpoint there", _ACCEPTED)
    return found


class _Holder(tf.Module):
    def __init__(self, backbone: keras.Model) -> None:
        super().__init__()
        self.backbone = backbone


def _roots(backbone: keras.Model) -> list[tuple[str, tf.train.Checkpoint]]:
    return [
        ("model/backbone", tf.train.Checkpoint(model=_Holder(backbone))),
        ("model", tf.train.Checkpoint(model=backbone)),
        ("backbone", tf.train.Checkpoint(backbone=backbone)),
    ]


def warm_start(backbone: keras.Model, path: str) -> WarmStartReport:
    """Loads `backbone`'s weights from the checkpoint `path` names; returns the report.

    Raises ConfigError naming `init_checkpoint` if the checkpoint is unreadable, if no variable
    matched, or if a matched variable's shape differs (naming it); nothing is loaded then.
    """
    checkpoint = resolve(path)
    try:
        reader = tf.train.load_checkpoint(checkpoint)
        graph = trackable_object_graph_pb2.TrackableObjectGraph()
        graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
        view = tf.train.CheckpointView(checkpoint)
    except (tf.errors.OpError, ValueError) as error:
        raise ConfigError(
            "init_checkpoint",
            repr(path),
            f"unreadable checkpoint {checkpoint!r} ({error.__class__.__name__})",
            _ACCEPTED,
        ) from None
    shapes = reader.get_variable_to_shape_map()
    by_id = {id(variable): variable for variable in backbone.weights}
    root_name, matched, root_node = "", {}, -1
    for name, root in _roots(backbone):
        found = view.match(root)
        here = {node: by_id[id(obj)] for node, obj in found.items() if id(obj) in by_id}
        if len(here) > len(matched):
            root_node = next(node for node, obj in found.items() if obj is backbone)
            root_name, matched = name, here
    if not matched:
        keys = sorted(key for key in shapes if not key.startswith("_"))[:3]
        raise ConfigError(
            "init_checkpoint",
            repr(path),
            f"no backbone variable matched in {checkpoint!r} (looked at model/backbone, model "
            f"and backbone; it holds e.g. {keys})",
            _ACCEPTED,
        )
    pairs = []
    for node, variable in matched.items():
        key = _value_key(graph.nodes[node])
        if tuple(shapes[key]) != tuple(variable.shape):
            raise ConfigError(
                "init_checkpoint",
                repr(path),
                f"variable {variable.path!r} has shape {tuple(variable.shape)} here but "
                f"{tuple(shapes[key])} in {checkpoint!r} ({key})",
                _ACCEPTED,
            )
        pairs.append((variable, key))
    for variable, key in pairs:
        variable.assign(reader.get_tensor(key))
    used = {key for _, key in pairs}
    under_root = [
        _value_key(graph.nodes[node])
        for node in _descendants(graph, root_node)
        if _value_key(graph.nodes[node])
    ]
    loaded = {id(variable) for variable, _ in pairs}
    return WarmStartReport(
        checkpoint=checkpoint,
        root=root_name,
        matched=tuple(variable.path for variable, _ in pairs),
        missing=tuple(v.path for v in backbone.weights if id(v) not in loaded),
        unmatched=tuple(sorted(key for key in under_root if key not in used)),
    )


def _value_key(node) -> str:
    return next((a.checkpoint_key for a in node.attributes if a.name == _VALUE), "")


def _descendants(graph, start: int) -> list[int]:
    seen, stack = {start}, [start]
    while stack:
        for child in graph.nodes[stack.pop()].children:
            if child.node_id not in seen:
                seen.add(child.node_id)
                stack.append(child.node_id)
    return sorted(seen)
