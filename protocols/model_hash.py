"""A bit-exact fingerprint of model weights, for checking that parties agree.

Seed-based methods rebuild the same model on every party; this hash is how
they prove it. It covers names, dtypes, shapes and the raw little-endian bytes
of each tensor, in the order given (the parameter walk), so any single-bit
difference changes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

__all__ = ["state_hash"]


def state_hash(params: Sequence[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 (16 hex digits) of named tensors' metadata and bytes, in order."""
    digest = hashlib.sha256()
    for name, tensor in params:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # A view of the bytes, not a copy: this runs on every parameter each round.
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()[:16]
