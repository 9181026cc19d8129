"""tf.data pipelines: decode, resize, cache, shuffle, batch.

Image files are decoded and resized once, in parallel, when the data is loaded: an unreadable
file is found (and named, or skipped with --bad_images=skip) before anything is written, and
the decoded examples are kept in memory as uint8, a quarter of the float32 cache's size.
Training batches always have the full static batch shape (the stream repeats before it is
batched, so no partial batch retraces the step). Evaluation pads its last batch to full size
with examples of weight 0, so every example counts exactly once and none twice.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import tensorflow as tf
from absl import logging

from tlloop.config import ConfigError, DataConfig
from tlloop.data.sources import IMAGE_EXTENSIONS, Split, load_source

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class Data:
    """Ready pipelines and their sizes.

    `train` yields (images float32 [B, S, S, 3] in [0, 255], labels int32 [B]) forever;
    `eval` yields (images, labels, weights float32 [B]) for `eval_steps` batches, and the
    weights sum to `eval_size`. Loaded for evaluation only, `train` and `preview` are None.
    """

    class_names: tuple[str, ...]
    train: tf.data.Dataset | None
    eval: tf.data.Dataset
    preview: tf.Tensor | None  # the first (up to) 16 training images, unshuffled
    train_size: int
    eval_size: int
    steps_per_epoch: int
    eval_steps: int
    skipped_files: tuple[str, ...] = ()  # unreadable image files left out (--bad_images=skip)
    class_counts: tuple[int, ...] = ()  # training examples per class, in label order
    train_examples: tf.data.Dataset | None = None  # (image, label), unshuffled, cached
    batch_size: int = 0
    seed: int = 0

    def stream(self, examples: tf.data.Dataset) -> tf.data.Dataset:
        """`examples` (as many, in the order of `train_examples`) as the training stream:
        shuffled, repeated, batched exactly as `train` is. tf.data's seeded shuffle depends
        only on the seed and the element count, so a stream of per-example features lines up
        batch for batch with the stream of their images."""
        return training_stream(examples, self.train_size, self.seed, self.batch_size)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_data(config: DataConfig, *, evaluation_only: bool = False) -> Data:
    """Loads the source `config` names and builds its train and eval pipelines (only the
    eval pipeline, and no training image decoded, with `evaluation_only`)."""
    source = load_source(config)
    skip = config.bad_images == "skip"
    eval_split, skipped = decode_files(
        source.eval, config.image_size, skip=skip, resize=config.resize
    )
    _check_every_class(eval_split, source.class_names, skipped)
    evaluation = padded_eval_dataset(
        eval_split, config.image_size, config.eval_batch, config.resize
    )
    data = Data(
        class_names=source.class_names,
        train=None,
        eval=evaluation,
        preview=None,
        train_size=0,
        eval_size=len(eval_split),
        steps_per_epoch=0,
        eval_steps=math.ceil(len(eval_split) / config.eval_batch),
        skipped_files=skipped,
    )
    if evaluation_only:
        return data
    train_split, train_skipped = decode_files(
        source.train, config.image_size, skip=skip, resize=config.resize
    )
    skipped = train_skipped + skipped
    _check_every_class(train_split, source.class_names, skipped)
    examples = images_dataset(train_split, config.image_size, config.resize).cache()
    preview = next(iter(examples.map(lambda image, label: image).batch(16)))
    train = training_stream(examples, len(train_split), config.seed, config.batch_size)
    return dataclasses.replace(
        data,
        train=train,
        train_examples=examples,
        batch_size=config.batch_size,
        seed=config.seed,
        preview=preview,
        train_size=len(train_split),
        steps_per_epoch=math.ceil(len(train_split) / config.batch_size),
        skipped_files=skipped,
        class_counts=tuple(
            int(n) for n in np.bincount(train_split.labels, minlength=len(source.class_names))
        ),
    )


def training_stream(examples: tf.data.Dataset, size: int, seed: int, batch: int):
    """Shuffled with `seed`, reshuffled every pass, repeated, in full batches of `batch`."""
    return (
        examples.shuffle(size, seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch, drop_remainder=True)
        .prefetch(AUTOTUNE)
    )


def decode_files(
    split: Split, image_size: int, *, skip: bool, resize: str = "squash"
) -> tuple[Split, tuple[str, ...]]:
    """`split` with its image files (or encoded images) decoded and resized to uint8 arrays,
    and the files (or record origins) skipped.

    One that cannot be read or decoded raises ConfigError naming it, or with `skip` is left
    out (logged, and returned). A split that already holds arrays is returned as it is.
    """
    if isinstance(split.images, np.ndarray):
        return split, ()
    items = split.images
    if not items:
        return Split(np.zeros((0, image_size, image_size, 3), np.uint8), split.labels), ()
    files = isinstance(items[0], str)
    decode = _decode_file if files else _decode_bytes
    origins = items if files else split.origins or [f"example {i}" for i in range(len(items))]

    def load(index, item):
        image = tf.round(_resize(decode(item), image_size, resize))
        return index, tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8)

    decoded = (
        tf.data.Dataset.from_tensor_slices((np.arange(len(items)), items))
        .map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
        .ignore_errors()  # a bad image drops out; which ones is found from the indices
        .batch(256)
    )
    indices, images = [], []
    for index, pixels in decoded:
        indices.append(index.numpy())
        images.append(pixels.numpy())
    kept = np.concatenate(indices) if indices else np.zeros((0,), np.int64)
    bad = sorted(set(range(len(items))) - set(kept.tolist()))
    skipped = tuple(origins[i] for i in bad)
    if skipped and not skip:
        try:
            if files:
                read_image(skipped[0])
            else:
                _decode_bytes(tf.constant(items[bad[0]]))
            problem = f"image {skipped[0]!r}: cannot be decoded"
        except ConfigError as error:
            problem = str(error)
        except (tf.errors.OpError, ValueError) as error:
            problem = (
                f"image {skipped[0]!r}: cannot be decoded ({_reason(error)}); accepted: "
                f"{', '.join(e[1:].upper() for e in IMAGE_EXTENSIONS)} images"
            )
        more = f" ({len(skipped) - 1} more unreadable images)" if len(skipped) > 1 else ""
        raise ConfigError(f"{problem}, or --bad_images=skip to leave them out{more}")
    if skipped:
        logging.warning(
            "--bad_images=skip: skipped %d unreadable image file(s) of %d: %s",
            len(skipped),
            len(items),
            ", ".join(skipped),
        )
    pixels = (
        np.concatenate(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    )
    return Split(pixels, split.labels[kept]), skipped


def read_image(path: str) -> np.ndarray:
    """The image file `path` as uint8 (height, width, 3); the first frame of an animated GIF.

    Raises ConfigError naming the file, with TensorFlow's reason, if it cannot be read or
    decoded.
    """
    try:
        return _decode_file(tf.constant(path)).numpy()
    except (tf.errors.OpError, ValueError) as error:
        raise ConfigError(
            f"image file {path!r}: cannot be read or decoded ({_reason(error)}); accepted: "
            f"{', '.join(e[1:].upper() for e in IMAGE_EXTENSIONS)} images"
        ) from None


def _reason(error: Exception) -> str:
    """TensorFlow's reason for an error, without the op and device names around it."""
    message = getattr(error, "message", str(error))
    noise = r"\{\{[^}]*\}\}|\[Op:[^\]]*\]|\bname:\s*$"
    return re.sub(noise, "", " ".join(message.split())).strip()[:160]


def _check_every_class(split: Split, names: tuple[str, ...], skipped: tuple[str, ...]) -> None:
    """Raises ConfigError if skipping unreadable files emptied a class."""
    empty = [name for label, name in enumerate(names) if not np.any(split.labels == label)]
    if empty and skipped:
        raise ConfigError(
            f"class {empty[0]!r}: no readable images left after skipping {len(skipped)} "
            "unreadable file(s); accepted: at least one readable image per class in each split"
        )


def images_dataset(split: Split, image_size: int, resize: str = "squash") -> tf.data.Dataset:
    """(image float32 [S, S, 3] in [0, 255], label int32) pairs, in the split's order.

    The split holds arrays (see `decode_files`).
    """
    pixels = tf.data.Dataset.from_tensor_slices(split.images)
    pixels = pixels.map(
        lambda image: _resize(image, image_size, resize), num_parallel_calls=AUTOTUNE
    )
    labels = tf.data.Dataset.from_tensor_slices(split.labels)
    return tf.data.Dataset.zip(pixels, labels)


def padded_eval_dataset(
    split: Split, image_size: int, batch_size: int, resize: str = "squash"
) -> tf.data.Dataset:
    """(images, labels, weights) full batches; padding examples have weight 0."""
    real = images_dataset(split, image_size, resize).map(lambda x, y: (x, y, tf.constant(1.0)))
    padding = (-len(split)) % batch_size
    filler = tf.data.Dataset.from_tensors(
        (tf.zeros((image_size, image_size, 3)), tf.constant(0, tf.int32), tf.constant(0.0))
    ).repeat(padding)
    return (
        real.concatenate(filler).batch(batch_size, drop_remainder=True).cache().prefetch(AUTOTUNE)
    )


def _decode_file(path: tf.Tensor) -> tf.Tensor:
    return _decode_bytes(tf.io.read_file(path))


def _decode_bytes(data: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return tf.ensure_shape(image, (None, None, 3))


def resize_images(images: tf.Tensor, size: int, mode: str = "squash") -> tf.Tensor:
    """Float32 `size` x `size` images from an image (H, W, 3) or a batch (B, H, W, 3).

    "squash" resizes to the square, ignoring the aspect ratio; "crop" scales the short side to
    `size` and crops the centre; "pad" scales the long side to `size` and pads with black.
    Bilinear throughout; the training pipeline and the exported SavedModel both use this.
    """
    images = tf.cast(images, tf.float32)
    if mode == "pad":
        return tf.image.resize_with_pad(images, size, size)
    if mode == "crop":
        shape = tf.cast(tf.shape(images)[-3:-1], tf.float32)
        scaled = tf.cast(tf.math.ceil(shape * (size / tf.reduce_min(shape))), tf.int32)
        return tf.image.resize_with_crop_or_pad(tf.image.resize(images, scaled), size, size)
    return tf.image.resize(images, (size, size))


def _resize(image: tf.Tensor, image_size: int, mode: str = "squash") -> tf.Tensor:
    image = resize_images(image, image_size, mode)
    return tf.ensure_shape(image, (image_size, image_size, 3))
