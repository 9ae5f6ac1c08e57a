"""Section 4: generated values and replay seconds per round, by perturbed set.

For each walk (:data:`bench.edge.settings.WALKS`: every parameter, a
``zo.include`` subset, a LoRA adapter's A and B) a round of K distinct
seeds is replayed three ways from the same w0: the torch path
(``protocols.seeds.apply_seed_sum_``, numba kernels), the NumPy path with
numba (``protocols.seed_arrays.apply_seed_sum_arrays``) and the NumPy path
without it (the edge install's NumPy reference). Each result is compared
bit for bit with the torch one. Generated values per round are the walk's
size times K; the per-seed time is extrapolated to a paper round (the
expected distinct seeds of 10 clients x 200 draws from K = 4096).
"""

from __future__ import annotations

import gc
from typing import Any

from bench.edge.settings import PAPER_DRAWS, PAPER_K, Scale
from bench.harness import now


def expected_distinct(k: int, draws: int) -> float:
    """Expected number of distinct seeds among ``draws`` uniform draws from ``k``."""
    return k * (1.0 - (1.0 - 1.0 / k) ** draws)


def adapter_shape(rank: int) -> Any:
    """The adapter of the adapter walk: ``rank``, the ``[zo]`` defaults otherwise."""
    from models.zo_model import AdapterShape
    from server.config import ZOSection

    zo = ZOSection()
    return AdapterShape(
        rank, zo.adapter_alpha, tuple(zo.adapter_targets), zo.adapter_seed
    )


def walk_params(walk: str, scale: Scale) -> tuple[list[Any], dict[str, Any]]:
    """The perturbed tensors of ``walk`` at w0, and how the walk was built."""
    from models.zo_model import load_zo_model

    if walk == "full":
        zo = load_zo_model(scale.model)
        how: dict[str, Any] = {"include": []}
    elif walk == "subset":
        zo = load_zo_model(scale.model, include=scale.subset)
        how = {"include": list(scale.subset), "name": scale.subset_name}
    elif walk == "adapter":
        shape = adapter_shape(scale.adapter_rank)
        zo = load_zo_model(scale.model, adapter=shape)
        how = {
            "rank": shape.rank,
            "alpha": shape.alpha,
            "targets": list(shape.targets),
        }
    else:
        raise ValueError(f"unknown walk {walk!r}")
    return zo.params(), how


def _replay_walk(params: list[Any], k: int) -> dict[str, Any]:
    """Time the three replays of ``k`` seeds over ``params``; compare their bits."""
    import numpy as np
    import torch

    from protocols.philox import candidate_seeds
    from protocols.seed_arrays import apply_seed_sum_arrays
    from protocols.seeds import apply_seed_sum_

    seeds = candidate_seeds(0, PAPER_K)[:k]
    coeffs = (np.random.default_rng(1).normal(0, 5.0, size=k) * -1e-6).tolist()
    w0 = [(n, p.detach().numpy().copy()) for n, p in params]
    out: dict[str, Any] = {}
    t0 = now()
    apply_seed_sum_(params, seeds, coeffs)
    out["torch_s"] = now() - t0
    with torch.no_grad():
        want = [p.detach().numpy() for _, p in params]
    for key, use_numba in (("numpy_numba_s", True), ("numpy_reference_s", False)):
        arrays = [(n, a.copy()) for n, a in w0]
        t0 = now()
        apply_seed_sum_arrays(arrays, seeds, coeffs, use_numba=use_numba)
        out[key] = now() - t0
        out[key.replace("_s", "_bit_identical")] = all(
            np.array_equal(a, b) for (_, a), b in zip(arrays, want, strict=True)
        )
        del arrays
    return out


def section_replay(scale: Scale) -> dict[str, Any]:
    """Every walk's round of ``scale.replay_seeds`` seeds, three ways."""
    import torch

    from protocols.seed_arrays import apply_seed_sum_arrays
    from protocols.seeds import apply_seed_sum_

    apply_seed_sum_([("warm-up", torch.zeros(8))], [1], [1.0])  # numba compile
    apply_seed_sum_arrays([("warm-up", torch.zeros(8).numpy())], [1], [1.0])
    k = scale.replay_seeds
    paper_seeds = expected_distinct(PAPER_K, PAPER_DRAWS)
    walks: dict[str, Any] = {}
    for walk in ("full", "subset", "adapter"):
        params, how = walk_params(walk, scale)
        numel = sum(p.numel() for _, p in params)
        timed = _replay_walk(params, k)
        per_seed = {
            key[:-2]: timed[key] / k
            for key in ("torch_s", "numpy_numba_s", "numpy_reference_s")
        }
        walks[walk] = {
            **how,
            "tensors": len(params),
            "numel": numel,
            "generated_values_per_round": numel * k,
            **timed,
            "paper_round_seconds": {n: s * paper_seeds for n, s in per_seed.items()},
            "paper_round_values": numel * paper_seeds,
        }
        del params
        gc.collect()
    return {
        "model": scale.model,
        "seeds": k,
        "paper_round_distinct_seeds": paper_seeds,
        "walks": walks,
    }
