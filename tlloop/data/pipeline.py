"""The command line's data: a source's images decoded, resized and held as Examples.

Image files are decoded and resized once, in parallel, when the data is loaded: an unreadable
file is found (and named, or skipped with --bad_images=skip) before anything is written, and
the decoded examples are kept in memory as uint8 (`InMemoryExamples`, which read them in the
seeded training order and pad the evaluation's last batch: see `tlloop.data.examples`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import numpy as np
import tensorflow as tf
from absl import logging

from tlloop.config import ConfigError, DataConfig
from tlloop.data.examples import InMemoryExamples
from tlloop.data.sources import IMAGE_EXTENSIONS, Split, load_source

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class Data:
    """A source's examples, ready for training and evaluation.

    `train` yields (images float32 [B, S, S, 3] in [0, 255], labels int32 [B]) forever, in
    the order of `train_examples` (see `examples.InMemoryExamples`); `eval` yields (images,
    labels, weights float32 [B]) for `eval_steps` batches, the weights summing to `eval_size`.
    Loaded for evaluation only, `train_examples` is None.
    """

    class_names: tuple[str, ...]
    train_examples: InMemoryExamples | None
    eval_examples: InMemoryExamples
    batch_size: int
    eval_batch_size: int
    seed: int = 0
    skipped_files: tuple[str, ...] = ()  # unreadable image files left out (--bad_images=skip)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train_size(self) -> int:
        return self.train_examples.size if self.train_examples else 0

    @property
    def eval_size(self) -> int:
        return self.eval_examples.size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_size / self.batch_size)

    @property
    def eval_steps(self) -> int:
        return self.eval_examples.eval_steps(self.eval_batch_size)

    @functools.cached_property
    def train(self) -> tf.data.Dataset:
        return self.train_examples.training_batches(self.batch_size, self.seed)

    @functools.cached_property
    def eval(self) -> tf.data.Dataset:
        return self.eval_examples.eval_batches(self.eval_batch_size)

    @property
    def class_counts(self) -> tuple[int, ...]:
        """Training examples per class, in label order."""
        return tuple(int(n) for n in self.train_examples.label_counts(self.num_classes))


def load_data(config: DataConfig, *, evaluation_only: bool = False) -> Data:
    """Loads the source `config` names, decoded and resized, into memory (only the evaluation
    split, and no training image decoded, with `evaluation_only`)."""
    source = load_source(config)
    skip = config.bad_images == "skip"
    eval_split, skipped = decode_files(
        source.eval, config.image_size, skip=skip, resize=config.resize
    )
    _check_every_class(eval_split, source.class_names, skipped)
    train_examples = None
    if not evaluation_only:
        train_split, train_skipped = decode_files(
            source.train, config.image_size, skip=skip, resize=config.resize
        )
        skipped = train_skipped + skipped
        _check_every_class(train_split, source.class_names, skipped)
        train_examples = in_memory(train_split, config.image_size, config.resize)
    return Data(
        class_names=source.class_names,
        train_examples=train_examples,
        eval_examples=in_memory(eval_split, config.image_size, config.resize),
        batch_size=config.batch_size,
        eval_batch_size=config.eval_batch,
        seed=config.seed,
        skipped_files=skipped,
    )


def in_memory(split: Split, image_size: int, resize: str = "squash") -> InMemoryExamples:
    """The decoded images of `split` (uint8 arrays) as examples of float32 `image_size`
    squares: kept as uint8 when already that size, else resized once, as float32."""
    images = split.images
    if images.shape[1:3] == (image_size, image_size):
        return InMemoryExamples(images, split.labels, transform=_to_float)
    resized = (
        np.concatenate(
            [
                resize_images(images[i : i + 512], image_size, resize).numpy()
                for i in range(0, len(images), 512)
            ]
        )
        if len(images)
        else np.zeros((0, image_size, image_size, 3), np.float32)
    )
    return InMemoryExamples(resized, split.labels)


def _to_float(images):
    return tf.cast(images, tf.float32)


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


def padded_eval_dataset(
    split: Split, image_size: int, batch_size: int, resize: str = "squash"
) -> tf.data.Dataset:
    """(images, labels, weights) full batches of `split`; padding examples have weight 0."""
    return in_memory(split, image_size, resize).eval_batches(batch_size)


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
