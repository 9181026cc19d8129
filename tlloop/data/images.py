"""Images as every path reads them: which files are images, decoding, resizing, the errors.

Each image is looked at once before training (`scan_file`, `scan_bytes`): its first bytes say
its format, whether TensorFlow can decode it, and its *form* (an int32): the EXIF orientation
of a JPEG (read from its APP1 segment), whether it has transparency (a PNG with alpha or a
tRNS chunk, a WebP with alpha) and whether it is an 8-bit palette BMP (TensorFlow decodes those
as their palette indices). `decode` then applies the form in the TensorFlow graph: the palette
looked up, the alpha composited on `BACKGROUND`, the orientation undone, as Pillow's
`ImageOps.exif_transpose` and `convert("RGB")` show the image.

The training pipelines (in memory or streamed), the exported SavedModel and the TFLite model
all resize with `resize_images`, and every stored or streamed image is made by
`decode_resized`, so one image gives the same pixels whichever path reads it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from tlloop.errors import ConfigError

# The file name extensions of the formats tf.io.decode_image reads (JPEG XL aside: no file
# of it was at hand to test it); the format itself is found from the file's first bytes.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
ACCEPTED_IMAGES = f"{', '.join(e[1:].upper() for e in IMAGE_EXTENSIONS)} images"
# Kinds that are images TensorFlow does not decode, by extension: listed as skipped, saying so.
UNDECODED_KINDS = {
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".heic": "HEIC",
    ".heif": "HEIF",
    ".avif": "AVIF",
    ".psd": "Photoshop",
    ".svg": "SVG",
    ".ico": "ICO",
    ".raw": "camera raw",
    ".cr2": "camera raw",
    ".nef": "camera raw",
    ".dng": "camera raw",
}
# Transparent pixels are composited on white: what an image viewer shows on a page.
BACKGROUND = 255
# The first bytes kept per TFRecord image for the check before training (records.py): enough
# for the PNG colour type, a BMP's depth and, most often, a JPEG's EXIF orientation.
HEAD_BYTES = 256

# Raised whenever decoding gives other pixels for the same file: it names data cache files.
# 2: EXIF orientation, palettes and transparency applied.
DECODE_VERSION = 2
# The form of an image (see the module's doc): bits 0-3 the EXIF orientation (0: as
# stored), bit 4 transparency, bit 5 an 8-bit palette BMP, bits 8- where its palette starts.
ALPHA, PALETTE, PALETTE_SHIFT = 16, 32, 8


def shown(path: str) -> str:
    """`path` printable: bytes of a name that are not UTF-8 as \\x escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def scan_file(path: str) -> tuple[int, str]:
    """(form, problem) of the image file `path`: its form (module doc) and, when TensorFlow
    cannot decode it, why ("" otherwise), found from a few of its bytes."""
    try:
        with open(path, "rb") as file:

            def read(offset: int, count: int) -> bytes:
                file.seek(offset)
                return file.read(count)

            return _scan(read)
    except OSError as error:
        return 0, error.strerror or str(error)


def scan_bytes(data: bytes) -> tuple[int, str]:
    """(form, problem) of an encoded image in memory, as `scan_file` (or of the first bytes
    of one: what lies past them is taken as absent)."""
    return _scan(lambda offset, count: data[offset : offset + count])


def _scan(read: Callable[[int, int], bytes]) -> tuple[int, str]:
    head = read(0, 32)
    if not head:
        return 0, "an empty file"
    if head.startswith(b"\xff\xd8\xff"):
        return _jpeg_orientation(read), ""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return (ALPHA if _png_alpha(head, read) else 0), ""
    if head.startswith((b"GIF87a", b"GIF89a")):
        return 0, ""
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return (ALPHA if _webp_alpha(head) else 0), ""
    if head.startswith(b"BM"):
        return _bmp(head)
    if head.startswith((b"II*\0", b"MM\0*")):
        return 0, "a TIFF image, which TensorFlow does not decode"
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("latin-1")
        return 0, f"an ISO media file ({brand!r}: HEIC, AVIF or video), not decoded by TensorFlow"
    return 0, f"not an image format tlloop reads (first bytes {head[:8]!r})"


def _jpeg_orientation(read: Callable[[int, int], bytes]) -> int:
    """The EXIF orientation (2-8) in a JPEG's APP1 segment, 0 if it has none (or 1: as
    stored): the segments before the image data are walked by their lengths, so only a few
    bytes are read."""
    position = 2
    for _ in range(64):
        marker = read(position, 4)
        if len(marker) < 4 or marker[0] != 0xFF:
            return 0
        if marker[1] == 0xFF:  # a fill byte
            position += 1
            continue
        if marker[1] in (0xDA, 0xD9):  # start of scan, end of image: no EXIF before
            return 0
        length = int.from_bytes(marker[2:4], "big")
        if marker[1] == 0xE1 and read(position + 4, 6) == b"Exif\0\0":
            return _tiff_orientation(read, position + 10)
        position += 2 + length
    return 0


def _tiff_orientation(read: Callable[[int, int], bytes], start: int) -> int:
    """The Orientation tag (0x0112) of the first IFD of the TIFF structure at `start`."""
    header = read(start, 8)
    order = {b"II": "little", b"MM": "big"}.get(header[:2])
    if order is None or len(header) < 8:
        return 0
    ifd = start + int.from_bytes(header[4:8], order)
    count = int.from_bytes(read(ifd, 2), order)
    entries = read(ifd + 2, 12 * min(count, 256))
    for k in range(0, len(entries) - 11, 12):
        if int.from_bytes(entries[k : k + 2], order) == 0x0112:
            value = int.from_bytes(entries[k + 8 : k + 10], order)
            return value if 2 <= value <= 8 else 0  # 1: as stored, as no tag
    return 0


def _png_alpha(head: bytes, read: Callable[[int, int], bytes]) -> bool:
    """Whether a PNG has transparency: a colour type with alpha, or a tRNS chunk."""
    if len(head) > 25 and head[25] in (4, 6):
        return True
    position = 8
    for _ in range(64):  # the chunks before the image data
        chunk = read(position, 8)
        if len(chunk) < 8 or chunk[4:8] in (b"IDAT", b"IEND"):
            return False
        if chunk[4:8] == b"tRNS":
            return True
        position += 12 + int.from_bytes(chunk[:4], "big")
    return False


def _webp_alpha(head: bytes) -> bool:
    """Whether a WebP has alpha: the VP8X flag, or the lossless header's alpha bit."""
    if head[12:16] == b"VP8X":
        return bool(head[20] & 0x10)
    if head[12:16] == b"VP8L" and len(head) >= 25:
        return bool(int.from_bytes(head[21:25], "little") >> 28 & 1)
    return False


def _bmp(head: bytes) -> tuple[int, str]:
    """(form, problem) of a BMP: the depths and encodings TensorFlow decodes."""
    if len(head) < 32:
        return 0, "a BMP cut short"
    header = int.from_bytes(head[14:18], "little")
    if header < 40:
        return 0, "an OS/2 BMP, which TensorFlow does not decode"
    depth = int.from_bytes(head[28:30], "little")
    compression = int.from_bytes(head[30:32], "little")
    if compression not in (0, 3):
        return 0, "a compressed (RLE) BMP, which TensorFlow does not decode"
    if depth not in (8, 24, 32):
        return 0, f"a {depth}-bit BMP; TensorFlow decodes 8-, 24- and 32-bit BMPs"
    if depth == 8:  # decoded as palette indices: the palette follows the headers
        return PALETTE | (14 + header) << PALETTE_SHIFT, ""
    return 0, ""


def decode(encoded: tf.Tensor, form: tf.Tensor | int | None = None) -> tf.Tensor:
    """An encoded image as uint8 (height, width, 3), as its `form` (from `scan_file` or
    `scan_bytes`) says to show it; the first frame of an animated GIF. With no form (None:
    images all known to be of form 0) the graph holds no control flow (a `switch_case` in a
    `tf.data` map costs about a fifth of a small JPEG's decoding); the pixels are the same as
    with form 0."""

    def plain() -> tf.Tensor:
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return tf.ensure_shape(image, (None, None, 3))

    if form is None:
        return plain()
    form = tf.convert_to_tensor(form, tf.int32)

    def composited() -> tf.Tensor:
        rgba = tf.cast(tf.io.decode_image(encoded, channels=4, expand_animations=False), tf.int32)
        alpha = rgba[..., 3:]
        # (c a + B (255 - a)) / 255 in integers, rounded half up: exact, whatever the device.
        mixed = (rgba[..., :3] * alpha + BACKGROUND * (255 - alpha) + 127) // 255
        return tf.cast(mixed, tf.uint8)

    def palette() -> tf.Tensor:
        indices = tf.io.decode_image(encoded, channels=0, expand_animations=False)
        start = tf.bitwise.right_shift(form, PALETTE_SHIFT)
        raw = tf.io.decode_raw(tf.strings.substr(encoded, start, 1024), tf.uint8)
        colours = tf.reshape(tf.pad(raw, [[0, 1024 - tf.shape(raw)[0]]]), (256, 4))
        return tf.gather(colours[:, 2::-1], tf.cast(indices[..., 0], tf.int32))  # BGRx: RGB

    kind = tf.bitwise.bitwise_and(tf.bitwise.right_shift(form, 4), 3)
    image = tf.ensure_shape(tf.switch_case(kind, [plain, composited, palette]), (None, None, 3))
    orientation = tf.bitwise.bitwise_and(form, 15)
    return tf.cond(orientation > 1, lambda: _oriented(image, orientation), lambda: image)


def _oriented(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """`image` as EXIF `orientation` (2-8) says it is shown (Pillow's exif_transpose)."""

    def swapped() -> tf.Tensor:
        return tf.transpose(image, (1, 0, 2))

    branches = [
        lambda: tf.reverse(image, [1]),  # 2: mirrored left to right
        lambda: tf.reverse(image, [0, 1]),  # 3: turned half round
        lambda: tf.reverse(image, [0]),  # 4: mirrored top to bottom
        swapped,  # 5: transposed
        lambda: tf.reverse(swapped(), [1]),  # 6: turned a quarter clockwise
        lambda: tf.reverse(swapped(), [0, 1]),  # 7: transversed
        lambda: tf.reverse(swapped(), [0]),  # 8: turned a quarter anticlockwise
    ]
    return tf.ensure_shape(tf.switch_case(orientation - 2, branches), (None, None, 3))


def decode_resized(
    encoded: tf.Tensor, size: int, resize: str, form: tf.Tensor | int | None = None
) -> tf.Tensor:
    """An encoded image as float32 (size, size, 3) of whole values in [0, 255], as every path
    reads it (and stores it, as uint8): decoded as its `form` says, resized as `resize` says,
    rounded. An image already of that size is only cast (bilinear resizing to the same size
    changes nothing)."""
    image = decode(encoded, form)
    shape = tf.shape(image)
    pixels = tf.cond(
        tf.logical_and(shape[0] == size, shape[1] == size),
        lambda: tf.cast(image, tf.float32),
        lambda: tf.round(resize_images(image, size, resize)),  # convex: stays in [0, 255]
    )
    return tf.ensure_shape(pixels, (size, size, 3))


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
    """The image file `path` as uint8 (height, width, 3), shown as its form says (`decode`);
    the first frame of an animated GIF.

    Raises ConfigError naming the file, with the reason, if it cannot be read or decoded.
    """
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        problem = error.strerror or str(error)
    else:
        form, problem = scan_bytes(data)
        if not problem:
            try:
                return decode(tf.constant(data), form or None).numpy()
            except (tf.errors.OpError, ValueError) as error:
                problem = reason(error)
    raise ConfigError(
        f"image file {shown(path)!r}: cannot be read or decoded ({problem}); accepted: "
        f"{ACCEPTED_IMAGES}"
    )


def reason(error: Exception) -> str:
    """TensorFlow's reason for an error, without the op and device names around it."""
    message = getattr(error, "message", str(error))
    if isinstance(error, tf.errors.NotFoundError):  # "PATH; No such file or directory"
        message = message.rsplit("; ", 1)[-1]
    noise = r"\{\{[^}]*\}\}|\[Op:[^\]]*\]|\bname:\s*$"
    return re.sub(noise, "", " ".join(message.split())).strip()[:160]
