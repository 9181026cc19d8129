"""Images as every path reads them: which files are images, decoding, resizing, the errors.

The training pipelines (in memory or streamed), the exported SavedModel and the TFLite model
all resize with `resize_images`, and every stored or streamed image is made by
`decode_resized`, so one image gives the same pixels whichever path reads it.
"""

from __future__ import annotations

import re

import numpy as np
import tensorflow as tf

from tlloop.config import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
ACCEPTED_IMAGES = f"{', '.join(e[1:].upper() for e in IMAGE_EXTENSIONS)} images"
# The first bytes of each format tf.io.decode_image reads.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
HEAD_BYTES = 8


def looks_like_image(head: bytes | None) -> bool:
    """True if `head` (an image's first `HEAD_BYTES` bytes) starts like a format tlloop
    decodes: the cheap check made before training on data that streams."""
    return bool(head) and head.startswith(_SIGNATURES)


def decode(encoded: tf.Tensor) -> tf.Tensor:
    """An encoded image as uint8 (height, width, 3); the first frame of an animated GIF."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.ensure_shape(image, (None, None, 3))


def decode_resized(encoded: tf.Tensor, size: int, resize: str) -> tf.Tensor:
    """An encoded image as uint8 (size, size, 3), as every path stores and reads it: decoded,
    resized as `resize` says, rounded."""
    pixels = tf.ensure_shape(resize_images(decode(encoded), size, resize), (size, size, 3))
    return tf.cast(tf.clip_by_value(tf.round(pixels), 0, 255), tf.uint8)


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


def read_image(path: str) -> np.ndarray:
    """The image file `path` as uint8 (height, width, 3); the first frame of an animated GIF.

    Raises ConfigError naming the file, with TensorFlow's reason, if it cannot be read or
    decoded.
    """
    try:
        return decode(tf.io.read_file(path)).numpy()
    except (tf.errors.OpError, ValueError) as error:
        raise ConfigError(
            f"image file {path!r}: cannot be read or decoded ({reason(error)}); accepted: "
            f"{ACCEPTED_IMAGES}"
        ) from None


def reason(error: Exception) -> str:
    """TensorFlow's reason for an error, without the op and device names around it."""
    message = getattr(error, "message", str(error))
    noise = r"\{\{[^}]*\}\}|\[Op:[^\]]*\]|\bname:\s*$"
    return re.sub(noise, "", " ".join(message.split())).strip()[:160]
