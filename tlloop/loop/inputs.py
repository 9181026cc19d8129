"""The phase's input: the batches a phase trains on and the evaluation that goes with them.

A phase trains on the training examples, read from one positioned stream (`BatchStream`: the
batch of global step s + 1 is the same whether the run got there in one process or resumed),
or, when the feature cache serves it (a frozen backbone in inference mode, no augmentation or
mixing), on the backbone's features computed once, streamed from the same position; its
evaluation then reads cached features too. `Inputs` decides which, makes them and keeps the
main stream's position across phases.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras

from tlloop import feature_cache
from tlloop import phases as phase_lib
from tlloop.data.examples import BatchStream, Examples
from tlloop.models import TransferModel


@dataclasses.dataclass(frozen=True)
class PhaseInput:
    """What one phase reads: its training `batches` (an iterator positioned at the phase's
    step), `evaluator` (the eval step and its distributed batches), whether they are cached
    features, and the reason logged for that choice."""

    batches: object
    evaluator: tuple
    cached: bool
    reason: str


class Inputs:
    """The training and evaluation input of every phase of a run.

    `distribute(batches, positionable, batch_size)` makes the strategy's distributed dataset
    of `batches(part)`; `eval_step` evaluates input images and `feature_eval_step(phase)` makes
    the eval step that evaluates cached features (once, when a phase first trains on them)."""

    def __init__(
        self,
        *,
        model: TransferModel,
        train: Examples,
        eval_data: Examples,
        distribute,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        cache_mode: str,
        eval_step,
        feature_eval_step: Callable[[phase_lib.PlannedPhase], object],
    ) -> None:
        self.model, self.train, self.eval = model, train, eval_data
        self.distribute = distribute
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.cache_mode = cache_mode
        self.eval_step, self.make_feature_eval_step = eval_step, feature_eval_step
        self.feature_eval_step = None
        self.eval_batches = self.distributed_eval(eval_data)
        self.stream = BatchStream(train, distribute, batch_size, seed)

    def distributed_eval(self, examples: Examples):
        """The strategy's distributed evaluation batches of `examples` (padded and masked)."""
        size = self.eval_batch_size
        return self.distribute(
            lambda part: examples.eval_batches(size, part), examples.positionable, size
        )

    def decide(self, phase: phase_lib.PlannedPhase, mixing: str) -> tuple[bool, str]:
        """(train `phase` on cached features?, the reason logged); `mixing` describes the
        MixUp/CutMix that runs ("" for none)."""
        return feature_cache.decide(
            self.cache_mode,
            backbone_frozen=phase.config.unfreeze.kind == "none",
            backbone_training=phase.modes.train.backbone,
            augmenting=phase.modes.train.augment and _augments(self.model),
            mixing=mixing,
            model=self.model,
            train=self.train,
            eval_data=self.eval,
            eval_batch_size=self.eval_batch_size,
        )

    def open(
        self, phase: phase_lib.PlannedPhase, cached: bool, reason: str, step: int
    ) -> PhaseInput:
        """The input of `phase`, going on from global step `step`: cached features (computed
        now, with the model as it is) or the training stream."""
        if not cached:
            evaluator = (self.eval_step, self.eval_batches)
            return PhaseInput(self.stream.at(step), evaluator, False, reason)
        features = feature_cache.compute(self.model, self.train, self.eval)
        stream = BatchStream(features.train, self.distribute, self.batch_size, self.seed)
        batches = stream.at(step)
        self.feature_eval_step = self.feature_eval_step or self.make_feature_eval_step(phase)
        evaluator = (self.feature_eval_step, self.distributed_eval(features.eval))
        reason += f"; computed in {features.seconds:.2f} s"
        return PhaseInput(batches, evaluator, True, reason)

    def close(self, phase_input: PhaseInput, step: int) -> None:
        """Records that the phase read the training stream up to global step `step`."""
        if not phase_input.cached:
            self.stream.ran_to(step)


def _augments(model: TransferModel) -> bool:
    """True if the augment submodule holds any layer that changes its input."""
    return bool(phase_lib.leaf_layers(model.augment)) and not all(
        isinstance(layer, (keras.layers.InputLayer, keras.layers.Identity))
        for layer in phase_lib.leaf_layers(model.augment)
    )
