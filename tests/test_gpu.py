"""CUDA against the CPU: the seed generator's bits and a FedKSeed round's model hash.

Seed-based methods work only if a CUDA server and a CPU client (or a
NumPy-only edge device) turn the same seeds into the same float32 bits.
These tests check that on a real GPU: the ``torch`` backend on CUDA gives the
NumPy reference's stream for many seeds, names and lengths (across the
CUDA chunk boundary), and a FedKSeed round replayed on CUDA (full model,
adapter-only, a client's MeZO step, float16 weights, a tensor longer than one
chunk) gives the model hash (:func:`protocols.model_hash.state_hash`) the CPU
gives.

All are marked ``gpu``: the default suite deselects them;
``bench/gpu_check.sh`` runs them with ``python -m pytest -m gpu``. Selected
on a machine without CUDA they skip, saying so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from models.zo_model import AdapterShape, ZoModel, load_zo_model
from protocols.model_hash import state_hash
from protocols.seeds import (
    apply_seed_sum_,
    candidate_seeds,
    gaussian,
    gaussian_numpy,
    perturb_,
)
from strategies.seed_pool import SeedUpdate, aggregate_seed_scalars

pytestmark = pytest.mark.gpu

NAMES = ("w", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight/é名")
SEEDS = (0, 1, 2**32 - 1, 2**32, 2**63 + 12345, 2**64 - 1, *candidate_seeds(7, 4))
LENGTHS = (1, 3, 4, 5, 1023, 65537)
# The torch backend works on 2**22 blocks (2**24 values) at a time on CUDA.
CHUNK = 4 * 2**22


@pytest.fixture
def cuda() -> torch.device:
    """The CUDA device; skips, saying why, on a machine without one."""
    if not torch.cuda.is_available():
        pytest.skip(
            "CUDA is not available: the gpu-marked tests need a CUDA device "
            "(run bench/gpu_check.sh on a GPU machine)"
        )
    return torch.device("cuda")


def _bits(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint32 bit patterns of float32 values (exact comparison)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def _fedkseed_round(
    pool: Sequence[int], clients: int, steps: int, seed: int
) -> tuple[list[int], list[float]]:
    """A round's replay input, as :meth:`server.zo_driver.ZoDriver.apply` forms it.

    ``clients`` clients each report ``steps`` (pool index, scalar) pairs; the
    strategy's mean rule folds them into sparse coefficients; the driver
    replays the pool seeds of those indices with those coefficients.
    """
    rng = np.random.default_rng(seed)
    updates = [
        SeedUpdate(
            torch.from_numpy(rng.integers(0, len(pool), size=steps).astype(np.int32)),
            torch.from_numpy(rng.normal(0.0, 3.0, size=steps).astype(np.float32)),
            num_examples=int(rng.integers(5, 50)),
        )
        for _ in range(clients)
    ]
    indices, coefficients = aggregate_seed_scalars(
        updates, num_seeds=len(pool), learning_rate=1e-3
    )
    return [pool[i] for i in indices.tolist()], coefficients.tolist()


def _both(
    adapter: AdapterShape | None, device: torch.device
) -> tuple[ZoModel, ZoModel]:
    """The tiny model FedKSeed perturbs, at w0, on the CPU and on ``device``."""
    cpu = load_zo_model("tiny-llama", adapter=adapter, device="cpu")
    dev = load_zo_model("tiny-llama", adapter=adapter, device=device)
    assert state_hash(cpu.params()) == state_hash(dev.params())
    return cpu, dev


# ---------------------------------------------------------------- generator


def test_cuda_streams_are_the_numpy_streams(cuda: torch.device) -> None:
    """Every (seed, name, length) stream on CUDA has the NumPy reference's bits.

    Breaks if a CUDA kernel treats the int64 multiplies, shifts, masks or the
    table lookup of the torch backend differently from NumPy.
    """
    for seed in SEEDS:
        for name in NAMES:
            for n in LENGTHS:
                got = gaussian(seed, name, n, device=cuda)
                assert got.device.type == "cuda"
                want = gaussian_numpy(seed, name, n)
                assert np.array_equal(_bits(got), _bits(want)), (seed, name, n)


def test_cuda_streams_agree_past_the_chunk_boundary(cuda: torch.device) -> None:
    """Values at offsets on both sides of a CUDA chunk equal the NumPy ones.

    Breaks if the block counter of a later chunk is offset wrongly (the
    values would shift or repeat after 2**24 elements).
    """
    n = CHUNK + 4 * 3 + 2
    for seed in (3, 2**63 + 1):
        got = _bits(gaussian(seed, "model.embed_tokens.weight", n, device=cuda))
        want = _bits(gaussian_numpy(seed, "model.embed_tokens.weight", n))
        for offset in (0, CHUNK - 5, CHUNK - 1, CHUNK, CHUNK + 1, n - 3):
            assert np.array_equal(got[offset:], want[offset:]), (seed, offset)
        assert not np.array_equal(got[:16], got[CHUNK : CHUNK + 16])


# ------------------------------------------------------------------- replay


def test_cuda_fedkseed_rounds_rebuild_the_cpu_model(cuda: torch.device) -> None:
    """Two replayed rounds on CUDA give the CPU's model hash after each round.

    The server replays on CUDA; every CPU client rebuilds the model from the
    same round deltas and must reach the hash the server announces. Breaks
    if CUDA fuses the multiply-add, reorders the seed sum or draws other
    values.
    """
    pool = candidate_seeds(2024, 256)
    cpu, dev = _both(None, cuda)
    w0 = state_hash(cpu.params())
    for r in range(2):
        seeds, coefficients = _fedkseed_round(pool, clients=3, steps=8, seed=r)
        assert len(seeds) > 5
        apply_seed_sum_(cpu.params(), seeds, coefficients)
        apply_seed_sum_(dev.params(), seeds, coefficients)
        assert dev.params()[0][1].is_cuda
        assert state_hash(dev.params()) == state_hash(cpu.params()), f"round {r + 1}"
    assert state_hash(cpu.params()) != w0


def test_cuda_adapter_round_rebuilds_the_cpu_adapter(cuda: torch.device) -> None:
    """FedKSeed over a LoRA adapter: the replayed adapter is the CPU's, bit for bit."""
    adapter = AdapterShape(rank=4, alpha=8.0, targets=("q_proj", "v_proj"), seed=3)
    cpu, dev = _both(adapter, cuda)
    w0 = state_hash(cpu.params())
    seeds, coefficients = _fedkseed_round(candidate_seeds(9, 128), 4, 6, seed=5)
    apply_seed_sum_(cpu.params(), seeds, coefficients)
    apply_seed_sum_(dev.params(), seeds, coefficients)
    assert state_hash(dev.params()) == state_hash(cpu.params()) != w0


def test_cuda_mezo_step_matches_the_cpu(cuda: torch.device) -> None:
    """A client's step (perturb +eps, -2 eps, +eps, then -lr g z) agrees bit for bit."""
    cpu, dev = _both(None, cuda)
    seed, eps, step = candidate_seeds(1, 1)[0], 1e-3, -2.5e-4
    for model in (cpu, dev):
        params = model.params()
        for scale in (eps, -2 * eps, eps):
            perturb_(params, seed, scale)
        apply_seed_sum_(params, [seed], [step])
    assert state_hash(dev.params()) == state_hash(cpu.params())


def test_cuda_replay_of_float16_weights_matches_the_cpu(cuda: torch.device) -> None:
    """float16 weights: the float32 seed sum is rounded once, the same on CUDA."""
    g = torch.Generator().manual_seed(0)
    w_cpu = (torch.randn(1000, 37, generator=g) * 0.02).to(torch.float16)
    w_dev = w_cpu.to(cuda)
    seeds = candidate_seeds(4, 16)
    coefficients = np.random.default_rng(2).normal(0.0, 0.05, size=16).tolist()
    apply_seed_sum_([("w", w_cpu)], seeds, coefficients)
    apply_seed_sum_([("w", w_dev)], seeds, coefficients)
    assert w_dev.dtype == torch.float16
    assert state_hash([("w", w_dev)]) == state_hash([("w", w_cpu)])


def test_cuda_replay_of_a_tensor_longer_than_a_chunk(cuda: torch.device) -> None:
    """A tensor over 2**24 values (one seed per batch on CUDA) replays to the CPU bits."""
    n = CHUNK + 7
    w_cpu = torch.zeros(n)
    w_dev = torch.zeros(n, device=cuda)
    seeds, coefficients = candidate_seeds(6, 3), [0.5, -0.25, 1e-3]
    apply_seed_sum_([("big", w_cpu)], seeds, coefficients)
    apply_seed_sum_([("big", w_dev)], seeds, coefficients)
    assert np.array_equal(_bits(w_dev), _bits(w_cpu))
    assert float(w_cpu.abs().max()) > 0
