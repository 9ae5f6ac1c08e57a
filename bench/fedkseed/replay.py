"""Section 4: server replay time against its generation floor, and a paper round.

``apply_seed_sum_`` over every parameter for D seeds is timed against the
floor of generating one perturbation per seed and tensor (``gaussian``,
results discarded); the per-value replay time is extrapolated to a paper
round (E[distinct seeds] of 10 clients x 200 draws from K = 4096).
"""

from __future__ import annotations

from typing import Any

from bench.fedkseed.settings import (
    MODEL,
    PAPER_CLIENTS,
    PAPER_K,
    PAPER_LR,
    PAPER_TAU,
    expected_distinct,
)
from bench.harness import generation_throughput, now


def section_replay(params: list[Any], d: int, repeats: int) -> dict[str, Any]:
    """Replay and floor times for ``d`` seeds over ``params``, best of ``repeats``.

    Parameters
    ----------
    params : list[tuple[str, torch.Tensor]]
        The parameters replayed (the full ``ParamWalk``).
    d : int
        Distinct seeds replayed.
    repeats : int
        Timed repeats of each (the fastest is used).

    Returns
    -------
    dict[str, Any]
        ``settings``, the raw times, per-seed times, their ratio, rates, and
        ``paper_round`` (the extrapolation).
    """
    import numpy as np
    import torch

    from protocols.seeds import apply_seed_sum_, candidate_seeds, gaussian

    numel = sum(p.numel() for _, p in params)
    seeds = candidate_seeds(0, PAPER_K)[:d]
    coeffs = (np.random.default_rng(1).normal(0, 5.0, size=d) * -PAPER_LR).tolist()
    apply_seed_sum_([("warm-up", torch.zeros(8))], [1], [1.0])  # compile
    gaussian(1, "warm-up", 8)
    replay, floor = [], []
    for _ in range(repeats):
        t0 = now()
        apply_seed_sum_(params, seeds, coeffs)
        replay.append(now() - t0)
        t0 = now()
        for s in seeds:
            for name, p in params:
                gaussian(s, name, p.numel())  # generated, then discarded
        floor.append(now() - t0)
    best_replay, best_floor = min(replay), min(floor)
    per_value = best_replay / (d * numel)
    standalone = generation_throughput(1 << 22, "numba")
    torch_backend = generation_throughput(1 << 20, "torch", min_time=0.3)
    d_paper = expected_distinct(PAPER_K, PAPER_CLIENTS * PAPER_TAU)
    paper_values = d_paper * numel
    return {
        "settings": {
            "model": MODEL,
            "params": numel,
            "tensors": len(params),
            "D": d,
            "repeats": repeats,
            "backend": "auto (numba on CPU)",
        },
        "replay_s": replay,
        "floor_s": floor,
        "replay_s_per_seed": best_replay / d,
        "floor_s_per_seed": best_floor / d,
        "ratio_replay_over_floor": best_replay / best_floor,
        "replay_values_per_s": d * numel / best_replay,
        "floor_values_per_s": d * numel / best_floor,
        "generator_standalone_values_per_s": standalone,
        "ideal_s_per_seed_at_standalone_rate": numel / standalone,
        "torch_int_backend_cpu_values_per_s": torch_backend,
        "paper_round": {
            "distinct_seeds": d_paper,
            "values": paper_values,
            "cpu_seconds_extrapolated": paper_values * per_value,
            "cpu_seconds_torch_int_backend": paper_values / torch_backend,
        },
        "cuda_available": torch.cuda.is_available(),
    }
