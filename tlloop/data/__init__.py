"""Data: sources of labelled images and the tf.data pipelines that feed the steps."""

from tlloop.data.pipeline import Data, load_data

__all__ = ["Data", "load_data"]
