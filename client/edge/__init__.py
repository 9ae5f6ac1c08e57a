"""The edge client: FedKSeed on ONNX Runtime and NumPy, without torch.

A device that runs only an inference engine opens an edge bundle
(:mod:`protocols.edge_bundle`, written by ``pollinate export --format edge``)
as an :class:`EdgeModel` and trains it with :func:`edge_local_steps`;
:func:`client.edge.handler.handle` answers ``train.zo`` for a node whose node
config says ``runtime = "onnx"``, keeping the model in sync with the server
(:class:`EdgeZoState`, cached per process by :class:`EdgeRuntime`). Nothing
in this package imports torch, transformers or PEFT; importing the package
itself imports nothing heavy (names load on first use).
"""

from __future__ import annotations

from protocols.lazy import lazy_exports

__all__ = [
    "EdgeBatch",
    "EdgeModel",
    "EdgeRuntime",
    "EdgeZoState",
    "EdgeZoStats",
    "collate",
    "edge_local_steps",
    "mezo_step",
]

_LAZY = {
    "EdgeBatch": "client.edge.engine",
    "EdgeModel": "client.edge.engine",
    "EdgeRuntime": "client.edge.runtime",
    "EdgeZoState": "client.edge.state",
    "EdgeZoStats": "client.edge.trainer",
    "collate": "client.edge.engine",
    "edge_local_steps": "client.edge.trainer",
    "mezo_step": "client.edge.trainer",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
