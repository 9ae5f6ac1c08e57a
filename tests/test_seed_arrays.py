"""The NumPy seed arithmetic (protocols.seed_arrays) equals the torch one, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protocols import ProtocolError, state_hash
from protocols.philox import numba_available
from protocols.seed_arrays import apply_seed_sum_arrays, perturb_arrays
from protocols.seeds import apply_seed_sum_, candidate_seeds, perturb_

BACKENDS = [False, True] if numba_available() else [False]


def _pairs(seed: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "embed.weight": (37, 8),
        "layer.0.w": (8, 8),
        "layer.0.b": (8,),
        "odd": (5,),
    }
    return [(n, torch.randn(s, generator=gen)) for n, s in shapes.items()]


def _arrays(pairs: list[tuple[str, torch.Tensor]]) -> list[tuple[str, np.ndarray]]:
    return [(n, t.numpy().copy()) for n, t in pairs]


@pytest.mark.parametrize("use_numba", BACKENDS)
def test_replay_matches_torch_over_several_rounds(use_numba: bool) -> None:
    pool = candidate_seeds(11, 64)
    tensors = _pairs(0)
    arrays = _arrays(tensors)
    rng = np.random.default_rng(3)
    for _ in range(4):  # several rounds, several seeds each
        idx = np.sort(rng.choice(64, size=9, replace=False))
        coeffs = (rng.standard_normal(9) * 1e-3).astype(np.float32).tolist()
        seeds = [pool[i] for i in idx]
        apply_seed_sum_(tensors, seeds, coeffs, backend="numpy")
        apply_seed_sum_arrays(arrays, seeds, coeffs, use_numba=use_numba)
        for (_, t), (_, a) in zip(tensors, arrays, strict=True):
            assert np.array_equal(t.numpy(), a)
        assert state_hash(tensors) == state_hash(arrays)


@pytest.mark.parametrize("use_numba", BACKENDS)
def test_perturb_matches_torch_and_restores(use_numba: bool) -> None:
    tensors = _pairs(1)
    arrays = _arrays(tensors)
    before = [a.copy() for _, a in arrays]
    for scale in (1e-3, -2e-3, 1e-3):
        perturb_(tensors, 12345, scale, backend="numpy")
        perturb_arrays(arrays, 12345, scale, use_numba=use_numba)
        for (_, t), (_, a) in zip(tensors, arrays, strict=True):
            assert np.array_equal(t.numpy(), a)
    for b, (_, a) in zip(before, arrays, strict=True):
        assert np.max(np.abs(b - a)) < 1e-6  # back to within a few ulps


def test_hash_tells_one_flipped_bit() -> None:
    arrays = _arrays(_pairs(2))
    h = state_hash(arrays)
    arrays[1][1].view(np.uint32)[0] ^= 1
    assert state_hash(arrays) != h


def test_refusals() -> None:
    arrays = _arrays(_pairs(3))
    with pytest.raises(ProtocolError, match="2 seeds but 1"):
        apply_seed_sum_arrays(arrays, [1, 2], [0.5])
    with pytest.raises(ProtocolError, match="float32"):
        perturb_arrays([("x", np.zeros(3, dtype=np.float64))], 1, 0.1)
    with pytest.raises(ProtocolError, match="no torch spelling"):
        state_hash([("x", np.zeros(3, dtype=np.int8))])
