"""The one data path: examples in; full training batches and padded evaluation batches out.

Whatever the source (tlloop's digits and image folders, a user's numpy arrays, a user's
`tf.data.Dataset`), training reads `Examples`, and the input position of a run is its global
step: step t reads the t-th global batch of one endless stream. Two kinds:

- `IndexedExamples` are read by index, in an order tlloop owns: example position k (counting
  across epochs) is example `index_shuffle(k mod N, seed=(seed, k div N))`, a seeded
  permutation per epoch computed per position. So a run resumed at step t starts reading at
  position t x batch directly (no replay), each input pipeline reads only its part of a
  global batch (`Part`), and backbone features cached per example line up with their inputs,
  batch for batch. `InMemoryExamples` hold (inputs, labels) as arrays; `streaming` has
  examples of encoded images, decoded as they are read.
- `StreamedExamples` wrap a user's finite `tf.data.Dataset`, iterated as given: its own order,
  its own random maps, repeated; tlloop only batches it into full global batches (unbatching a
  batched one first: `batching` tells which from its inputs). A resumed
  run skips the batches already read (a replay, exact when a fresh iterator of the dataset
  gives the same sequence, e.g. when it shuffles with a seed).

Training batches always have the full static batch shape (no partial batch retraces a step);
evaluation pads its last batch with examples of weight 0, so each example counts exactly once.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import Any

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


class Examples(abc.ABC):
    """A finite set of (inputs, label) examples, read as training or evaluation batches."""

    #: True when `training_batches` can start at any step without reading what comes before.
    positionable: bool

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """The number of examples (one epoch)."""

    @abc.abstractmethod
    def ordered(self) -> tf.data.Dataset:
        """Every example once, unbatched, in a fixed order (the index order)."""

    @abc.abstractmethod
    def training_batches(
        self,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        shuffle: bool = True,
        part: Part | None = None,
    ) -> tf.data.Dataset:
        """The endless stream of full batches, from the batch of global step `start_step` + 1
        (only `part` of each, when positionable examples are read by several pipelines)."""

    @property
    def element_spec(self):
        return self.ordered().element_spec

    def label_counts(self, num_classes: int) -> np.ndarray:
        """Examples per class: of each class index (labels [N]), or of each label present
        (multi-hot labels [N, num_classes])."""
        labels = np.concatenate([y for _, y in self.ordered().batch(4096).as_numpy_iterator()])
        return _counts(labels, num_classes)

    def eval_batches(self, batch_size: int, part: Part | None = None) -> tf.data.Dataset:
        """(inputs, labels, weights) full batches over every example once; the last batch is
        padded with copies of the first example of weight 0 (`part`: positionable only)."""
        real = self.ordered().map(lambda x, y: (x, y, tf.constant(1.0)))
        padding = (-self.size) % batch_size
        filler = self.ordered().take(1).map(lambda x, y: (x, y, tf.constant(0.0))).repeat(padding)
        batches = real.concatenate(filler).batch(batch_size, drop_remainder=True)
        return batches.prefetch(AUTOTUNE)

    def batch_count(self, batch_size: int) -> int:
        """Batches of `batch_size` that hold every example once, the last one partial (the
        steps of a training epoch and of an evaluation pass alike)."""
        return math.ceil(self.size / batch_size)

    def eval_steps(self, batch_size: int) -> int:
        return self.batch_count(batch_size)

    def preview(self, count: int = 16):
        """The first `count` examples' inputs, batched (for an image grid), or None when the
        inputs are not images (one float or integer tensor of shape (H, W, 1 or 3))."""
        spec = self.element_spec[0]
        image_like = isinstance(spec, tf.TensorSpec) and spec.shape.rank == 3
        if not image_like or spec.shape[-1] not in (1, 3) or spec.dtype == tf.string:
            return None
        return next(iter(self.ordered().map(lambda x, y: x).batch(count)))


def _counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    if labels.ndim == 2:  # multi-hot: an example counts for every label it has
        return np.rint(labels.sum(axis=0)).astype(np.int64)
    return np.bincount(labels.astype(np.int64).ravel(), minlength=num_classes)


@dataclasses.dataclass(frozen=True)
class Part:
    """The part of every global batch one input pipeline reads, as per-replica batches.

    Pipeline `index` of `count` reads positions [index x s, (index + 1) x s) of each global
    batch (s = batch / count), as `replicas` consecutive batches of s / replicas: the global
    batch, and which replica sees which example, do not depend on how many pipelines read it.
    """

    index: int = 0
    count: int = 1
    replicas: int = 1

    def slicer(self, batch_size: int):
        """A map from a global batch of positions [batch] to this part's per-replica rows
        [replicas, batch / (count x replicas)]; None for the whole batch in one piece."""
        if (self.count, self.replicas) == (1, 1):
            return None
        size = batch_size // self.count
        start, rows = self.index * size, size // self.replicas

        def part(positions, *rest):
            pieces = [
                tf.reshape(t[start : start + size], [self.replicas, rows])
                for t in (positions, *rest)
            ]
            return tuple(pieces) if rest else pieces[0]

        return part


class IndexedExamples(Examples):
    """Examples read by index, in tlloop's seeded order (see `example_index`): training batch t
    holds positions [t x batch, (t + 1) x batch) of the order, so any step can be the first
    read (no replay) and every input pipeline reads only its part of each batch.

    Subclasses say how a batch of indices becomes (inputs, labels) (`read`, run per batch in
    parallel) and, optionally, how each example is finished (`finish`, run per example in
    parallel, e.g. an image decoded): the batches are the same whoever reads them."""

    positionable = True

    @abc.abstractmethod
    def read(self, indices: tf.Tensor):
        """(inputs, labels) of the examples at `indices` (int64 [n])."""

    #: Maps one example's (inputs, label) after `read`, or None.
    finish = None

    def _batches(self, positions: tf.data.Dataset, batch_size: int, part: Part | None):
        """`positions` (global batches of indices, or of (indices, weights)) read as `part`."""
        part = part or Part()
        slicer = part.slicer(batch_size)
        rows = batch_size // (part.count * part.replicas)
        if slicer is not None:
            positions = positions.map(slicer).unbatch()
        batches = positions.map(self._read_rows, num_parallel_calls=AUTOTUNE, deterministic=True)
        if self.finish is not None:
            batches = self._finished(batches).batch(rows, drop_remainder=True)
        return batches.prefetch(AUTOTUNE)

    def _finished(self, batches: tf.data.Dataset) -> tf.data.Dataset:
        """`batches` as examples, each finished in parallel (in order)."""
        return batches.unbatch().map(
            self._finish_row, num_parallel_calls=AUTOTUNE, deterministic=True
        )

    def _read_rows(self, indices, *weights):
        return (*self.read(indices), *weights)

    def _finish_row(self, inputs, label, *weights):
        return (*self.finish(inputs, label), *weights)

    def ordered(self) -> tf.data.Dataset:
        rows = tf.data.Dataset.range(self.size).batch(256).map(self._read_rows)
        return rows.unbatch() if self.finish is None else self._finished(rows)

    def eval_batches(self, batch_size: int, part: Part | None = None) -> tf.data.Dataset:
        # Padding positions read example 0 with weight 0.
        size = self.size

        def weighted(positions):
            real = positions < size
            return tf.where(real, positions, 0), tf.cast(real, tf.float32)

        padded = self.eval_steps(batch_size) * batch_size
        positions = tf.data.Dataset.range(padded).batch(batch_size).map(weighted)
        return self._batches(positions, batch_size, part)

    def training_batches(
        self,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        shuffle: bool = True,
        part: Part | None = None,
    ) -> tf.data.Dataset:
        size = self.size
        first_epoch, offset = divmod(start_step * batch_size, size)

        def epoch(number):
            # The whole epoch's order in one op (`example_index` for each of its positions),
            # the first epoch from the resume point on.
            positions = tf.range(size, dtype=tf.int64)
            if shuffle:
                order_seed = tf.stack([tf.constant(seed, tf.int64), number])
                positions = tf.random.experimental.index_shuffle(positions, order_seed, size - 1)
            start = tf.where(number == first_epoch, tf.constant(offset, tf.int64), 0)
            return tf.data.Dataset.from_tensor_slices(positions[start:])

        positions = (
            tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
            .flat_map(epoch)
            .batch(batch_size, drop_remainder=True)
        )
        return self._batches(positions, batch_size, part)

    def label_counts(self, num_classes: int) -> np.ndarray:
        return _counts(np.asarray(self.labels), num_classes)

    @functools.cached_property
    def _label_tensor(self) -> tf.Tensor:
        return eager_constant(self.labels)

    def labels_at(self, indices: tf.Tensor) -> tf.Tensor:
        """The labels (`self.labels`, held as one tensor) of the examples at `indices`."""
        return tf.gather(self._label_tensor, indices)


def eager_constant(value) -> tf.Tensor:
    """`value` as one eager tensor, whatever graph is being traced when it is first asked for:
    tf.data functions capture it instead of embedding a copy in every trace."""
    with tf.init_scope():
        return tf.convert_to_tensor(value)


class InMemoryExamples(IndexedExamples):
    """(inputs, labels) held as arrays: `inputs` an array or a nested structure (dict, tuple)
    of arrays, `labels` an array; all with the same first dimension. `transform`, if given,
    maps each batch of inputs after it is gathered (e.g. uint8 pixels to float32)."""

    def __init__(self, inputs, labels, *, transform=None) -> None:
        counts = {len(a) for a in tf.nest.flatten(inputs)} | {len(labels)}
        if len(counts) != 1:
            raise ValueError(
                f"inputs and labels hold different numbers of examples ({sorted(counts)}); "
                "accepted: arrays with the same first dimension"
            )
        if not len(labels):
            raise ValueError("no examples: accepted: at least one example")
        self.inputs = inputs
        self.labels = labels
        self.transform = transform

    @classmethod
    def from_dataset(cls, dataset: tf.data.Dataset, *, batched: bool = False) -> InMemoryExamples:
        """Reads a finite dataset of (inputs, label) pairs (batched, with `batched`) into
        memory once, so tlloop owns the order and can position it."""
        if batched:
            dataset = dataset.unbatch()
        batches = list(dataset.batch(4096).as_numpy_iterator())
        if not batches:
            raise ValueError("the dataset is empty; accepted: at least one example")
        inputs = tf.nest.map_structure(lambda *a: np.concatenate(a), *[b[0] for b in batches])
        return cls(inputs, np.concatenate([b[1] for b in batches]))

    @property
    def size(self) -> int:
        return len(self.labels)

    @functools.cached_property
    def _input_tensors(self):
        return tf.nest.map_structure(eager_constant, self.inputs)

    def read(self, indices):
        inputs = tf.nest.map_structure(lambda t: tf.gather(t, indices), self._input_tensors)
        if self.transform is not None:
            inputs = self.transform(inputs)
        return inputs, self.labels_at(indices)


def example_index(position, size: int, seed: int):
    """The example at `position` of the training order: in epoch `position // size`, a
    permutation of 0..size-1 drawn from (seed, epoch). A pure function: resume needs no state."""
    position = tf.cast(position, tf.int64)
    epoch_seed = tf.stack([tf.constant(seed, tf.int64), position // size])
    return tf.random.experimental.index_shuffle(position % size, epoch_seed, size - 1)


class StreamedExamples(Examples):
    """A user's finite `tf.data.Dataset` of (inputs, label) pairs (batched, with `batched`:
    they are unbatched first), read in its own order each epoch."""

    positionable = False

    def __init__(self, dataset: tf.data.Dataset, *, batched: bool = False) -> None:
        if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
            raise ValueError(
                "the dataset is infinite (repeat()?); accepted: a finite dataset, one epoch: "
                "tlloop repeats it"
            )
        self.dataset = dataset.unbatch() if batched else dataset
        self._size = None

    @property
    def size(self) -> int:
        if self._size is None:  # one pass: a tf.data pipeline rarely knows its length
            known = int(self.dataset.cardinality())
            self._size = known if known >= 0 else int(self.dataset.reduce(0, lambda n, _: n + 1))
            if not self._size:
                raise ValueError("the dataset is empty; accepted: at least one example")
        return self._size

    def ordered(self) -> tf.data.Dataset:
        return self.dataset

    def training_batches(
        self,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        shuffle: bool = True,
        part: Part | None = None,
    ) -> tf.data.Dataset:
        batches = self.dataset.repeat().batch(batch_size, drop_remainder=True)
        return batches.skip(start_step).prefetch(AUTOTUNE)


def as_examples(data, *, argument: str, inputs: Any = None) -> Examples:
    """`data` as Examples: Examples as they are; a tuple (inputs, labels) of arrays (inputs may
    be a dict or tuple of arrays) in memory; a `tf.data.Dataset` of (inputs, label) pairs
    streamed as given, unbatched first when it is batched (`batching`). `inputs`: the
    TensorSpecs of the model's declared inputs (batch dimension included), or None.
    Raises TypeError/ValueError naming `argument`, also when the batching cannot be decided."""
    if isinstance(data, Examples):
        return data
    try:
        if isinstance(data, tf.data.Dataset):
            spec = data.element_spec
            if not (isinstance(spec, tuple) and len(spec) == 2):
                raise TypeError(
                    f"its elements are {spec}; accepted: (inputs, label) pairs, e.g. "
                    "tf.data.Dataset.from_tensor_slices((images, labels))"
                )
            return StreamedExamples(data, batched=batching(data, inputs))
        if isinstance(data, tuple) and len(data) == 2:
            inputs = tf.nest.map_structure(np.asarray, data[0])
            return InMemoryExamples(inputs, np.asarray(data[1]))
    except (TypeError, ValueError) as error:
        raise type(error)(f"{argument}: {error}") from None
    raise TypeError(
        f"{argument}: {type(data).__name__} is not data tlloop reads; accepted: (inputs, labels) "
        "arrays, a finite tf.data.Dataset of (inputs, label) pairs, or tlloop Examples"
    )


def batching(dataset: tf.data.Dataset, inputs: Any = None) -> bool:
    """Whether the elements of `dataset` ((inputs, label) pairs) are batches, decided from the
    inputs, never from the labels (a batch of scalar targets has the rank of one example's
    target vector): by the ranks of the model's declared `inputs` (TensorSpecs with their
    batch dimension) when given: equal ranks, batched; one less, one example each; otherwise
    by the dataset's own transformations: the last `batch` (or `padded_batch`, `ragged_batch`)
    or `unbatch` it applies, and none over sources that yield examples (tensor slices, files,
    a range) means unbatched. Raises ValueError when neither decides (a generator, a dataset
    made by `from_tensors`, `flat_map` or `interleave`, inputs that fit no rank)."""
    data = tf.nest.flatten(dataset.element_spec[0])
    declared = tf.nest.flatten(inputs) if inputs is not None else []
    if declared and len(declared) == len(data):
        gaps = {
            d.shape.rank - m.shape.rank
            for d, m in zip(data, declared, strict=True)
            if d.shape.rank is not None and m.shape.rank is not None
        }
        if gaps in ({0}, {-1}):
            return gaps == {0}
        shapes = ", ".join(str(d.shape) for d in data)
        wanted = ", ".join(str(m.shape) for m in declared)
        raise ValueError(
            f"the inputs' shapes {shapes} fit neither the model's inputs {wanted} nor one "
            "example of them; accepted: batches or single examples of the model's inputs"
        )
    found = _batched_by_its_steps(dataset)
    if found is None:
        raise ValueError(
            "cannot tell whether the dataset's elements are batches: the model declares no "
            "inputs to compare with, and the dataset shows no batch() or unbatch() over "
            "sources of examples; accepted: tlloop.StreamedExamples(dataset, batched=True) "
            "or (dataset, batched=False)"
        )
    return found


# tf.data's transformation classes (names without their leading underscore) by what they say
# of batching: the last batching or unbatching one decides; an opaque one hides its source.
_BATCHING = {
    "BatchDataset",
    "PaddedBatchDataset",
    "ParallelBatchDataset",
    "MapAndBatchDataset",
    "RebatchDataset",
}
_UNBATCHING = {"UnbatchDataset"}
_OPAQUE = {
    "TensorDataset",  # from_tensors, from_generator: one element, whatever it is
    "FlatMapDataset",
    "InterleaveDataset",
    "ParallelInterleaveDataset",
    "GroupByWindowDataset",
    "WindowDataset",
    "ScanDataset",
}


def _batched_by_its_steps(dataset: tf.data.Dataset) -> bool | None:
    """True/False from the last batching/unbatching transformation of `dataset`; False over
    sources of examples with neither; None when it cannot be seen."""
    name = type(dataset).__name__.lstrip("_")
    if name in _BATCHING:
        return True
    if name in _UNBATCHING:
        return False
    if name in _OPAQUE:
        return None
    try:
        parents = dataset._inputs()  # tf.data's own graph of transformations
    except Exception:  # a dataset class that does not expose its inputs
        return None
    if not parents:
        return False  # a source of examples: tensor slices, records, lines, a range
    found = {_batched_by_its_steps(parent) for parent in parents}
    return found.pop() if len(found) == 1 else None


class BatchStream:
    """The training batches of one process, positioned at a global step on demand.

    Positionable examples start a fresh iterator wherever asked. A streamed dataset keeps one
    iterator per process and only moves forward: a dataset that reshuffles each iteration gives
    every new iterator of the same object another order, so a second one would not continue the
    first one's stream.
    """

    def __init__(self, examples: Examples, distribute, batch_size: int, seed: int) -> None:
        self.examples, self.distribute = examples, distribute
        self.batch_size, self.seed = batch_size, seed
        self.iterator, self.position = None, 0

    def at(self, step: int):
        """The iterator whose next batch is the one of global step `step` + 1."""
        fresh = self.iterator is None or (self.examples.positionable and step != self.position)
        if fresh:
            examples, size, seed = self.examples, self.batch_size, self.seed
            batches = self.distribute(
                lambda part: examples.training_batches(size, seed, step, part=part),
                examples.positionable,
                size,
            )
            self.iterator, self.position = iter(batches), step
        if step < self.position:
            raise RuntimeError(f"the training stream is past step {step}: it cannot go back")
        for _ in range(step - self.position):  # steps taken meanwhile on another stream
            next(self.iterator)
        self.position = step
        return self.iterator

    def ran_to(self, step: int) -> None:
        """Records that the training steps up to global step `step` read this iterator."""
        self.position = step
