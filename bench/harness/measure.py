"""Measuring: clocks, resident memory, best-of timing, generator speed, message bytes.

torch, numpy, flwr and ``protocols`` are imported inside the functions that
need them, so importing this module keeps a parent process lean.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def now() -> float:
    """Wall-clock seconds from a monotonic, high-resolution clock."""
    return time.perf_counter()


def cpu() -> float:
    """CPU seconds of this process (all threads): less sensitive to a shared CPU."""
    return time.process_time()


def maxrss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mib() -> float:
    """Current resident set size (``VmRSS``) of this process, MiB; NaN if unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def best_time(
    fn: Callable[[], object],
    repeats: int,
    sync: Callable[[], None] | None = None,
) -> float:
    """Fastest of ``repeats`` timed calls of ``fn``, s, after one untimed warm-up.

    Parameters
    ----------
    fn : Callable[[], object]
        The work to time; its result is discarded.
    repeats : int
        Timed calls (at least 1).
    sync : Callable[[], None] | None
        Called after every call before the clock is read (for example
        ``torch.cuda.synchronize``); ``None`` for CPU work.

    Returns
    -------
    float
        The fastest call, s: the most stable figure on a shared machine.
    """
    wait = sync or (lambda: None)
    fn()
    wait()
    times = []
    for _ in range(max(1, repeats)):
        t0 = now()
        fn()
        wait()
        times.append(now() - t0)
    return min(times)


def bytes_by_record(content: Any) -> dict[str, int]:
    """Serialized bytes of each record of a message's ``RecordDict`` content.

    Each record is sized alone with :func:`protocols.payload_bytes` (what
    the run ledger counts), so the parts add up to about the whole.
    """
    from flwr.app import RecordDict

    from protocols import payload_bytes

    return {key: payload_bytes(RecordDict({key: content[key]})) for key in content}


def generation_throughput(
    numel: int,
    backend: str,
    device: Any = "cpu",
    *,
    min_time: float = 0.5,
) -> float:
    """Measured speed of :func:`protocols.seeds.gaussian` on one backend, values/s.

    One untimed call first (compiles numba, loads the table), then repeated
    calls for at least ``min_time`` seconds (and at least three); the fastest
    call is reported.

    Parameters
    ----------
    numel : int
        Values per call, at least 1.
    backend : str
        A backend of :data:`protocols.seeds.BACKENDS` (``"numba"``,
        ``"numpy"``, ``"torch"``, ``"auto"``).
    device : torch.device or str
        Where the values are generated (``"cuda"`` synchronizes per call).
    min_time : float
        Seconds of timed calls, at least.

    Returns
    -------
    float
        Values per second of the fastest call.

    Raises
    ------
    ValueError
        If ``numel < 1``.
    protocols.errors.ProtocolError
        On the arguments :func:`protocols.seeds.gaussian` refuses.
    """
    import torch

    from protocols.seeds import gaussian

    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1:
        raise ValueError(f"numel must be an integer >= 1 to time generation: {numel!r}")
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gaussian(0, "bench", numel, device=dev, backend=backend)
    sync()
    times: list[float] = []
    started = now()
    seed = 1
    while len(times) < 3 or now() - started < min_time:
        t0 = now()
        gaussian(seed, "bench", numel, device=dev, backend=backend)
        sync()
        times.append(now() - t0)
        seed += 1
    return numel / min(times)
