"""The strategy the flags describe: DistributeConfig -> `tlloop.distribute`'s arguments."""

from __future__ import annotations

import tensorflow as tf

from tlloop import distribute
from tlloop.cli.config import DistributeConfig
from tlloop.cli.flags import flag_line


def make_strategy(config: DistributeConfig) -> tf.distribute.Strategy:
    """Splits the devices as --logical_devices asks, then makes the --strategy on --devices;
    a cluster that does not come up in time ends the process with the flags' line. Raises
    ConfigError for devices or a cluster that can't be."""
    distribute.configure_logical_devices(config.logical_devices, config.logical_device_memory_mb)
    return distribute.make_strategy(
        config.strategy, config.devices, config.cluster_timeout_secs, line=flag_line
    )
