"""One evaluation step as `CompiledSteps` runs it: every submodule in inference mode."""

from __future__ import annotations

import tensorflow as tf

from tlloop.models import ModeTable, TransferModel
from tlloop.steps.metrics import Metrics, check_created_in_scope
from tlloop.tasks import Classification, Task


class EvalStep:
    """Evaluation of one batch of (inputs, labels, weights) into `metrics`; a step body for
    `CompiledSteps`.

    Padding examples have weight 0, so `metrics` counts each real example exactly once. The
    loss is the `task`'s evaluation loss. With `features_in`, batches hold backbone features
    and only the head runs. Under XLA the whole step (forward and metric updates) compiles on
    one replica, else the forward pass.
    """

    kind = "eval"
    # Not "jit_compile: ": that prefix is the train step's line, which the trainer's user reads.
    log_prefix = "jit_compile (eval): "
    part_scope = "forward"
    part_name = "the forward pass"
    outside = "the metric updates run outside XLA"
    replicas_cause = "tlloop compiles the whole step for one replica only"

    def __init__(
        self,
        model: TransferModel,
        modes: ModeTable,
        metrics: Metrics,
        *,
        features_in: bool = False,
        task: Task | None = None,
    ) -> None:
        self.model = model
        self.task = task or Classification()
        self.features_in = features_in
        self.modes = modes.row("eval")
        self.metrics = metrics
        strategy = tf.distribute.get_strategy()
        check_created_in_scope(strategy, model.weights, "model")
        check_created_in_scope(strategy, metrics.variables, "metric")

    def part(self, inputs):
        if self.features_in:
            return self.model.head(inputs, training=self.modes.head)
        return self.model.forward(inputs, self.modes)

    def replica(self, part, inputs, labels, weights) -> None:
        outputs = part(inputs)
        self.metrics.update(self.task.eval_loss(labels, outputs), labels, outputs, weights)

    def whole(self, inputs, labels, weights) -> None:
        self.replica(self.part, inputs, labels, weights)

    def loop_start(self) -> tuple:
        return ()

    def loop_step(self, batch, carry: tuple, run, whole: bool):
        run(*batch)
        return carry, False

    def loop_end(self, carry: tuple) -> None:
        return None

    def result(self, outputs) -> None:
        return None
