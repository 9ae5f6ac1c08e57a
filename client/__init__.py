"""Everything that runs on the device: the ClientApp and local trainers.

``client.app:app`` is the ClientApp Flower loads. Importing this package is
cheap: no model is loaded and the heavy submodules (transformers, PEFT) are
imported only when one of their names is first used.
"""

from __future__ import annotations

from protocols.lazy import lazy_exports

__all__ = [
    "ClientRuntime",
    "NodeConfigError",
    "NodeSettings",
    "TrainStats",
    "derive_seed",
    "train_lora",
]

_LAZY = {
    "ClientRuntime": "client.runtime",
    "NodeConfigError": "client.node",
    "NodeSettings": "client.node",
    "TrainStats": "client.lora_trainer",
    "derive_seed": "client.batches",
    "train_lora": "client.lora_trainer",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
