"""Optimizers: one fresh optimizer per phase, built on exactly the variables it will update.

Fresh per phase because a shared Keras Adam counts iterations globally: weights unfrozen after
many head steps would get bias-corrected first updates about 2.5x too large. Built eagerly on
the variables because a Keras 3 optimizer refuses variables it was not built with, and under a
distribution strategy must be built inside the scope before the first step.
"""

from __future__ import annotations

import keras

from tlloop.config import PhaseConfig


def make_optimizer(config: PhaseConfig, variables: list) -> keras.optimizers.Optimizer:
    """An Adam optimizer at the phase's learning rate, built on `variables`."""
    optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)
    optimizer.build(variables)
    return optimizer
