"""Compiled train and eval steps, split as Keras splits them.

- `body`: one replica's training step body (`TrainBody`): forward with the mode table, the
  task's loss, gradients, finiteness; it changes no state.
- `update`: the update of a finite step (`Update`): clipping, gradient accumulation, the
  optimizer, the moving averages (`averaged`), the training metrics.
- `train` / `eval`: one step of each kind (`TrainStep`, `EvalStep`), as the factory runs it.
- `compiled`: the one factory (`CompiledSteps`) that turns any step body into the K-step
  `tf.while_loop` of one host call, with its XLA scope and the reason for it.
- `build`: `StepOptions` (one frozen set of options for a run's steps), `compile_train`,
  `compile_eval`, `phase_optimizer` and `build_train_step` (a phase's fresh optimizer and
  compiled steps).
- `metrics`: `Metrics` and the check that step state was made under the strategy's scope.

A compiled training step is made for one trainable set: it captures
`model.trainable_variables` when it is made and applies gradients to exactly those; when the
set changes (a phase unfreezes layers), a new one must be made. Steps know nothing of flags,
and refuse state (variables of the model, optimizer, metrics, step counter) that was created
outside the current strategy's scope: such state fails or hangs later, far from its cause.
"""

from tlloop.steps.body import TrainBody
from tlloop.steps.build import (
    StepOptions,
    build_train_step,
    compile_eval,
    compile_train,
    mixing_of,
    phase_optimizer,
)
from tlloop.steps.compiled import CompiledSteps, StepBody
from tlloop.steps.eval import EvalStep
from tlloop.steps.metrics import Metrics, check_created_in_scope
from tlloop.steps.train import StepsResult, TrainStep
from tlloop.steps.update import Update, averaged

__all__ = [
    "CompiledSteps",
    "EvalStep",
    "Metrics",
    "StepBody",
    "StepOptions",
    "StepsResult",
    "TrainBody",
    "TrainStep",
    "Update",
    "averaged",
    "build_train_step",
    "check_created_in_scope",
    "compile_eval",
    "compile_train",
    "mixing_of",
    "phase_optimizer",
]
