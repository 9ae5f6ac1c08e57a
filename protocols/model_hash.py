"""A bit-exact fingerprint of model weights, for checking that parties agree.

Seed-based methods rebuild the same model on every party; this hash is how
they prove it. It covers names, dtypes, shapes and the raw little-endian bytes
of each tensor, in the order given (the parameter walk), so any single-bit
difference changes it.

Each tensor contributes ``f"{name}|{dtype}|{shape}|"`` then its bytes, where
``dtype`` is the torch spelling (``torch.float32``) and ``shape`` the Python
tuple. NumPy arrays hash the same way (a float32 array spells its dtype
``torch.float32`` too), so an edge device without torch
(:func:`state_hash` on arrays) agrees with a torch server. torch is imported
only when a torch tensor is hashed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from protocols.errors import ProtocolError

if TYPE_CHECKING:
    import torch

__all__ = ["state_hash"]

_NUMPY_DTYPES = {
    np.dtype(np.float32): "torch.float32",
    np.dtype(np.float16): "torch.float16",
    np.dtype(np.float64): "torch.float64",
}


def _numpy_part(name: str, array: np.ndarray[Any, Any]) -> tuple[bytes, memoryview]:
    spelled = _NUMPY_DTYPES.get(array.dtype)
    if spelled is None:
        raise ProtocolError(
            f"cannot hash '{name}': dtype {array.dtype} has no torch spelling"
        )
    flat = np.ascontiguousarray(array).reshape(-1)
    header = f"{name}|{spelled}|{tuple(int(d) for d in array.shape)}|".encode()
    return header, flat.view(np.uint8).data


def _torch_part(name: str, tensor: torch.Tensor) -> tuple[bytes, memoryview]:
    import torch

    t = tensor.detach().to("cpu").contiguous()
    header = f"{name}|{t.dtype}|{tuple(t.shape)}|".encode()
    # A view of the bytes, not a copy: this runs on every parameter each round.
    return header, t.reshape(-1).view(torch.uint8).numpy().data


def state_hash(params: Sequence[tuple[str, Any]]) -> str:
    """SHA-256 (16 hex digits) of named tensors' metadata and bytes, in order.

    Parameters
    ----------
    params
        ``(name, tensor)`` pairs; each a torch tensor or a NumPy array (float32,
        float16 or float64). Equal values give equal hashes either way.

    Raises
    ------
    ProtocolError
        If an array's dtype cannot be hashed.
    """
    digest = hashlib.sha256()
    for name, tensor in params:
        if isinstance(tensor, np.ndarray):
            header, data = _numpy_part(name, tensor)
        else:
            header, data = _torch_part(name, tensor)
        digest.update(header)
        digest.update(data)
    return digest.hexdigest()[:16]
