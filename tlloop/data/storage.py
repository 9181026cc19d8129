"""Where a source's examples live: images in memory or streamed, texts in memory, as `Data`.

Each split of images takes one of two paths, chosen at load from explicit arguments, logged
(and written to results.json):

- **In memory**, when its decoded images fit what is left of `memory_budget` (bytes, the
  evaluation split first): every image is decoded and resized once, in parallel, at load,
  and held as uint8 (`InMemoryExamples`).
- **Streamed**, when they do not: the examples hold only where each image is (file paths,
  TFRecord offsets) and their labels; each batch reads and decodes its images as it is read
  (`streaming.EncodedImages`), or reads them from the decoded cache in the `data_cache` folder.

Both read in the same seeded order (`examples.example_index`) and decode with the same ops, so
they give the same batches. Unreadable images: an image whose first bytes are no image format
is found before anything is written, on both paths; the in-memory path (and a data cache, and
`bad_images="skip"` on a stream) decodes every image before training, so it finds the rest
too; a streamed image that starts right but does not decode stops the run when first read,
named (see `trainer`), the last checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from tlloop.data.examples import IndexedExamples, InMemoryExamples
from tlloop.data.images import ACCEPTED_IMAGES, ALPHA, PALETTE, resize_images
from tlloop.data.splits import Source, Split
from tlloop.data.streaming import (
    DiskImages,
    EncodedImages,
    Reader,
    cache_files,
    read_cache_meta,
    write_cache,
)
from tlloop.errors import ConfigError

AUTOTUNE = tf.data.AUTOTUNE
# In-memory examples live in the tf.data graph as constants, and a graph over 2 GB cannot be
# serialized (as distributing a dataset may need): a larger split streams.
MAX_IN_MEMORY = 2**31 - 2**20
# How the reason of an unreadable image starts, in `Data.skipped_files`.
UNREADABLE = "unreadable: "


@dataclasses.dataclass(frozen=True)
class Data:
    """A source's examples, ready for training and evaluation.

    `train` yields (images float32 [B, S, S, 3] in [0, 255], labels int32 [B]) forever, in
    the order of `train_examples` (see `examples.IndexedExamples`); `eval` yields (images,
    labels, weights float32 [B]) for `eval_steps` batches, the weights summing to `eval_size`.
    Loaded for evaluation only, `train_examples` is None. `storage` says, per split, which
    path it took and why.
    """

    class_names: tuple[str, ...]
    train_examples: IndexedExamples | None
    eval_examples: IndexedExamples
    batch_size: int
    eval_batch_size: int
    seed: int = 0
    # Every file found and not used, with the reason (printable path: reason): kinds not read
    # (TIFF, other extensions, dangling links) and unreadable images (bad_images="skip").
    skipped_files: dict[str, str] = dataclasses.field(default_factory=dict)
    storage: dict = dataclasses.field(default_factory=dict)

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
        return self.train_examples.batch_count(self.batch_size) if self.train_examples else 0

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


@dataclasses.dataclass(frozen=True)
class _Loading:
    """What every split of one `store_images` call is read with."""

    image_size: int
    resize: str
    bad_images: str
    data_cache: str
    image_feature: str
    name_of: Callable[[str], str]


def store_images(
    source: Source,
    *,
    image_size: int,
    resize: str = "squash",
    memory_budget: int,
    data_cache: str = "",
    bad_images: str = "fail",
    image_feature: str = "",
    batch_size: int,
    eval_batch_size: int,
    seed: int = 0,
    evaluation_only: bool = False,
    name_of: Callable[[str], str] = str,
) -> Data:
    """The images of `source` as Data: each split (the evaluation split first: it is read
    whole at every evaluation) held in memory while its decoded `image_size` squares fit what
    is left of `memory_budget` (bytes), else streamed; with `data_cache`, decoded once into
    that folder and read from there; only the evaluation split with `evaluation_only`.

    Unreadable images: ConfigError naming the first with its reason (`bad_images="fail"`), or
    left out and listed in `skipped_files` ("skip"). `image_feature`: the TFRecord feature of
    the encoded image. `name_of(argument)` is how the storage descriptions and logs show an
    argument's name (the command line passes its flags' names)."""
    loading = _Loading(image_size, resize, bad_images, data_cache, image_feature, name_of)
    budget = memory_budget
    skipped = dict(source.skipped)
    if skipped:
        logging.warning(
            "left out %d file(s) that are no images tlloop reads (each with its reason in "
            "results.json's skipped_reasons), e.g. %s: %s",
            len(skipped),
            *next(iter(skipped.items())),
        )
    loaded, storage, forms = {}, {}, {ALPHA: 0, PALETTE: 0, "oriented": 0}
    splits = [("eval", source.eval)] + [("train", source.train)] * (not evaluation_only)
    for position, (name, split) in enumerate(splits):
        # Evaluation first: it is read in full at every evaluation.
        try:
            examples, storage[name], bad = _load_split(split, loading, budget, forms)
        except _Unreadable as refusal:  # counted over every split, the others by first bytes
            later = sum(_unreadable_count(s, image_feature) for _, s in splits[position + 1 :])
            _refuse(refusal.images, refusal.bad, len(skipped_unreadable(skipped)) + later)
        if isinstance(examples, InMemoryExamples):
            budget -= examples.size * image_size**2 * 3
        _check_every_class(examples.labels, source.class_names, tuple(bad))
        loaded[name] = examples
        skipped.update(bad)
        logging.info("%s split: %d examples, %s", name, examples.size, storage[name])
    if any(forms.values()):
        logging.info(
            "images read as they are shown: %d turned as their EXIF orientation says, %d "
            "palette BMPs given their colours, %d with transparency composited on white",
            forms["oriented"],
            forms[PALETTE],
            forms[ALPHA],
        )
    return Data(
        class_names=source.class_names,
        train_examples=loaded.get("train"),
        eval_examples=loaded["eval"],
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        seed=seed,
        skipped_files=skipped,
        storage=storage,
    )


def store_texts(
    source: Source,
    *,
    batch_size: int,
    eval_batch_size: int,
    seed: int = 0,
    evaluation_only: bool = False,
) -> Data:
    """The texts of `source` (its splits' items are strings) as in-memory string examples: a
    text backbone tokenizes them inside the model."""

    def examples(split: Split) -> InMemoryExamples:
        return InMemoryExamples(np.asarray(split.images, dtype=object), split.labels)

    return Data(
        class_names=tuple(source.class_names),
        train_examples=None if evaluation_only else examples(source.train),
        eval_examples=examples(source.eval),
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        seed=seed,
        skipped_files=dict(source.skipped),
        storage={
            name: "memory (texts, tokenized inside the model)"
            for name in ("eval",) + ("train",) * (not evaluation_only)
        },
    )


def memory_budget(setting: str) -> int:
    """Bytes of decoded images a memory `setting` allows: a number of MiB, or for "auto" half
    the memory available now (MemAvailable; the physical memory where /proc/meminfo is
    missing)."""
    if setting != "auto":
        return int(setting) * 2**20
    try:
        with open("/proc/meminfo") as file:
            fields = dict(line.split(":", 1) for line in file)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return available // 2


class _Unreadable(Exception):
    """A split holds unreadable images under bad_images="fail" (`_refuse` says which)."""

    def __init__(self, images: EncodedImages, bad: dict[str, str]) -> None:
        super().__init__()
        self.images, self.bad = images, bad


def skipped_unreadable(skipped: dict[str, str]) -> dict[str, str]:
    """The unreadable images among files `skipped` (not the kinds never read)."""
    return {path: why for path, why in skipped.items() if why.startswith(UNREADABLE)}


def _load_split(split: Split, loading: _Loading, budget: int, forms: dict):
    """(examples, how they are stored, as logged, the images skipped with their reasons) of
    one split; counts the images of each form into `forms`. Raises _Unreadable under
    bad_images="fail" when images are unreadable."""
    name_of = loading.name_of
    if isinstance(split.images, np.ndarray):
        return in_memory(split, loading.image_size, loading.resize), "memory: arrays", {}
    origins = split.origins if isinstance(split.images, list) and split.origins else None
    reader = Reader(split.images, origins, loading.image_feature)
    scans = reader.scans()
    every = EncodedImages(
        reader, split.labels, loading.image_size, loading.resize, [f for f, _ in scans]
    )
    forms[ALPHA] += int(np.sum(every.forms & ALPHA > 0))
    forms[PALETTE] += int(np.sum(every.forms & PALETTE > 0))
    forms["oriented"] += int(np.sum(every.forms % 16 > 1))
    problems = {i: why for i, (_, why) in enumerate(scans) if why}
    images, skipped = _keep(every, np.flatnonzero([not why for _, why in scans]), problems)
    size = f"{images.decoded_bytes / 2**20:.1f} MiB decoded"
    fits = images.decoded_bytes <= min(budget, MAX_IN_MEMORY)
    left = (
        f"over the {budget / 2**20:.0f} MiB left of {name_of('memory_budget')}"
        if images.decoded_bytes > budget
        else "over the 2 GiB one split may hold in memory"
    )
    if skipped and loading.bad_images == "fail" and not (fits or loading.data_cache):
        raise _Unreadable(every, skipped)  # found cheaply; nothing decodes every image at load
    cached = pixels = None
    if loading.data_cache:
        pixels_path, meta_path = cache_files(loading.data_cache, images)
        kept = read_cache_meta(meta_path)
        how = (
            f"{name_of('data_cache')} {'found' if kept is not None else 'written'} at {pixels_path}"
        )
        if kept is None:
            kept = write_cache(images, pixels_path, meta_path)
        images, more = _keep(images, kept)
        cached = DiskImages(pixels_path, images.labels, loading.image_size)
    elif fits:
        kept, pixels = _decode_pass(images, keep_pixels=True)
        images, more = _keep(images, kept)
        how = "decoded at load"
    elif loading.bad_images == "skip":  # every image decoded once now, so training meets none
        kept, _ = _decode_pass(images, keep_pixels=False)
        images, more = _keep(images, kept)
        how = "decoded as read; every image checked at load"
    else:
        more, how = {}, "decoded as read"
    skipped.update(more)
    if skipped and loading.bad_images == "fail":
        raise _Unreadable(every, skipped)
    if skipped:
        logging.warning(
            "%s=skip: skipped %d unreadable image file(s) of %d: %s",
            name_of("bad_images"),
            len(skipped),
            every.size,
            ", ".join(f"{path} ({why[len(UNREADABLE) :]})" for path, why in skipped.items()),
        )
    if fits:
        pixels = cached.pixels() if cached else pixels
        examples = InMemoryExamples(pixels, images.labels, transform=_to_float)
        return examples, f"memory ({size}, {how})", skipped
    return cached or images, f"streamed ({size} {left}; {how})", skipped


def _unreadable_count(split: Split, image_feature: str) -> int:
    """How many images of `split` are unreadable by their first bytes."""
    if isinstance(split.images, np.ndarray):
        return 0
    reader = Reader(split.images, split.origins, image_feature)
    return sum(bool(why) for _, why in reader.scans())


def _decode_pass(images: EncodedImages, *, keep_pixels: bool):
    """(the indices of the images that decode, their uint8 pixels or None): one pass over
    every image; without `keep_pixels` memory holds one batch of pixels at a time."""
    kept, pixels = [np.zeros(0, np.int64)], []
    for indices, batch in images.decode_all():
        kept.append(indices)
        if keep_pixels:
            pixels.append(batch)
    return np.concatenate(kept), np.concatenate(pixels) if pixels else None


def _keep(
    images: EncodedImages, kept: np.ndarray, problems: dict[int, str] | None = None
) -> tuple[EncodedImages, dict[str, str]]:
    """`images` reduced to the indices `kept`, and where the others come from, with why they
    are unreadable (`problems` by index, else TensorFlow's reason, decoding it again)."""
    if len(kept) == images.size:
        return images, {}
    bad = np.setdiff1d(np.arange(images.size), kept)
    why = {int(i): (problems or {}).get(int(i)) or images.problem(int(i)) or "" for i in bad}
    return images.keep(kept), {images.reader.origin(int(i)): UNREADABLE + why[int(i)] for i in bad}


def _refuse(images: EncodedImages, unreadable: dict[str, str], elsewhere: int) -> None:
    """Raises ConfigError (one finished line) naming the first of `images` (in their order)
    that is `unreadable`, with the reason, and how many more there are (`elsewhere`: in other
    splits)."""
    first = next(i for i in range(images.size) if images.reader.origin(i) in unreadable)
    origin = images.reader.origin(first)
    what = (
        f"image file {origin!r}: cannot be read or decoded"
        if images.reader.kind == "files"
        else f"image {origin!r}: cannot be decoded"
    )
    count = len(unreadable) - 1 + elsewhere
    more = f" ({count} more unreadable images)" if count else ""
    raise ConfigError(
        f"{what} ({unreadable[origin][len(UNREADABLE) :]}); accepted: {ACCEPTED_IMAGES}, or "
        f"$bad_images=skip to leave them out{more}"
    ) from None


def in_memory(split: Split, image_size: int, resize: str = "squash") -> InMemoryExamples:
    """The images of `split` (uint8 arrays) as examples of float32 `image_size` squares: kept
    as uint8 when already that size, else resized once, as float32."""
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


def _check_every_class(
    labels: np.ndarray, names: tuple[str, ...], skipped: tuple[str, ...]
) -> None:
    """Raises ConfigError if skipping unreadable files emptied a class (of class indices:
    multi-hot labels and targets have no class an example stands for)."""
    if labels.ndim != 1:
        return
    empty = [name for label, name in enumerate(names) if not np.any(labels == label)]
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
