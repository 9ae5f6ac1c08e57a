"""Seed replay at the scale of a LLaMA-3B FedKSeed round, on the device and the CPU.

Times :func:`protocols.seeds.apply_seed_sum_`, the call
:meth:`server.zo_driver.ZoDriver.apply` makes to rebuild the global model
from a round's (seed, coefficient) pairs, over synthetic float32 tensors of
the model's size. The device run is calibrated first (two seeds over one
tensor): if the whole round would take longer than the scale's budget, fewer
seeds are replayed over all the tensors (or, if even one seed does not fit,
one seed over fewer tensors) and the round's time is extrapolated linearly
(each seed costs the same: one stream per tensor; equal tensors cost the
same), and the figure says ``extrapolated``. The CPU reference replays a few seeds over a
few tensors with the CPU backend (numba) and is extrapolated to the round.
"""

from __future__ import annotations

import gc
from typing import Any

from bench.gpu.figures import figure, timed
from bench.gpu.scales import ReplayScale

__all__ = ["budget_share", "section_replay"]

REPLAY = "protocols.seeds.apply_seed_sum_"
POOL = 4096  # FedKSeed's K: the round's seeds are distinct members of the pool


def _tensors(count: int, rows: int, cols: int, device: Any) -> list[tuple[str, Any]]:
    """``count`` float32 ``(rows, cols)`` tensors on ``device``, small values."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    return [
        (
            f"model.layers.{i}.weight",
            torch.empty((rows, cols), dtype=torch.float32, device=device).normal_(
                0.0, 0.02, generator=gen
            ),
        )
        for i in range(count)
    ]


def _round(seeds: int) -> tuple[list[int], list[float]]:
    """``seeds`` distinct pool seeds (canonical order) and their coefficients."""
    import numpy as np

    from protocols.seeds import candidate_seeds

    pool = candidate_seeds(0, max(POOL, seeds))
    coefficients = np.random.default_rng(1).normal(0.0, 1e-4, size=seeds)
    return pool[:seeds], coefficients.tolist()


def budget_share(scale: ReplayScale, per_tensor_seed_s: float) -> tuple[int, int]:
    """Seeds and tensors to replay within the budget, from one tensor-seed's cost.

    All of them when the round fits; else all tensors and as many seeds as
    fit; else one seed over as many tensors as fit (at least one of each).
    """
    per_seed = per_tensor_seed_s * scale.tensors
    if per_seed * scale.seeds <= scale.budget_s:
        return scale.seeds, scale.tensors
    if per_seed <= scale.budget_s:
        return min(scale.seeds, int(scale.budget_s / per_seed)), scale.tensors
    return 1, max(1, min(scale.tensors, int(scale.budget_s / per_tensor_seed_s)))


def _device_run(scale: ReplayScale, device: Any) -> dict[str, Any]:
    """Calibrate, then replay as much of the round as the budget allows."""
    import torch

    from protocols.seeds import apply_seed_sum_

    dev = torch.device(device)
    seeds, coefficients = _round(scale.seeds)
    apply_seed_sum_([("warm-up", torch.zeros(8, device=dev))], [1], [1.0])
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    params = _tensors(scale.tensors, scale.rows, scale.cols, dev)
    one = params[:1]
    t_cal = timed(lambda: apply_seed_sum_(one, seeds[:2], coefficients[:2]), dev)
    d, k = budget_share(scale, t_cal / 2)
    part = params[:k]
    t = timed(lambda: apply_seed_sum_(part, seeds[:d], coefficients[:d]), dev)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    for held in (params, one, part):
        held.clear()  # frees the device memory (the lambdas hold the lists)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    round_s = t * (scale.seeds / d) * (scale.tensors / k)
    return figure(
        f"{REPLAY} (FedKSeed server replay)",
        dev,
        f"{scale.seeds:,} seeds x {scale.params:,} float32 params "
        f"({scale.tensors} tensors {scale.rows}x{scale.cols})",
        round_s,
        scale.seeds / round_s,
        "seeds/s",
        target_s=scale.target_s,
        meets_target=round_s <= scale.target_s,
        extrapolated=(d, k) != (scale.seeds, scale.tensors),
        seeds_replayed=d,
        tensors_replayed=k,
        measured_s=t,
        per_seed_s=round_s / scale.seeds,
        values_per_s=d * k * scale.rows * scale.cols / t,
        calibration_s=t_cal,
        peak_memory_gib=peak,
    )


def _cpu_run(scale: ReplayScale) -> dict[str, Any]:
    """The CPU backend on a few tensors and seeds, extrapolated to the round."""
    from protocols.seeds import apply_seed_sum_

    seeds, coefficients = _round(scale.cpu_seeds)
    apply_seed_sum_([("warm-up", _tensors(1, 1, 8, "cpu")[0][1])], [1], [1.0])
    params = _tensors(scale.cpu_tensors, scale.rows, scale.cols, "cpu")
    numel = scale.cpu_tensors * scale.rows * scale.cols
    t = timed(lambda: apply_seed_sum_(params, seeds, coefficients), "cpu")
    params.clear()
    gc.collect()
    per_value = t / (scale.cpu_seeds * numel)
    round_s = per_value * scale.seeds * scale.params
    return figure(
        f"{REPLAY} (CPU backend, reduced scale)",
        "cpu",
        f"measured {scale.cpu_seeds} seeds x {numel:,} params; seconds "
        f"extrapolated to {scale.seeds:,} seeds x {scale.params:,} params",
        round_s,
        scale.cpu_seeds / t * numel / scale.params,
        "seeds/s (over the full parameter count)",
        target_s=scale.target_s,
        meets_target=round_s <= scale.target_s,
        extrapolated=True,
        measured_s=t,
        per_seed_s=per_value * scale.params,
        values_per_s=1.0 / per_value,
    )


def section_replay(scale: ReplayScale, device: Any) -> dict[str, Any]:
    """Replay figures: the round on ``device``, then the CPU reference.

    Returns
    -------
    dict[str, Any]
        ``function`` (what was timed), ``target_s`` and ``runs`` (figures).
    """
    return {
        "function": REPLAY,
        "target_s": scale.target_s,
        "target": (
            f"{scale.seeds:,} distinct seeds over {scale.params:,} parameters in "
            f"under {scale.target_s:g} s (FedKSeed's server replay took 124 s in "
            "Ferret's measurement)"
        ),
        "runs": [_device_run(scale, device), _cpu_run(scale)],
    }
