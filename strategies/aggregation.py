"""Aggregation kernels: pure torch functions, tensors in and tensors out.

No Flower, no files: these are tested against NumPy references. Sums run in
float32 (float64 when inputs are float64) on the requested device, in the
order given, so a fixed input order gives bit-identical results run to run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = ["AggregationError", "weighted_mean"]


class AggregationError(ValueError):
    """The updates given to a kernel cannot be aggregated together."""


def weighted_mean(
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Weighted mean of named tensors, e.g. example-weighted FedAvg.

    Parameters
    ----------
    updates : Sequence[Mapping[str, torch.Tensor]]
        One mapping per client, all with the same names, shapes and dtypes.
    weights : Sequence[float]
        One non-negative finite weight per update (e.g. example counts), with a
        positive sum. They are normalised here.
    device : torch.device or str
        Where the accumulation happens and the result lives.

    Returns
    -------
    dict[str, torch.Tensor]
        The mean, in the first update's name order and in each tensor's dtype.

    Raises
    ------
    AggregationError
        On no updates, mismatched lengths, bad weights or mismatched tensors.
    """
    if not updates:
        raise AggregationError("no updates to aggregate")
    if len(updates) != len(weights):
        raise AggregationError(f"{len(updates)} updates but {len(weights)} weights")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise AggregationError(
            f"weights must be finite, >= 0 and sum > 0: {list(weights)}"
        )
    total = float(sum(weights))
    first = updates[0]
    out: dict[str, torch.Tensor] = {}
    for name, ref in first.items():
        acc_dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        acc = torch.zeros(ref.shape, dtype=acc_dtype, device=device)
        for i, (update, w) in enumerate(zip(updates, weights, strict=True)):
            t = update.get(name)
            if t is None or t.shape != ref.shape or t.dtype != ref.dtype:
                raise AggregationError(
                    f"update {i} tensor '{name}' does not match update 0 "
                    f"({None if t is None else (tuple(t.shape), t.dtype)} vs "
                    f"{(tuple(ref.shape), ref.dtype)})"
                )
            acc.add_(t.to(device=device, dtype=acc_dtype), alpha=w / total)
        out[name] = acc.to(ref.dtype)
    for i, update in enumerate(updates):
        if set(update) != set(first):
            raise AggregationError(f"update {i} has other tensor names than update 0")
    return out
