"""One timed figure of the GPU check, and the clock that waits for the device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["figure", "sync_for", "timed"]


def sync_for(device: Any) -> Callable[[], None]:
    """``torch.cuda.synchronize`` for a CUDA device, a no-op otherwise."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def timed(fn: Callable[[], object], device: Any) -> float:
    """Seconds of one call of ``fn``, waiting for ``device`` before and after."""
    from bench.harness import now

    sync = sync_for(device)
    sync()
    t0 = now()
    fn()
    sync()
    return now() - t0


def figure(
    what: str,
    device: Any,
    scale: str,
    seconds: float,
    rate: float,
    rate_unit: str,
    **extra: Any,
) -> dict[str, Any]:
    """A row of the report: what was timed, where, at what scale, how fast.

    Parameters
    ----------
    what : str
        The operation (names the project function timed).
    device : torch.device or str
        Where it ran (recorded as its string, e.g. ``"cuda:0"``).
    scale : str
        The size it ran at, in words.
    seconds : float
        Wall seconds (measured, or extrapolated when ``extra`` says so).
    rate, rate_unit : float, str
        Throughput and its unit (e.g. seeds/s).
    **extra : Any
        More fields (``target_s``, ``extrapolated``, ...).
    """
    return {
        "what": what,
        "device": str(device),
        "scale": scale,
        "seconds": float(seconds),
        "rate": float(rate),
        "rate_unit": rate_unit,
        **extra,
    }
