"""The phase plan: which phases run, what each makes trainable, and in which modes.

`apply_trainability` is the only code that sets `trainable` flags. It keeps every container
trainable and sets leaf layers one by one, because in Keras 3 a container with
`trainable=False` hides the weights of all its children, whatever their own flag.
"""

from __future__ import annotations

import dataclasses
import math
import re

import keras

from tlloop.config import ConfigError, PhaseConfig, Unfreeze
from tlloop.models import ModeTable, TransferModel
from tlloop.models.modes import SUBMODULES


@dataclasses.dataclass(frozen=True)
class Phase:
    """A phase to run: its configuration, its position, and its mode table."""

    index: int
    config: PhaseConfig
    modes: ModeTable

    @property
    def name(self) -> str:
        return self.config.name


def plan_phases(phases: tuple[PhaseConfig, ...], model: TransferModel) -> list[Phase]:
    """The phases with epochs, in order; checks each unfreeze policy against the backbone.

    A phase's mode table is its own `modes` if given, else the default one with the backbone
    in training mode only under bn_mode "train" (and something unfrozen)."""
    plan = []
    for config in phases:
        if config.epochs == 0:
            continue
        unfrozen_layers(config.unfreeze, model.backbone)  # raises if it does not fit
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
        plan.append(Phase(len(plan), config, modes))
    return plan


def leaf_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The layers inside `layer` that are not containers, in the order they were added."""
    children = getattr(layer, "layers", None)
    if children is None:
        return [layer]
    return [leaf for child in children for leaf in leaf_layers(child)]


def is_batch_norm(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


def weighted_layers(backbone: keras.Model) -> list[keras.layers.Layer]:
    """Leaf layers that hold weights, BatchNormalization excluded: what `top:N` counts."""
    return [layer for layer in leaf_layers(backbone) if layer.weights and not is_batch_norm(layer)]


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
    """The backbone's leaf layers grouped into the blocks of its family, in order; the layers
    after the last block (a final 1x1 conv, its BatchNorm) belong to the last block, the stem
    before the first to none. Empty if no known naming matches."""
    leaves = leaf_layers(backbone)
    best: tuple[int, str] = (0, "")
    for pattern in BLOCK_PATTERNS:
        matched = sum(1 for layer in leaves if re.search(pattern, layer.name))
        best = max(best, (matched, pattern))
    if best[0] < 2:
        return []
    blocks: dict[str, list] = {}
    last = None
    for layer in leaves:
        found = re.search(best[1], layer.name)
        if found:
            last = found.group(1)
        if last is not None:
            blocks.setdefault(last, []).append(layer)
    return list(blocks.values())


def unfrozen_layers(unfreeze: Unfreeze, backbone: keras.Model) -> list[keras.layers.Layer]:
    """The leaf layers with weights that `unfreeze` chooses (BatchNorm aside: --bn_mode
    decides it). Raises ConfigError, naming the flag, when the policy does not fit."""
    weighted = weighted_layers(backbone)
    if unfreeze.kind == "none":
        return []
    if unfreeze.kind == "all":
        return weighted
    if unfreeze.kind == "top":
        if unfreeze.count > len(weighted):
            raise ConfigError(
                f"--unfreeze={unfreeze}: the backbone has only {len(weighted)} layers with "
                f"weights (BatchNormalization not counted); accepted: top:N with 1 <= N <= "
                f"{len(weighted)}, or all"
            )
        return weighted[-unfreeze.count :]
    if unfreeze.kind == "blocks":
        blocks = backbone_blocks(backbone)
        if not 1 <= unfreeze.count <= len(blocks):
            known = f"it has {len(blocks)} blocks" if blocks else "no known block naming"
            raise ConfigError(
                f"--unfreeze={unfreeze}: {known}; accepted: blocks:N with 1 <= N <= "
                f"{len(blocks)} (keras.applications families, KerasHub ResNet), or top:N, from:, "
                "regex:"
            )
        chosen = {id(layer) for block in blocks[-unfreeze.count :] for layer in block}
        return [layer for layer in weighted if id(layer) in chosen]
    leaves = leaf_layers(backbone)
    if unfreeze.kind == "from":
        names = [layer.name for layer in leaves]
        if unfreeze.value not in names:
            raise ConfigError(
                f"--unfreeze={unfreeze}: no layer {unfreeze.value!r} in the backbone; "
                f"accepted: from:NAME with a backbone layer name, e.g. {', '.join(names[-3:])}"
            )
        after = {id(layer) for layer in leaves[names.index(unfreeze.value) :]}
        return [layer for layer in weighted if id(layer) in after]
    chosen = [layer for layer in weighted if re.search(unfreeze.value, layer.name)]
    if not chosen:
        raise ConfigError(
            f"--unfreeze={unfreeze}: matches no backbone layer with weights; accepted: a "
            f"regular expression matching layer names, e.g. {weighted[-1].name}"
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


def apply_trainability(model: TransferModel, phase: Phase, epoch: int = 0) -> None:
    """Sets which weights train in `phase` (at `epoch`, for a gradual unfreeze): the head
    always, the backbone per its policy."""
    unfreeze, bn_mode = phase.config.unfreeze, phase.config.bn_mode
    # Each submodule is set by itself: Keras 3 does not carry `model.trainable = True` down
    # into a submodule that an earlier phase set to False.
    model.trainable = True
    model.augment.trainable = False
    model.head.trainable = True
    backbone = model.backbone
    backbone.trainable = unfreeze.kind != "none"
    if unfreeze.kind == "none":
        return
    leaves = leaf_layers(backbone)
    chosen = unfrozen_layers(unfreeze, backbone)
    if phase.config.gradual:
        chosen = stage_layers(unfreeze, backbone, phase.config.gradual * (epoch + 1))
    first = min((leaves.index(layer) for layer in chosen), default=len(leaves))
    if unfreeze.kind == "from" and not phase.config.gradual:  # it may name a BatchNorm
        first = [layer.name for layer in leaves].index(unfreeze.value)
    chosen_ids = {id(layer) for layer in chosen}
    for position, layer in enumerate(leaves):
        if is_batch_norm(layer):
            # With --bn_mode=train, the BatchNorm layers among the chosen ones train: all
            # after the first chosen layer; for a regex, those it matches.
            among = (
                re.search(unfreeze.value, layer.name)
                if unfreeze.kind == "regex"
                else position >= first
            )
            layer.trainable = bn_mode == "train" and bool(among)
        else:
            layer.trainable = id(layer) in chosen_ids


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
    for layer in leaf_layers(backbone):
        if id(layer) in unit_of:
            depth = len(units) - unit_of[id(layer)]
        for variable in layer.weights:
            multipliers[id(variable)] = decay**depth
    return multipliers


def no_decay_variables(model: TransferModel) -> list:
    """Trainable weights weight decay must leave alone: biases and BatchNormalization weights
    (decaying a BatchNorm scale or a bias toward 0 is not regularisation, it is damage)."""
    chosen = []
    for name in SUBMODULES:
        for layer in leaf_layers(getattr(model, name)):
            for variable in layer.trainable_weights:
                if is_batch_norm(layer) or variable.path.endswith("bias"):
                    chosen.append(variable)
    return chosen


def synchronize_batch_norm(model: TransferModel, synchronized: bool) -> None:
    """Sets `synchronized` on every BatchNormalization layer of the model.

    With more than one replica, a BatchNorm that computes batch statistics must all-reduce
    them; otherwise each replica normalises with its own share of the batch and its moving
    statistics drift apart from the other replicas'. Keras reads the flag when it traces.
    """
    for name in SUBMODULES:
        for layer in leaf_layers(getattr(model, name)):
            if is_batch_norm(layer):
                layer.synchronized = synchronized


def trainability_report(model: TransferModel, phase: Phase) -> str:
    """A Markdown table of each submodule's mode, parameter counts and BatchNorm layers."""
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
        norms = [layer for layer in leaf_layers(part) if is_batch_norm(layer)]
        # BatchNormalization uses batch statistics only when called with training=True *and*
        # it is trainable; otherwise it normalises with its moving statistics.
        inference = sum(1 for layer in norms if not (training and layer.trainable))
        lines.append(
            f"| {name} | {training} | {_count(part.trainable_weights):,} | "
            f"{_count(part.non_trainable_weights):,} | {len(norms)} | {inference} |"
        )
    return "\n".join(lines)


def _rate(config) -> str:
    if config.optimizer is not None:
        return f"optimizer {type(config.optimizer).__name__} (its own learning rate)"
    return f"learning rate {config.learning_rate:g}"


def _count(weights) -> int:
    return sum(math.prod(w.shape) for w in weights)
