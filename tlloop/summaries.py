"""TensorBoard summaries: one writer per split under WORKDIR/tensorboard/{train,eval}."""

from __future__ import annotations

import os

import tensorflow as tf


class Summaries:
    """Scalar and text summaries on one global step shared by every phase."""

    def __init__(self, logdir: str, *, enabled: bool = True) -> None:
        """Writers under `logdir`; with `enabled` False (a non-chief task) they write nothing."""
        self.writers = {
            split: tf.summary.create_file_writer(os.path.join(logdir, split))
            if enabled
            else tf.summary.create_noop_writer()
            for split in ("train", "eval")
        }

    def scalars(self, split: str, values: dict[str, float], step: int) -> None:
        with self.writers[split].as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def text(self, name: str, markdown: str, step: int) -> None:
        with self.writers["train"].as_default(step=step):
            tf.summary.text(name, markdown)

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
