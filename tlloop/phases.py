"""The phase plan: which phases run, what each makes trainable, and in which modes.

`apply_trainability` is the only code that sets `trainable` flags. It keeps every container
trainable and sets each layer's own weights one by one, at any depth (`walk.all_layers`),
because in Keras 3 a container with `trainable=False` hides the weights of all its children,
whatever their own flag, and setting `trainable` on a container sets it on every sublayer.
Policies count the layers that hold weights and that the backbone's forward pass uses
(`walk.used_variables`); layers it holds but never calls never train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re

import keras
import tensorflow as tf

from tlloop.config import PhaseConfig, Unfreeze
from tlloop.errors import ConfigError
from tlloop.models import ModeTable, TransferModel, walk
from tlloop.models.modes import SUBMODULES
from tlloop.models.walk import all_layers, leaf_layers, own_weights

__all__ = ["all_layers", "leaf_layers"]  # re-exported: the walk every module uses


@dataclasses.dataclass(frozen=True)
class PlannedPhase:
    """A phase as planned for a model (not the public `tlloop.Phase`, which is its PhaseConfig):
    its configuration, its position, and its mode table."""

    index: int
    config: PhaseConfig
    modes: ModeTable

    @property
    def name(self) -> str:
        return self.config.name


def plan_phases(
    phases: tuple[PhaseConfig, ...], model: TransferModel, example_spec=None
) -> list[PlannedPhase]:
    """The phases with epochs, in order; checks each unfreeze policy against the backbone.

    A phase's mode table is its own `modes` if given, else the default one with the backbone
    in training mode only under bn_mode "train" (and something unfrozen). `example_spec`, the
    spec of one example's inputs (the training data's), is what a backbone that declares no
    inputs is traced on to find the layers it uses."""
    if example_spec is not None:
        try:
            batch = tf.nest.map_structure(
                lambda s: tf.TensorSpec((None, *s.shape), s.dtype), example_spec
            )
        except (TypeError, ValueError, AttributeError):  # ragged, sparse, unknown rank
            batch = None  # the backbone's own spec (or its first call's shapes) decides
        walk.used_variables(model.backbone, batch, lambda x: model.augment(x, training=False))
    plan = []
    for config in phases:
        if config.epochs == 0:
            continue
        unfrozen_layers(config.unfreeze, model.backbone)  # raises if it does not fit
        if config.bn_mode == "adapt" and not walk.batch_norms(model.backbone):
            raise ConfigError(
                "bn_mode",
                "adapt",
                f"the backbone ({model.backbone.name}) holds no BatchNormalization layer, so "
                "there are no statistics to adapt",
                "frozen, or a backbone with BatchNormalization",
            )
        modes = config.modes
        if modes is None:
            modes = ModeTable().with_backbone_training(
                config.bn_mode == "train" and config.unfreeze.kind != "none"
            )
        elif not isinstance(modes, ModeTable):
            raise TypeError(
                f"modes: phase {config.name!r} has a {type(modes).__name__}; accepted: a "
                "tlloop.ModeTable, e.g. ModeTable(train=Modes(augment=True, backbone=True, "
                "head=True))"
            )
        plan.append(PlannedPhase(len(plan), config, modes))
    return plan


def is_batch_norm(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


def held_layers(backbone: keras.Model) -> list[keras.layers.Layer]:
    """Every layer at any depth (the backbone itself first) that holds weights of its own,
    BatchNormalization excluded: what the unfreeze policies choose from, used or not."""
    return [
        layer
        for layer in all_layers(backbone, include_self=True)
        if own_weights(layer) and not is_batch_norm(layer)
    ]


def weighted_layers(backbone: keras.Model) -> list[keras.layers.Layer]:
    """The layers with weights (BatchNormalization excluded) the forward pass uses, in walk
    order: what `top:N` counts and `all` trains."""
    used = walk.used_variables(backbone)
    return [layer for layer in held_layers(backbone) if walk.is_used(layer, used)]


def unused_layers(backbone: keras.Model) -> list[keras.layers.Layer]:
    """The layers with weights (BatchNorm included) that the backbone holds but its forward
    pass never uses (e.g. the old classifier of a model cut by overriding `call`)."""
    used = walk.used_variables(backbone)
    return [
        layer
        for layer in all_layers(backbone, include_self=True)
        if own_weights(layer) and not walk.is_used(layer, used)
    ]


# Block names of keras.applications families, by the layer-name prefix they share.
BLOCK_PATTERNS = (
    r"^(block_\d+)_",  # MobileNetV2
    r"^(expanded_conv(?:_\d+)?)_",  # MobileNetV3
    r"^(block\d+[a-z])_",  # EfficientNet, EfficientNetV2
    r"^(conv\d+_block\d+)_",  # ResNet, ResNetV2, DenseNet
    r"^(block\d+)_",  # VGG, Xception
    r"_(stage_\d+_block_\d+)_",  # ConvNeXt
    r"^(stack\d+_block\d+)_",  # KerasHub ResNet (v1 and v2)
)


def backbone_blocks(backbone: keras.Model) -> list[list[keras.layers.Layer]]:
    """The backbone's layers (at any depth, those it holds but never uses left out) grouped
    into the blocks of its family, in order; the layers after the last block (a final 1x1
    conv, its BatchNorm) belong to the last block, the stem before the first to none. Empty if
    no known naming matches."""
    used = walk.used_variables(backbone)
    layers = [
        layer
        for layer in all_layers(backbone)
        if not own_weights(layer) or walk.is_used(layer, used)
    ]
    best: tuple[int, str] = (0, "")
    for pattern in BLOCK_PATTERNS:
        matched = sum(1 for layer in layers if re.search(pattern, layer.name))
        best = max(best, (matched, pattern))
    if best[0] < 2:
        return []
    blocks: dict[str, list] = {}
    last = None
    for layer in layers:
        found = re.search(best[1], layer.name)
        if found:
            last = found.group(1)
        if last is not None:
            blocks.setdefault(last, []).append(layer)
    return list(blocks.values())


def _matches(pattern: str, backbone: keras.Model) -> set[int]:
    """Ids of the layers whose name, or the name of a custom Layer holding them (a block that
    is not a model), `pattern` matches."""
    matched: set[int] = set()

    def visit(layer, inherited: bool) -> None:
        hit = inherited or bool(re.search(pattern, layer.name))
        if hit:
            matched.add(id(layer))
        for child in walk.sublayers(layer):
            visit(child, hit and not isinstance(layer, keras.Model))

    for child in walk.sublayers(backbone):
        visit(child, False)
    return matched


def unfrozen_layers(unfreeze: Unfreeze, backbone: keras.Model) -> list[keras.layers.Layer]:
    """The layers with weights that `unfreeze` chooses among those the forward pass uses
    (BatchNorm aside: `bn_mode` decides it). Raises ConfigError naming `unfreeze` when the
    policy does not fit."""
    weighted = weighted_layers(backbone)
    if unfreeze.kind == "none":
        return []
    if unfreeze.kind == "all":
        return weighted
    if unfreeze.kind == "top":
        if unfreeze.count > len(weighted):
            raise ConfigError(
                "unfreeze",
                unfreeze,
                f"the backbone has only {len(weighted)} layers with weights that its forward "
                "pass uses (BatchNormalization not counted)",
                f"top:N with 1 <= N <= {len(weighted)}, or all",
            )
        return weighted[-unfreeze.count :]
    if unfreeze.kind == "blocks":
        blocks = backbone_blocks(backbone)
        if not 1 <= unfreeze.count <= len(blocks):
            known = f"it has {len(blocks)} blocks" if blocks else "no known block naming"
            raise ConfigError(
                "unfreeze",
                unfreeze,
                known,
                f"blocks:N with 1 <= N <= {len(blocks)} (keras.applications families, KerasHub "
                "ResNet), or top:N, from:, regex:",
            )
        chosen = {id(layer) for block in blocks[-unfreeze.count :] for layer in block}
        return [layer for layer in weighted if id(layer) in chosen]
    order = all_layers(backbone)
    if unfreeze.kind == "from":
        names = [layer.name for layer in order]
        if unfreeze.value not in names:
            raise ConfigError(
                "unfreeze",
                unfreeze,
                f"no layer {unfreeze.value!r} in the backbone",
                f"from:NAME with a backbone layer name, e.g. {', '.join(names[-3:])}",
            )
        after = {id(layer) for layer in order[names.index(unfreeze.value) :]}
        return [layer for layer in weighted if id(layer) in after]
    matched = _matches(unfreeze.value, backbone)
    chosen = [layer for layer in weighted if id(layer) in matched]
    if not chosen:
        raise ConfigError(
            "unfreeze",
            unfreeze,
            "matches no backbone layer with weights",
            f"a regular expression matching layer names, e.g. {weighted[-1].name}",
        )
    return chosen


def stage_layers(unfreeze: Unfreeze, backbone: keras.Model, units: int) -> list:
    """The layers of the top `units` units of what `unfreeze` chooses: blocks for blocks:N,
    layers with weights otherwise (a gradual unfreeze's stage)."""
    chosen = unfrozen_layers(unfreeze, backbone)
    if unfreeze.kind != "blocks":
        return chosen[-units:]
    ids = {id(layer) for layer in chosen}
    blocks = [b for b in backbone_blocks(backbone) if any(id(layer) in ids for layer in b)]
    kept = {id(layer) for block in blocks[-units:] for layer in block}
    return [layer for layer in chosen if id(layer) in kept]


def apply_trainability(model: TransferModel, phase: PlannedPhase, epoch: int = 0) -> None:
    """Sets which weights train in `phase` (at `epoch`, for a gradual unfreeze): the head
    always, the backbone per its policy, at any depth: the layers the policy chooses, the
    BatchNorm layers among them only with bn_mode "train", nothing the forward pass does not
    use."""
    unfreeze, bn_mode = phase.config.unfreeze, phase.config.bn_mode
    # Each submodule is set by itself: Keras 3 does not carry `model.trainable = True` down
    # into a submodule that an earlier phase set to False.
    model.trainable = True
    model.augment.trainable = False
    model.head.trainable = True
    backbone = model.backbone
    # Keras sets this on every layer below, and on each one's own weights: a clean start.
    backbone.trainable = unfreeze.kind != "none"
    if unfreeze.kind == "none":
        return
    order = all_layers(backbone, include_self=True)
    chosen = unfrozen_layers(unfreeze, backbone)
    if phase.config.gradual:
        chosen = stage_layers(unfreeze, backbone, phase.config.gradual * (epoch + 1))
    positions = {id(layer): position for position, layer in enumerate(order)}
    first = min((positions[id(layer)] for layer in chosen), default=len(order))
    if unfreeze.kind == "from" and not phase.config.gradual:  # it may name a BatchNorm
        first = 1 + [layer.name for layer in order[1:]].index(unfreeze.value)
    chosen_ids = {id(layer) for layer in chosen}
    matched = _matches(unfreeze.value, backbone) if unfreeze.kind == "regex" else set()
    used = walk.used_variables(backbone)
    # Parents come before their children in `order`, so a custom block's own weights are set
    # before the BatchNorm inside it is (re-)frozen.
    for position, layer in enumerate(order):
        if not own_weights(layer):
            continue
        if is_batch_norm(layer):
            # With bn_mode="train", the BatchNorm layers among the chosen ones train: all
            # after the first chosen layer; for a regex, those it matches.
            among = id(layer) in matched if unfreeze.kind == "regex" else position >= first
            trains = bn_mode == "train" and among and walk.is_used(layer, used)
        else:
            trains = id(layer) in chosen_ids
        walk.set_own_trainable(layer, trains)


@contextlib.contextmanager
def kept_trainability(model: keras.Model):
    """Inside, set trainability freely; after, every layer's and variable's flag is as before."""
    layers = all_layers(model, include_self=True)
    flags = [layer.trainable for layer in layers]
    variables = model.variables
    variable_flags = [variable.trainable for variable in variables]
    try:
        yield
    finally:
        for layer, flag in zip(layers, flags, strict=True):  # parents first: setters cascade
            layer.trainable = flag
        for variable, flag in zip(variables, variable_flags, strict=True):
            variable.trainable = flag


def lr_multipliers(model: TransferModel, decay: float) -> dict[int, float]:
    """Layer-wise learning-rate decay: by `id` of each backbone variable, `decay` ** (its depth
    below the head). Depth counts blocks for a keras.applications family (else layers with
    weights): the top one is 1; a layer between them (a BatchNorm) goes with the one before;
    the stem below the first is one deeper still. The head (absent here) keeps 1."""
    if not decay or decay == 1.0:
        return {}
    backbone = model.backbone
    units = backbone_blocks(backbone) or [[layer] for layer in weighted_layers(backbone)]
    unit_of = {id(layer): i for i, unit in enumerate(units) for layer in unit}
    multipliers, depth = {}, len(units) + 1
    for layer in all_layers(backbone, include_self=True):
        if id(layer) in unit_of:
            depth = len(units) - unit_of[id(layer)]
        for variable in own_weights(layer):
            multipliers[id(variable)] = decay**depth
    return multipliers


def no_decay_variables(model: TransferModel) -> list:
    """Trainable weights weight decay must leave alone: biases and BatchNormalization weights
    (decaying a BatchNorm scale or a bias toward 0 is not regularisation, it is damage)."""
    trainable = {id(variable) for variable in model.trainable_variables}
    chosen = []
    for name in SUBMODULES:
        for layer in all_layers(getattr(model, name), include_self=True):
            for variable in own_weights(layer):
                if id(variable) in trainable and (
                    is_batch_norm(layer) or variable.path.endswith("bias")
                ):
                    chosen.append(variable)
    return chosen


def synchronize_batch_norm(model: TransferModel, synchronized: bool) -> None:
    """Sets `synchronized` on every BatchNormalization layer of the model, at any depth.

    With more than one replica, a BatchNorm that computes batch statistics must all-reduce
    them; otherwise each replica normalises with its own share of the batch and its moving
    statistics drift apart from the other replicas'. Keras reads the flag when it traces.
    """
    for name in SUBMODULES:
        for layer in leaf_layers(getattr(model, name)):
            if is_batch_norm(layer):
                layer.synchronized = synchronized


def trainability_report(model: TransferModel, phase: PlannedPhase) -> str:
    """A Markdown table of each submodule's mode, parameter counts and BatchNorm layers (at
    any depth), then the backbone layers that train, by name, and those it holds but never
    uses."""
    row = phase.modes.row("train")
    lines = [
        f"phase {phase.index + 1} `{phase.name}`: unfreeze={phase.config.unfreeze}, "
        f"bn_mode={phase.config.bn_mode}, {_rate(phase.config)}",
        "",
        "| submodule | training= in train step | trainable params | non-trainable params "
        "| BatchNorm layers | BatchNorm in inference mode in train step |",
        "|---|---|---|---|---|---|",
    ]
    for name in SUBMODULES:
        part = getattr(model, name)
        training = getattr(row, name)
        norms = walk.batch_norms(part)
        # BatchNormalization uses batch statistics only when called with training=True *and*
        # it is trainable; otherwise it normalises with its moving statistics.
        inference = sum(1 for layer in norms if not (training and layer.trainable))
        lines.append(
            f"| {name} | {training} | {_count(part.trainable_weights):,} | "
            f"{_count(part.non_trainable_weights):,} | {len(norms)} | {inference} |"
        )
    trained = trained_layers(model.backbone)
    lines += ["", f"backbone layers that train ({len(trained)}): {_names(trained)}"]
    unused = unused_layers(model.backbone)
    if unused:
        lines.append(
            f"backbone layers held but not used by its forward pass, never trained "
            f"({len(unused)}): {_names(unused)}"
        )
    return "\n".join(lines)


def trained_layers(backbone: keras.Model) -> list[keras.layers.Layer]:
    """The layers at any depth whose own weights are among the backbone's trainable ones."""
    trainable = {id(variable) for variable in backbone.trainable_weights}
    return [
        layer
        for layer in all_layers(backbone, include_self=True)
        if any(id(variable) in trainable for variable in own_weights(layer))
    ]


def _names(layers: list) -> str:
    return ", ".join(layer.name for layer in layers) or "none"


def _rate(config) -> str:
    if config.optimizer is not None:
        return f"optimizer {type(config.optimizer).__name__} (its own learning rate)"
    return f"learning rate {config.learning_rate:g}"


def _count(weights) -> int:
    return sum(math.prod(w.shape) for w in weights)
