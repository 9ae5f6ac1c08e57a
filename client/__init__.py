"""Everything that runs on the device: the ClientApp and local trainers.

``client.app:app`` is the ClientApp Flower loads. Importing this package does
not load a model; that happens on the first message.
"""

from client.lora_trainer import TrainStats, derive_seed, train_lora
from client.node import NodeConfigError, NodeSettings, partition_file
from client.runtime import ClientRuntime

__all__ = [
    "ClientRuntime",
    "NodeConfigError",
    "NodeSettings",
    "TrainStats",
    "derive_seed",
    "partition_file",
    "train_lora",
]
