"""Command-line flags of `python -m tlloop.run`, and their conversion into a RunConfig.

The flags are defined on a FlagValues the entry point passes in; nothing here keeps or reads
a global FLAGS. Values are checked once, by the config dataclasses, with messages that name
the flag.
"""

from __future__ import annotations

from collections.abc import Collection

from absl import flags

from tlloop import config as config_lib

# Every flag this module defines, in the order flags.txt lists them.
FLAG_NAMES: list[str] = []
# The flags that say which examples a run evaluates on; tlloop.evaluate takes these.
DATA_FLAGS = (
    "dataset",
    "data_dir",
    "val_dir",
    "train_files",
    "val_files",
    "image_feature",
    "label_feature",
    "tfds_dir",
    "val_split",
    "classes",
    "bad_images",
    "eval_batch_size",
)


def _define_one(kind, name: str, default, help_text: str, flag_values: flags.FlagValues, **kw):
    kind(name, default, help=help_text, flag_values=flag_values, **kw)
    FLAG_NAMES.append(name)


def define_flags(flag_values: flags.FlagValues, only: Collection[str] | None = None) -> None:
    """Defines tlloop's flags on `flag_values` (those named in `only`, if given)."""
    FLAG_NAMES.clear()
    d = flags
    fv = flag_values

    def _define(kind, name: str, default, help_text: str, flag_values, **kw):
        if only is None or name in only:
            _define_one(kind, name, default, help_text, flag_values, **kw)

    # Run.
    _define(d.DEFINE_string, "workdir", None, "Directory for this run's outputs.", fv)
    _define(
        d.DEFINE_bool,
        "overwrite",
        False,
        "Replace a previous run's outputs in --workdir (they are listed as removed).",
        fv,
    )
    _define(d.DEFINE_integer, "seed", 0, "Seed for initialisation, shuffling and dropout.", fv)
    # Data.
    _define(
        d.DEFINE_string,
        "dataset",
        "digits",
        "Examples: digits (embedded UCI optical digits), folder (--data_dir with one sub-folder "
        "per class), tfrecord (--train_files of tf.train.Example records) or tfds:NAME "
        "(a TensorFlow Datasets dataset already in --tfds_dir; needs tensorflow-datasets).",
        fv,
    )
    _define(d.DEFINE_string, "data_dir", "", "For --dataset=folder: one sub-folder per class.", fv)
    _define(
        d.DEFINE_string,
        "train_files",
        "",
        "For --dataset=tfrecord: glob(s) of TFRecord files, comma-separated.",
        fv,
    )
    _define(
        d.DEFINE_string,
        "val_files",
        "",
        "For --dataset=tfrecord: evaluation TFRecord glob(s); empty: hold out --val_split.",
        fv,
    )
    _define(
        d.DEFINE_string,
        "image_feature",
        "image/encoded",
        "For --dataset=tfrecord: the feature holding the encoded image (JPEG, PNG, ...).",
        fv,
    )
    _define(
        d.DEFINE_string,
        "label_feature",
        "image/class/label",
        "For --dataset=tfrecord: the int64 feature holding the class index.",
        fv,
    )
    _define(
        d.DEFINE_string,
        "tfds_dir",
        "",
        "For --dataset=tfds:NAME: the TensorFlow Datasets data directory; empty: its default.",
        fv,
    )
    _define(
        d.DEFINE_string,
        "val_dir",
        "",
        "Evaluation images, same layout as --data_dir; "
        "empty: hold out --val_split of the training data.",
        fv,
    )
    _define(
        d.DEFINE_float,
        "val_split",
        0.3,
        "Fraction of each class held out for evaluation "
        "when there is no --val_dir (a fixed split, the same for every --seed).",
        fv,
    )
    _define(
        d.DEFINE_string,
        "classes",
        "",
        "Classes to use, in label order, e.g. 5-9 or cat,dog; empty: all.",
        fv,
    )
    _define(
        d.DEFINE_integer,
        "train_examples_per_class",
        0,
        "Keep this many training examples per class (few-shot); 0: all.",
        fv,
    )
    _define(
        d.DEFINE_enum,
        "bad_images",
        "fail",
        "An image file that cannot be read or decoded: fail (the run stops before training, "
        "naming it) or skip (skipped files are counted and logged).",
        fv,
        enum_values=list(config_lib.BAD_IMAGES),
    )
    _define(
        d.DEFINE_enum,
        "resize",
        "squash",
        "How images become --image_size squares: squash (ignore the aspect ratio), crop (scale "
        "the short side, crop the centre) or pad (scale the long side, pad with black).",
        fv,
        enum_values=list(config_lib.RESIZE_MODES),
    )
    _define(d.DEFINE_integer, "image_size", 32, "Images are resized to this square size.", fv)
    _define(d.DEFINE_integer, "batch_size", 32, "Global training batch size.", fv)
    _define(d.DEFINE_integer, "eval_batch_size", 0, "Evaluation batch size; 0: --batch_size.", fv)
    # Model.
    _define(
        d.DEFINE_string,
        "backbone",
        "small_cnn",
        "A keras.applications class name "
        "(MobileNetV2, EfficientNetB0, ResNet50, ...), small_cnn, or a .keras file that maps "
        "RGB pixels in [0, 255] to features.",
        fv,
    )
    _define(
        d.DEFINE_string,
        "weights",
        "",
        "Backbone weights: imagenet, none, or a weights "
        "file; empty: imagenet for keras.applications, none for small_cnn, the file's own "
        "for a .keras backbone.",
        fv,
    )
    _define(d.DEFINE_float, "dropout", 0.2, "Dropout rate before the head's Dense layer.", fv)
    _define(
        d.DEFINE_string,
        "augment",
        "",
        "Training augmentation, e.g. "
        "flip,rotate:0.1,zoom:0.1,contrast:0.2,translate:0.1,crop:0.2 (a random square of "
        "0.8..1 of the side, resized back); empty: none.",
        fv,
    )
    _define(
        d.DEFINE_bool,
        "unsafe_deserialization",
        False,
        "Allow a .keras backbone to run "
        "code (Lambda layers) when loaded. Only for files you trust.",
        fv,
    )
    _define(
        d.DEFINE_string,
        "init_checkpoint",
        "",
        "Warm start: load the backbone's weights from another tlloop run (its workdir: the "
        "best checkpoint, else the latest), a checkpoint directory or a checkpoint path; a "
        "report lists matched, unmatched and missing variables. Not applied when resuming.",
        fv,
    )
    _define(
        d.DEFINE_string,
        "mixed_precision",
        "",
        "float16 (with dynamic loss scaling) or bfloat16: compute in it, keep weights and the "
        "head's output in float32 (keras.applications and small_cnn backbones; a .keras "
        "backbone keeps the dtypes it was saved with); empty: float32.",
        fv,
    )
    # Phases.
    _define(d.DEFINE_integer, "head_epochs", 5, "Epochs of the head phase (backbone frozen).", fv)
    _define(d.DEFINE_float, "head_lr", 1e-3, "Learning rate of the head phase.", fv)
    _define(d.DEFINE_integer, "finetune_epochs", 5, "Epochs of the fine-tune phase.", fv)
    _define(d.DEFINE_float, "finetune_lr", 1e-5, "Learning rate of the fine-tune phase.", fv)
    _define(
        d.DEFINE_string,
        "unfreeze",
        "all",
        "Backbone layers that train in fine-tune: all, none, top:N (the last N layers with "
        "weights, BatchNorm not counted), blocks:N (the last N blocks of a keras.applications "
        "family), from:LAYER_NAME (that layer and all after it), regex:PATTERN (layers whose "
        "name matches).",
        fv,
    )
    _define(
        d.DEFINE_string,
        "unfreeze_schedule",
        "",
        "gradual:K: in fine-tune, epoch e trains only the top K x (e + 1) blocks (blocks:N) or "
        "layers of --unfreeze (ULMFiT); empty: all at once.",
        fv,
    )
    _define(
        d.DEFINE_enum,
        "bn_mode",
        "frozen",
        "Backbone BatchNorm in fine-tune: frozen "
        "(inference mode, statistics untouched) or train (the backbone runs with "
        "training=True: batch statistics, moving averages updated).",
        fv,
        enum_values=list(config_lib.BN_MODES),
    )
    # How each phase trains.
    _define(
        d.DEFINE_enum,
        "optimizer",
        "adam",
        "Optimizer of every phase (a fresh one per phase): adam, adamw, sgd (momentum 0.9), lamb.",
        fv,
        enum_values=list(config_lib.OPTIMIZERS),
    )
    _define(
        d.DEFINE_float,
        "weight_decay",
        0.0,
        "Decoupled weight decay; never applied to biases or BatchNorm weights; 0: none.",
        fv,
    )
    _define(
        d.DEFINE_enum,
        "lr_schedule",
        "constant",
        "Learning rate over each phase's optimizer steps: constant, cosine (to 0), linear (to "
        "0), step (x0.1 at 50% and 75%).",
        fv,
        enum_values=list(config_lib.LR_SCHEDULES),
    )
    _define(d.DEFINE_integer, "warmup_steps", 0, "Linear warmup from 0, optimizer steps.", fv)
    _define(d.DEFINE_integer, "warmup_epochs", 0, "Linear warmup from 0, in epochs.", fv)
    _define(
        d.DEFINE_float,
        "clip_grad_norm",
        0.0,
        "Clip the global batch's gradient to this global norm; 0: off.",
        fv,
    )
    _define(
        d.DEFINE_integer,
        "grad_accum_steps",
        1,
        "Batches per optimizer step (gradients averaged): a k-times larger effective batch.",
        fv,
    )
    _define(d.DEFINE_float, "label_smoothing", 0.0, "Label smoothing of the training loss.", fv)
    _define(
        d.DEFINE_float,
        "layer_lr_decay",
        0.0,
        "Discriminative learning rates: the top backbone block (or layer) trains at R x the "
        "phase's rate, the next at R^2, ...; the head at the rate; 0: off.",
        fv,
    )
    _define(
        d.DEFINE_float,
        "ema_decay",
        0.0,
        "Keep exponential moving averages of the weights (e.g. 0.999); evaluations, the best "
        "checkpoint and the export use them; 0: off.",
        fv,
    )
    _define(
        d.DEFINE_string,
        "class_weights",
        "",
        "auto: weigh each training example's loss inversely to its class's frequency.",
        fv,
    )
    # Distribution.
    _define(
        d.DEFINE_enum,
        "strategy",
        "auto",
        "auto (mirrored when more than one GPU is "
        "visible, else default), default, one_device, mirrored, or multi_worker (the cluster "
        "from TF_CONFIG).",
        fv,
        enum_values=list(config_lib.STRATEGIES),
    )
    _define(
        d.DEFINE_list,
        "devices",
        [],
        "Devices for mirrored or one_device, e.g. /gpu:0,/gpu:1; empty: every GPU, or the CPU(s).",
        fv,
    )
    _define(
        d.DEFINE_integer,
        "logical_devices",
        0,
        "Split the first GPU (or the CPU) into this "
        "many logical devices before the strategy is made; 0: no split.",
        fv,
    )
    _define(
        d.DEFINE_integer,
        "logical_device_memory_mb",
        2048,
        "Memory of each logical GPU made by --logical_devices.",
        fv,
    )
    _define(
        d.DEFINE_float,
        "cluster_timeout_secs",
        300,
        "multi_worker: give up, with an "
        "error, if the cluster of TF_CONFIG is not up after this many seconds.",
        fv,
    )
    # What is logged.
    _define(
        d.DEFINE_integer,
        "log_every_steps",
        10,
        "Write train loss, accuracy, learning "
        "rate and gradient norm every this many global steps; 0: never.",
        fv,
    )
    _define(
        d.DEFINE_integer,
        "histogram_every_steps",
        0,
        "Write histograms of trainable "
        "weights and their gradients every this many global steps; 0: never.",
        fv,
    )
    _define(
        d.DEFINE_string,
        "profile_steps",
        "",
        "START,END: trace global steps START to END "
        "with the TensorFlow profiler (TensorBoard's profile tab).",
        fv,
    )
    _define(d.DEFINE_bool, "quiet", False, "No progress bar: log lines only.", fv)
    _define(
        d.DEFINE_bool,
        "summaries",
        True,
        "Write TensorBoard summaries and metrics.jsonl; "
        "--nosummaries writes neither (results.json and the export are still written).",
        fv,
    )
    # Checkpoints.
    _define(
        d.DEFINE_integer,
        "checkpoint_every_steps",
        0,
        "Save a checkpoint every this many "
        "global steps; 0: only by time, at phase starts, at the end and on SIGTERM.",
        fv,
    )
    _define(
        d.DEFINE_float,
        "checkpoint_every_secs",
        600,
        "Save a checkpoint when this many "
        "seconds have passed since the last (single-host runs); 0: never by time.",
        fv,
    )
    _define(d.DEFINE_integer, "keep_checkpoints", 3, "Checkpoints kept in WORKDIR/checkpoints.", fv)
    _define(
        d.DEFINE_string,
        "best_metric",
        "accuracy",
        "Evaluation metric whose best value is kept in WORKDIR/checkpoints/best: accuracy or "
        "loss, optionally :max or :min.",
        fv,
    )
    _define(
        d.DEFINE_integer,
        "early_stopping_patience",
        0,
        "End a phase after this many evaluations without a better --best_metric than the "
        "phase's best so far; 0: never.",
        fv,
    )
    _define(
        d.DEFINE_enum,
        "export",
        "best",
        "Weights to export at the end: best (of --best_metric) or last.",
        fv,
        enum_values=list(config_lib.EXPORTS),
    )
    _define(
        d.DEFINE_enum,
        "nan_policy",
        "stop",
        "A NaN or Inf loss or gradient: stop (exit with an error naming the step; no "
        "checkpoint is written over the last good one) or skip_step (no update; counted).",
        fv,
        enum_values=list(config_lib.NAN_POLICIES),
    )
    _define(
        d.DEFINE_bool,
        "deterministic",
        False,
        "Deterministic ops "
        "(tf.config.experimental.enable_op_determinism): with the same seed, a run killed "
        "and resumed ends bit-identical to one that was not.",
        fv,
    )
    # Compilation.
    _define(
        d.DEFINE_bool,
        "jit_compile",
        False,
        "Compile the loss and gradient computation with XLA.",
        fv,
    )
    _define(
        d.DEFINE_enum,
        "feature_cache",
        "auto",
        "auto: a phase with the backbone frozen and no augmentation computes backbone features "
        "once and trains the head on them (logged per phase); off: never.",
        fv,
        enum_values=["auto", "off"],
    )
    _define(
        d.DEFINE_integer,
        "steps_per_loop",
        1,
        "Train steps per host call (a tf.while_loop inside one tf.function call).",
        fv,
    )


def to_config(flag_values: flags.FlagValues) -> config_lib.RunConfig:
    """The RunConfig the parsed `flag_values` describe; raises ConfigError naming a bad flag."""
    f = flag_values
    data = config_lib.DataConfig(
        dataset=f.dataset,
        data_dir=f.data_dir,
        val_dir=f.val_dir,
        train_files=f.train_files,
        val_files=f.val_files,
        image_feature=f.image_feature,
        label_feature=f.label_feature,
        tfds_dir=f.tfds_dir,
        val_split=f.val_split,
        classes=config_lib.parse_classes(f.classes),
        train_examples_per_class=f.train_examples_per_class,
        image_size=f.image_size,
        batch_size=f.batch_size,
        eval_batch_size=f.eval_batch_size,
        seed=f.seed,
        bad_images=f.bad_images,
        resize=f.resize,
    )
    model = config_lib.ModelConfig(
        backbone=f.backbone,
        weights=f.weights,
        image_size=f.image_size,
        dropout=f.dropout,
        augment=config_lib.parse_augment(f.augment),
        unsafe_deserialization=f.unsafe_deserialization,
        init_checkpoint=f.init_checkpoint,
        mixed_precision=f.mixed_precision,
    )
    phases = (
        config_lib.PhaseConfig("head", f.head_epochs, f.head_lr, config_lib.Unfreeze("none")),
        config_lib.PhaseConfig(
            "finetune",
            f.finetune_epochs,
            f.finetune_lr,
            config_lib.Unfreeze.parse(f.unfreeze),
            bn_mode=f.bn_mode,
            gradual=config_lib.parse_unfreeze_schedule(f.unfreeze_schedule),
        ),
    )
    training = config_lib.TrainingConfig(
        optimizer=f.optimizer,
        weight_decay=f.weight_decay,
        lr_schedule=f.lr_schedule,
        warmup_steps=f.warmup_steps,
        warmup_epochs=f.warmup_epochs,
        clip_grad_norm=f.clip_grad_norm,
        grad_accum_steps=f.grad_accum_steps,
        label_smoothing=f.label_smoothing,
        class_weights=f.class_weights,
        ema_decay=f.ema_decay,
        layer_lr_decay=f.layer_lr_decay,
    )
    return config_lib.RunConfig(
        workdir=f.workdir,
        data=data,
        model=model,
        phases=phases,
        training=training,
        distribute=config_lib.DistributeConfig(
            strategy=f.strategy,
            devices=tuple(f.devices),
            logical_devices=f.logical_devices,
            logical_device_memory_mb=f.logical_device_memory_mb,
            cluster_timeout_secs=f.cluster_timeout_secs,
        ),
        logging=config_lib.LoggingConfig(
            log_every_steps=f.log_every_steps,
            histogram_every_steps=f.histogram_every_steps,
            profile_steps=config_lib.parse_profile_steps(f.profile_steps),
            quiet=f.quiet,
            summaries=f.summaries,
        ),
        checkpoint=config_lib.CheckpointConfig(
            every_steps=f.checkpoint_every_steps,
            every_secs=f.checkpoint_every_secs,
            keep=f.keep_checkpoints,
            best_metric=config_lib.BestMetric.parse(f.best_metric),
            early_stopping_patience=f.early_stopping_patience,
            export=f.export,
        ),
        deterministic=f.deterministic,
        jit_compile=f.jit_compile,
        steps_per_loop=f.steps_per_loop,
        seed=f.seed,
        overwrite=f.overwrite,
        nan_policy=f.nan_policy,
        feature_cache=f.feature_cache,
    )


def run_flags(flags_file: str, overrides: flags.FlagValues | None = None) -> flags.FlagValues:
    """The flags of a past run, read from its flags.txt, with the `overrides` given on the
    command line (flags present there) applied on top. Raises ConfigError naming the file."""
    values = flags.FlagValues()
    define_flags(values)
    try:
        values(["tlloop", f"--flagfile={flags_file}"])
    except (flags.Error, OSError) as error:
        raise config_lib.ConfigError(
            f"{flags_file!r}: not a readable tlloop flags file ({error}); accepted: the "
            "flags.txt a tlloop run writes into its workdir"
        ) from None
    if overrides is not None:
        for name in FLAG_NAMES:
            if name in overrides and overrides[name].present:
                values[name].value = overrides[name].value
    return values


def flags_text(flag_values: flags.FlagValues) -> str:
    """The resolved tlloop flags, one per line: a flagfile that re-runs the same experiment."""
    lines = ["# Resolved flags of this run; re-run with --flagfile=flags.txt"]
    for name in FLAG_NAMES:
        serialized = flag_values[name].serialize()
        if serialized:
            lines.append(serialized)
    return "\n".join(lines) + "\n"
