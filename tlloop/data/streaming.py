"""Encoded images read by index, decoded as they are read: memory that does not grow with N.

`EncodedImages` are indexed examples (`examples.IndexedExamples`: the same seeded order, exact
resume at any step, one part of each global batch per input pipeline) whose inputs are encoded
images: image files, TFRecord records (read at their byte offsets, found by one scan of the
files) or encoded bytes in memory. A batch of indices reads its encoded images, then each is
decoded and resized in parallel `tf.data` maps, with the very ops the in-memory path decodes
with at load (`decode_resized`), so both paths give the same batches, bit for bit.

`DiskImages` are the same examples decoded once into a file of uint8 pixels (a data cache),
read back a batch at a time by offset, after the file is checked once against the CRC32 of
each of its blocks, written with it. `decode_all` is the one decoding pass over every image:
it holds the pixels in memory, writes them to the cache, or only checks that they decode.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import threading
import zlib
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
from absl import logging

from tlloop.data.examples import AUTOTUNE, IndexedExamples, eager_constant, example_index
from tlloop.data.images import (
    ACCEPTED_IMAGES,
    DECODE_VERSION,
    decode_resized,
    reason,
    scan_bytes,
    scan_file,
    shown,
)
from tlloop.errors import NO_VALUE, ConfigError


@dataclasses.dataclass(frozen=True)
class RecordRefs:
    """Where each record of some TFRecord files lies: for record i, its file
    (`files[file[i]]`), its number in that file, the offset and length of its bytes, and the
    first bytes of its image (`head`, for the check before training)."""

    files: tuple[str, ...]
    file: np.ndarray
    number: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    head: np.ndarray

    def __len__(self) -> int:
        return len(self.file)

    def __getitem__(self, index: np.ndarray) -> RecordRefs:
        columns = (self.file, self.number, self.offset, self.length, self.head)
        return RecordRefs(self.files, *(column[index] for column in columns))

    def origin(self, i: int) -> str:
        return f"record {int(self.number[i])} of {self.files[int(self.file[i])]}"


class Reader:
    """Encoded images by index: one of a list of files, records or bytes."""

    def __init__(self, items, origins: list[str] | None = None, image_key: str = "") -> None:
        self.items, self.image_key = items, image_key
        self.kind = (
            "records"
            if isinstance(items, RecordRefs)
            else "files"
            if items and isinstance(items[0], str)
            else "bytes"
        )
        self._origins = origins
        self._descriptors: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.items)

    def origin(self, i: int) -> str:
        """Where example i comes from, for messages: its file, record or given origin."""
        if self.kind == "records":
            return self.items.origin(i)
        if self.kind == "files":
            return shown(self.items[i])
        return self._origins[i] if self._origins else f"example {i}"

    def items_at(self, indices: tf.Tensor) -> tf.Tensor:
        """What finds the images at `indices` (int64 [n]), tf.string [n]: their paths (files)
        or their encoded bytes (records, read here a batch at a time, and bytes)."""
        if self.kind == "records":
            records = tf.numpy_function(self._read_records, [indices], tf.string, stateful=False)
            records.set_shape(indices.shape)
            spec = {self.image_key: tf.io.FixedLenFeature([], tf.string)}
            return tf.io.parse_example(records, spec)[self.image_key]
        return tf.gather(self._items_tensor, indices)

    @functools.cached_property
    def _items_tensor(self) -> tf.Tensor:
        if self.kind == "files":  # as bytes: a name that is not UTF-8 is no Python str to TF
            return eager_constant([os.fsencode(path) for path in self.items])
        return eager_constant(self.items)

    def fetch(self, item: tf.Tensor) -> tf.Tensor:
        """One encoded image from its item of `items_at` (a file is read here, in the
        per-example map, so files are read in parallel)."""
        return tf.io.read_file(item) if self.kind == "files" else item

    def _read_records(self, indices: np.ndarray) -> np.ndarray:
        refs = self.items
        out = np.empty(len(indices), dtype=object)
        for k, i in enumerate(indices):
            out[k] = os.pread(
                self._descriptor(int(refs.file[i])), int(refs.length[i]), int(refs.offset[i])
            )
        return out

    def _descriptor(self, file: int) -> int:
        with self._lock:  # tf.data reads batches on several threads
            if file not in self._descriptors:
                self._descriptors[file] = os.open(self.items.files[file], os.O_RDONLY)
            return self._descriptors[file]

    def scans(self) -> list[tuple[int, str]]:
        """Each image's (form, problem) from its first bytes (`images.scan_file`): a cheap
        look before training at what each is; records carry their first bytes from their
        scan."""
        if self.kind == "records":
            return [scan_bytes(head) for head in self.items.head]
        if self.kind == "bytes":
            return [scan_bytes(item) for item in self.items]
        return [scan_file(path) for path in self.items]

    def fingerprint(self) -> str:
        """Changes when the images do: paths with their sizes and modification times, record
        positions, or the bytes themselves."""
        digest = hashlib.sha256()
        if self.kind == "bytes":
            for item in self.items:
                digest.update(hashlib.sha256(item).digest())
            return digest.hexdigest()
        paths = self.items.files if self.kind == "records" else self.items
        for path in paths:
            stat = os.stat(path)
            digest.update(
                os.fsencode(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0")
            )
        if self.kind == "records":
            for array in (self.items.file, self.items.offset, self.items.length):
                digest.update(np.ascontiguousarray(array, np.int64).tobytes())
            digest.update(self.image_key.encode())
        return digest.hexdigest()

    def take(self, kept: np.ndarray) -> Reader:
        """The reader of the examples `kept` (indices), in that order."""
        if self.kind == "records":
            return Reader(self.items[kept], image_key=self.image_key)
        origins = [self._origins[i] for i in kept] if self._origins else None
        return Reader([self.items[i] for i in kept], origins)


class EncodedImages(IndexedExamples):
    """Examples whose inputs are encoded images (`reader`), decoded into float32
    (`image_size`, `image_size`, 3) images in [0, 255] as they are read, each as its form
    says (`forms`, int32 from `Reader.scans`; None: all as stored); `labels` in memory."""

    def __init__(
        self,
        reader: Reader,
        labels: np.ndarray,
        image_size: int,
        resize: str,
        forms: np.ndarray | None = None,
    ) -> None:
        if len(reader) != len(labels):
            raise ValueError(f"{len(reader)} images but {len(labels)} labels")
        self.reader, self.labels = reader, np.asarray(labels)
        self.image_size, self.resize = image_size, resize
        self.forms = np.zeros(len(labels), np.int32) if forms is None else np.asarray(forms)

    @classmethod
    def from_files(
        cls, paths: list[str], labels, *, image_size: int, resize: str = "squash"
    ) -> EncodedImages:
        """Image files (JPEG, PNG, BMP, GIF) with their labels, streamed: nothing is read now
        (only that each file exists is checked); each batch reads and decodes its files, in
        tlloop's seeded order. Raises ValueError naming the first file that does not exist, in
        the words used for one that does not decode when training reads it. A local file's
        first bytes are read once, as a folder's are at load, so EXIF orientation, palettes and
        alpha are applied as for a folder."""
        paths = [os.fspath(path) for path in paths]
        for path in paths:
            if not tf.io.gfile.exists(path):  # local or remote (gs://), as read_file reads
                raise ValueError(
                    f"image file {path!r}: cannot be read or decoded (no such file); "
                    f"accepted: {ACCEPTED_IMAGES}"
                )
        forms = np.array([0 if "://" in str(p) else scan_file(p)[0] for p in paths], np.int32)
        return cls(Reader(paths), np.asarray(labels), image_size, resize, forms=forms)

    @property
    def size(self) -> int:
        return len(self.labels)

    @property
    def decoded_bytes(self) -> int:
        """Bytes of every image decoded, as uint8."""
        return self.size * self.image_size**2 * 3

    def read(self, indices):
        return (self.reader.items_at(indices), self.forms_at(indices)), self.labels_at(indices)

    def finish(self, inputs, label):
        item, form = inputs
        image = decode_resized(
            self.reader.fetch(item), self.image_size, self.resize, self._form(form)
        )
        return image, label

    def _form(self, form: tf.Tensor) -> tf.Tensor | None:
        """`form` for `decode`, or None when every image is of form 0 (the common case:
        `decode` then builds no control flow; the same pixels)."""
        return form if self.forms.any() else None

    def forms_at(self, indices: tf.Tensor) -> tf.Tensor:
        return tf.gather(self._forms_tensor, indices)

    @functools.cached_property
    def _forms_tensor(self) -> tf.Tensor:
        return eager_constant(self.forms.astype(np.int32))

    def keep(self, kept: np.ndarray) -> EncodedImages:
        """These examples without the ones not in `kept` (indices, in order)."""
        return EncodedImages(
            self.reader.take(kept),
            self.labels[kept],
            self.image_size,
            self.resize,
            self.forms[kept],
        )

    def decode_all(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every image decoded once, in index order, in parallel: (indices, uint8 pixels)
        batches; an image that cannot be decoded is left out (its index is missing)."""
        size, resize, fetch = self.image_size, self.resize, self.reader.fetch
        encoded = (
            tf.data.Dataset.range(self.size)
            .batch(64)
            .map(
                lambda i: (i, self.reader.items_at(i), self.forms_at(i)),
                num_parallel_calls=AUTOTUNE,
            )
            .unbatch()
            .map(
                lambda i, item, form: (
                    i,
                    tf.cast(decode_resized(fetch(item), size, resize, self._form(form)), tf.uint8),
                ),
                num_parallel_calls=AUTOTUNE,
                deterministic=True,
            )
            .ignore_errors()
            .batch(256)
            .prefetch(2)
        )
        return encoded.as_numpy_iterator()

    def unreadable(self, indices) -> str | None:
        """The origin of the first example of `indices` that cannot be read and decoded, with
        TensorFlow's reason; None if they all decode."""
        files = self.reader.kind == "files"
        problem = (
            "image file {!r}: cannot be read or decoded"
            if files
            else "image {!r}: cannot be decoded"
        )
        for i in indices:
            why = self.problem(int(i))
            if why is not None:
                return f"{problem.format(self.reader.origin(int(i)))} ({why})"
        return None

    def problem(self, i: int) -> str | None:
        """Why example `i` cannot be read and decoded (TensorFlow's reason), None if it can."""
        try:
            item = self.reader.items_at(tf.constant([i], tf.int64))[0]
            form = int(self.forms[i]) or None
            decode_resized(self.reader.fetch(item), self.image_size, self.resize, form)
        except (tf.errors.OpError, ValueError) as error:
            return reason(error)
        return None


class DiskImages(IndexedExamples):
    """Decoded uint8 images in a file of `count` rows (the `data_cache` folder's), read a batch
    at a time by offset (the page cache, not this process, holds what is read), as float32.
    Opening one reads the whole file once to check it against the checksums its description
    holds: a damaged cache is refused (ConfigError naming `data_cache`, the file and how to
    rebuild it), never used."""

    def __init__(self, path: str, labels: np.ndarray, image_size: int) -> None:
        self.path, self.labels, self.image_size = path, np.asarray(labels), image_size
        self.row = image_size**2 * 3
        expected = len(self.labels) * self.row
        rebuild = f"a cache tlloop wrote (delete {path!r} and the next run rebuilds it)"
        if os.path.getsize(path) != expected:
            raise ConfigError(
                "data_cache",
                NO_VALUE,
                f"{path!r} holds {os.path.getsize(path)} bytes, not the {expected} of "
                f"{len(self.labels)} images",
                rebuild,
            )
        meta = _read_meta(_meta_path(path)) if path.endswith(PIXELS) else None
        if meta and "crc32" in meta:
            bad = _damaged_block(path, meta["block_bytes"], meta["crc32"])
            if bad is not None:
                start = bad * meta["block_bytes"]
                raise ConfigError(
                    "data_cache",
                    NO_VALUE,
                    f"{path!r} is damaged (bytes {start} to "
                    f"{min(start + meta['block_bytes'], expected)} differ from the checksum "
                    "written with them)",
                    rebuild,
                )
        self._descriptor = None

    @property
    def size(self) -> int:
        return len(self.labels)

    def _rows(self, indices: np.ndarray) -> np.ndarray:
        if self._descriptor is None:
            self._descriptor = os.open(self.path, os.O_RDONLY)
        out = np.empty((len(indices), self.image_size, self.image_size, 3), np.uint8)
        for k, i in enumerate(indices):
            data = os.pread(self._descriptor, self.row, int(i) * self.row)
            out[k] = np.frombuffer(data, np.uint8).reshape(out.shape[1:])
        return out

    def read(self, indices):
        pixels = tf.numpy_function(self._rows, [indices], tf.uint8, stateful=False)
        pixels.set_shape((indices.shape[0], self.image_size, self.image_size, 3))
        return tf.cast(pixels, tf.float32), self.labels_at(indices)

    def pixels(self) -> np.ndarray:
        """Every image, read into memory (uint8)."""
        return np.fromfile(self.path, np.uint8).reshape(-1, self.image_size, self.image_size, 3)


PIXELS, META = ".pixels", ".json"  # a cache's two files: NAME.pixels and NAME.json
BLOCK_BYTES = 2**24  # the pixels file's checksum block (16 MiB)


def cache_files(directory: str, images: EncodedImages) -> tuple[str, str]:
    """(pixels file, description file) of `images` in the cache `directory`: named by what
    decides their pixels (the images' fingerprint, the size, the resize mode and the way
    images are decoded)."""
    key = json.dumps(
        [images.reader.fingerprint(), images.image_size, images.resize, DECODE_VERSION]
    )
    name = hashlib.sha256(key.encode()).hexdigest()[:24]
    return os.path.join(directory, name + PIXELS), os.path.join(directory, name + META)


def _meta_path(pixels_path: str) -> str:
    return pixels_path[: -len(PIXELS)] + META


class _BlockSums:
    """CRC32 of each `BLOCK_BYTES` block of a byte stream written in pieces of any size."""

    def __init__(self, block: int = BLOCK_BYTES) -> None:
        self.block, self.sums, self.crc, self.filled = block, [], 0, 0

    def update(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            piece = view[: self.block - self.filled]
            self.crc = zlib.crc32(piece, self.crc)
            self.filled += len(piece)
            view = view[len(piece) :]
            if self.filled == self.block:
                self.sums.append(self.crc)
                self.crc, self.filled = 0, 0

    def done(self) -> list[int]:
        return self.sums + [self.crc] * bool(self.filled)


def _damaged_block(path: str, block: int, sums: list[int]) -> int | None:
    """The first block of file `path` whose CRC32 is not in `sums`, or None."""
    with open(path, "rb") as file:
        for number, expected in enumerate(sums):
            if zlib.crc32(file.read(block)) != expected:
                return number
        return len(sums) if file.read(1) else None


def write_cache(images: EncodedImages, pixels_path: str, meta_path: str) -> np.ndarray:
    """Decodes every image once into `pixels_path` (written whole, then renamed into place,
    so a run stopped meanwhile leaves no partial cache); returns the indices kept (the others
    cannot be decoded), also written to `meta_path` last, with the CRC32 of each block of the
    pixels: its presence marks the cache whole."""
    os.makedirs(os.path.dirname(pixels_path) or ".", exist_ok=True)
    partial = f"{pixels_path}.partial-{os.getpid()}"
    kept, sums = [], _BlockSums()
    with open(partial, "wb") as file:
        for indices, pixels in images.decode_all():
            kept.append(indices)
            data = pixels.tobytes()
            sums.update(data)
            file.write(data)
    kept_indices = np.concatenate(kept) if kept else np.zeros((0,), np.int64)
    os.replace(partial, pixels_path)
    meta = {
        "count": images.size,
        "image_size": images.image_size,
        "kept": kept_indices.tolist(),
        "block_bytes": sums.block,
        "crc32": sums.done(),
    }
    with open(f"{meta_path}.partial-{os.getpid()}", "w") as file:
        json.dump(meta, file)
    os.replace(f"{meta_path}.partial-{os.getpid()}", meta_path)
    logging.info("data cache: wrote %d decoded images to %s", len(kept_indices), pixels_path)
    return kept_indices


def _read_meta(meta_path: str) -> dict:
    try:
        with open(meta_path) as file:
            meta = json.load(file)
        meta["kept"] = np.asarray(meta["kept"], np.int64)
        return meta
    except (ValueError, KeyError, TypeError):
        raise ConfigError(
            "data_cache",
            NO_VALUE,
            f"{meta_path!r} is not a cache description tlloop wrote",
            "a folder tlloop fills (delete the file to rebuild it)",
        ) from None


def read_cache_meta(meta_path: str) -> np.ndarray | None:
    """The kept indices of a whole cache, or None when there is none to use: no description,
    no pixels file beside it (deleted, as an error advised), or a description of a tlloop that
    wrote no checksums. The next write rebuilds both files."""
    if not os.path.exists(meta_path):
        return None
    meta = _read_meta(meta_path)
    pixels = meta_path[: -len(META)] + PIXELS
    if not os.path.exists(pixels):
        logging.warning("data cache: %s is gone: rebuilding the cache", pixels)
        return None
    if "crc32" not in meta:
        logging.warning("data cache: %s has no checksums (an older tlloop): rebuilding", pixels)
        return None
    return meta["kept"]


def find_unreadable(
    train, eval_data, *, step: int, steps: int, batch_size: int, seed: int
) -> str | None:
    """After a read failed, the streamed image at fault, with its reason: first among the
    training batches of the `steps` steps after global step `step` (the host call that failed),
    then among the evaluation examples, then among all training examples; None when neither is
    a stream of encoded images or every image decodes (the error was something else)."""
    if isinstance(train, EncodedImages):
        positions = range(step * batch_size, (step + steps) * batch_size)
        found = train.unreadable(int(example_index(p, train.size, seed)) for p in positions)
        if found:
            return found
    if isinstance(eval_data, EncodedImages):
        found = eval_data.unreadable(range(eval_data.size))
        if found:
            return found
    if isinstance(train, EncodedImages):
        return train.unreadable(range(train.size))
    return None
