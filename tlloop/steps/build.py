"""The step options of a run, and the compiled train and eval steps made from them."""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from tlloop import phases as phase_lib
from tlloop.anchors import Anchors, Penalty
from tlloop.config import TrainingConfig
from tlloop.mixing import Mixing
from tlloop.models import ModeTable, TransferModel
from tlloop.optim import make_optimizer
from tlloop.steps.body import TrainBody
from tlloop.steps.compiled import CompiledSteps
from tlloop.steps.eval import EvalStep
from tlloop.steps.metrics import Metrics
from tlloop.steps.train import TrainStep
from tlloop.steps.update import Update
from tlloop.tasks import Task


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How the compiled steps of every phase are made and run: the global batch sizes, the
    seed of MixUp/CutMix, the training options, XLA, steps per host call, the NaN policy, the
    feature cache, the logging cadence and float16 loss scaling."""

    batch_size: int
    eval_batch_size: int
    seed: int = 0
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    jit_compile: bool = False
    steps_per_loop: int | str = "auto"
    nan_policy: str = "stop"
    feature_cache: str = "auto"
    log_every_steps: int = 10
    histogram_every_steps: int = 0
    mixed_float16: bool = False


def mixing_of(options: StepOptions) -> Mixing | None:
    """The MixUp/CutMix of `options.training`, seeded by the run's seed; None when off."""
    training = options.training
    if not training.mixing:
        return None
    return Mixing(training.mixup, training.cutmix, training.mix_prob, options.seed)


def compile_train(
    model: TransferModel,
    optimizer: keras.optimizers.Optimizer,
    modes: ModeTable,
    metrics: Metrics,
    global_step: tf.Variable,
    options: StepOptions,
    *,
    task: Task | None = None,
    features_in: bool = False,
    penalty: Penalty | None = None,
) -> CompiledSteps:
    """Compiled training steps for the model's current trainable set with `optimizer` (built
    on that set), under the strategy current now: see `TrainBody`, `Update`, `TrainStep` and
    `CompiledSteps`. Of `options` it reads the global batch size, the training options
    (clipping, accumulation, EMA, MixUp/CutMix with the seed), XLA, the NaN policy and the
    logging cadence."""
    training = options.training
    body = TrainBody(
        model,
        modes,
        optimizer,
        global_step,
        global_batch_size=options.batch_size,
        task=task,
        features_in=features_in,
        mixing=mixing_of(options),
        penalty=penalty,
    )
    update = Update(
        optimizer,
        body.variables,
        metrics,
        clip_grad_norm=training.clip_grad_norm,
        grad_accum_steps=training.grad_accum_steps,
        ema_decay=training.ema_decay,
    )
    train_step = TrainStep(
        body,
        update,
        log_every_steps=options.log_every_steps,
        histogram_every_steps=options.histogram_every_steps,
        nan_policy=options.nan_policy,
    )
    return CompiledSteps(train_step, jit_compile=options.jit_compile)


def compile_eval(
    model: TransferModel,
    modes: ModeTable,
    metrics: Metrics,
    *,
    task: Task | None = None,
    jit_compile: bool = False,
    features_in: bool = False,
) -> CompiledSteps:
    """Compiled evaluation steps into `metrics` (see `EvalStep`), under the strategy current
    now; a call returns nothing."""
    eval_step = EvalStep(model, modes, metrics, features_in=features_in, task=task)
    return CompiledSteps(eval_step, jit_compile=jit_compile)


def build_train_step(
    model: TransferModel,
    phase: phase_lib.PlannedPhase,
    task: Task,
    options: StepOptions,
    *,
    metrics: Metrics,
    global_step: tf.Variable,
    steps_per_epoch: int,
    features_in: bool = False,
    learning_rate=None,
    anchors: Anchors | None = None,
) -> CompiledSteps:
    """A fresh optimizer (`phase_optimizer`) and compiled training steps for the model's
    current trainable set in `phase`; call under the strategy's scope. `anchors` (the
    backbone's starting weights) are needed when `options.training.l2sp` > 0 and a backbone
    weight trains."""
    optimizer = phase_optimizer(model, phase, options, steps_per_epoch, learning_rate)
    training = options.training
    penalty = Penalty(
        model, model.trainable_variables, anchors, l2sp=training.l2sp, l2sp_head=training.l2sp_head
    )
    return compile_train(
        model,
        optimizer,
        phase.modes,
        metrics,
        global_step,
        options,
        task=task,
        features_in=features_in,
        penalty=penalty,
    )


def phase_optimizer(
    model: TransferModel,
    phase: phase_lib.PlannedPhase,
    options: StepOptions,
    steps_per_epoch: int,
    learning_rate=None,
) -> keras.optimizers.Optimizer:
    """A fresh optimizer for the model's current trainable set in `phase`, built on it: the
    phase's schedule over its optimizer updates (or a copy of the phase's own optimizer), with
    loss scaling under `options.mixed_float16`. `learning_rate`, a function of a layer group's
    rate multiplier (1 without layer-wise rates) giving its rate or schedule, replaces the
    phase's schedule (the range test uses it)."""
    training = options.training
    optimizer = phase.config.optimizer
    if optimizer is None:
        # Optimizer updates: every epoch's batches, the leftover of each epoch one more update.
        updates = -(-steps_per_epoch // training.grad_accum_steps)
        warmup = training.warmup_steps or training.warmup_epochs * updates
        return make_optimizer(
            phase.config,
            model.trainable_variables,
            training,
            steps=phase.config.epochs * updates,
            warmup_steps=warmup,
            no_decay=tuple(phase_lib.no_decay_variables(model)),
            multipliers=phase_lib.lr_multipliers(model, training.layer_lr_decay),
            loss_scale=options.mixed_float16,
            learning_rate=learning_rate,
        )
    # The phase's own optimizer: a fresh copy for each trainable set.
    if training.layer_lr_decay:
        raise ValueError(
            f"phases: phase {phase.name!r} brings its own optimizer, which layer_lr_decay "
            "cannot split into layer groups; accepted: one of the two"
        )
    optimizer = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    if learning_rate is not None:
        optimizer.learning_rate = learning_rate(1.0)
    if options.mixed_float16:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return optimizer
