"""Tests for protocols.seeds / protocols.philox: the seed -> perturbation map.

The map is part of the wire protocol: a server and its clients rebuild the
same model from seeds only if every party turns a seed into the same float32
bits, on CPU, on CUDA and on a numpy-only device. These tests pin the
generator (Philox known-answer vectors, the Gaussian table's hash, golden
values), check that every backend gives identical bits, and check the float32
arithmetic rules of perturbation and replay.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.harness import generation_throughput
from protocols import philox
from protocols.errors import ProtocolError
from protocols.make_gaussian_lut import build_table
from protocols.seeds import (
    GENERATOR_VERSION,
    ParamWalk,
    apply_seed_sum_,
    candidate_seeds,
    gaussian,
    gaussian_numpy,
    name_hash32,
    perturb_,
    philox4x32,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU_BACKENDS = ("numba", "numpy", "torch")
PINNED_LUT_SHA256 = "8babbcaf96568f10165a1eab530c0e5c92d04de96761b6dbb3dadfa94baba37f"
MASK = 0xFFFFFFFF


def _bits(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint32 bit patterns of a float32 tensor or array (exact comparison)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def _philox_python(counter: tuple[int, ...], key: int) -> list[int]:
    """Philox4x32-10 with Python ints, written independently of the module."""
    c = list(counter)
    k0, k1 = key & MASK, key >> 32
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & MASK, (p0 >> 32) ^ c[3] ^ k1, p0 & MASK]
    return c


# ------------------------------------------------------------------ Philox


KATS = [
    ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (MASK, MASK, MASK, MASK),
        (MASK << 32) | MASK,
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0x299F31D0 << 32) | 0xA4093822,
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KATS)
def test_philox_matches_random123_known_answers(
    counter: tuple[int, ...], key: int, expected: tuple[int, ...]
) -> None:
    """Random123's kat_vectors for philox4x32-10 (zero, all-ones, pi).

    Breaks if a constant, the round structure, the key schedule or the key
    word order (lo32, hi32) is wrong: then our "Philox" is some other function
    and nobody else's implementation would agree with it.
    """
    out = philox4x32(key, np.array([counter], dtype=np.uint32))
    assert out.dtype == np.uint32
    assert out.shape == (1, 4)
    assert tuple(int(w) for w in out[0]) == expected
    assert tuple(_philox_python(counter, key)) == expected
    single = philox4x32(key, np.array(counter, dtype=np.uint32))
    assert single.shape == (4,) and tuple(int(w) for w in single) == expected


def test_philox_agrees_with_a_plain_python_reference_on_random_inputs() -> None:
    """Vectorised numpy Philox equals the Python-int version on random counters.

    Breaks if the uint64 masking or the mulhi/mullo split loses bits for some
    inputs (the KATs alone cover only three counters).
    """
    rng = np.random.default_rng(7)
    counters = rng.integers(0, 2**32, size=(64, 4), dtype=np.uint64).astype(np.uint32)
    for key in (1, 2**63 + 12345, int(rng.integers(0, 2**63))):
        out = philox4x32(key, counters)
        for row, got in zip(counters, out, strict=True):
            assert list(map(int, got)) == _philox_python(tuple(map(int, row)), key)


def test_philox_rejects_bad_counters_and_keys() -> None:
    """Malformed counters or keys raise ProtocolError naming the value.

    Breaks if a 64-bit counter word or a negative key is silently truncated.
    """
    with pytest.raises(ProtocolError, match=r"\(n, 4\)"):
        philox4x32(0, np.zeros((3, 3), dtype=np.uint32))
    with pytest.raises(ProtocolError, match="uint32"):
        philox4x32(0, np.array([[2**32, 0, 0, 0]], dtype=np.int64))
    with pytest.raises(ProtocolError, match="-1"):
        philox4x32(-1, np.zeros((1, 4), dtype=np.uint32))
    with pytest.raises(ProtocolError, match=str(2**64)):
        philox4x32(2**64, np.zeros((1, 4), dtype=np.uint32))


def test_name_hash32_is_first_four_sha256_bytes_little_endian() -> None:
    """The counter's name word follows the spec (and a pinned value).

    Breaks if the hash, the byte order or the encoding changes: every tensor's
    stream would change with it.
    """
    for name in ("model.layers.0.weight", "", "ü.weight"):
        digest = hashlib.sha256(name.encode("utf-8")).digest()
        assert name_hash32(name) == int.from_bytes(digest[:4], "little")
    assert name_hash32("model.layers.0.weight") == 0x8F6BC740
    with pytest.raises(ProtocolError, match="str"):
        name_hash32(b"bytes")  # type: ignore[arg-type]


def test_stream_is_lut_of_philox_words_at_the_specified_counters() -> None:
    """Element i = LUT[word i%4 of Philox(counter (i//4, 0, hash, 0)) >> 16].

    Breaks if the counter layout (block words, name word, zero word), the
    word order within a block or the 16-bit table index drifts from the spec.
    """
    seed, name, numel = 0xDEADBEEF12345678, "layer.weight", 11
    h = name_hash32(name)
    counters = np.array([[b, 0, h, 0] for b in range(3)], dtype=np.uint32)
    words = philox4x32(seed, counters).reshape(-1)[:numel]
    expected = philox.gaussian_lut()[words >> 16]
    assert np.array_equal(_bits(gaussian_numpy(seed, name, numel)), _bits(expected))


# --------------------------------------------------------- backends agree


CASES = [
    (0, "model.layers.0.weight", 1),
    (1, "w", 3),
    (2**64 - 1, "w", 5),
    (123456789, "model.embed_tokens.weight", 4 * 512 + 3),
    (2**40 + 17, "lm_head.weight", 4 * 512 * 33 + 2),
    (987654321, "model.layers.3.mlp.up_proj.weight", 10**6),
]


@pytest.mark.parametrize(("seed", "name", "numel"), CASES)
def test_backends_give_identical_bits_on_cpu(seed: int, name: str, numel: int) -> None:
    """numpy, numba (one or several threads) and torch int ops agree bit for bit.

    Breaks if one backend mishandles a tail block (numel not a multiple of 4),
    a chunk boundary, 64-bit seeds or the threaded split: clients on different
    backends would then replay different models.
    """
    ref = _bits(gaussian_numpy(seed, name, numel))
    assert ref.shape == (numel,)
    for backend in CPU_BACKENDS:
        got = gaussian(seed, name, numel, backend=backend)
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        assert np.array_equal(_bits(got), ref), backend
    assert np.array_equal(_bits(gaussian(seed, name, numel)), ref)


def test_streams_are_prefix_consistent_and_empty_is_fine() -> None:
    """The first n values of a stream do not depend on how many are drawn.

    Breaks if the values depend on the tensor size (as torch.randn's do below
    16 elements on CPU), which would tie z to the layout instead of the index.
    """
    long = _bits(gaussian(5, "x", 4 * 512 * 40 + 1))
    for n in (0, 1, 2, 4 * 512 - 1, 4 * 512 * 17):
        for backend in CPU_BACKENDS:
            assert np.array_equal(_bits(gaussian(5, "x", n, backend=backend)), long[:n])


GOLDEN = {
    0: [
        0xBF8A30C6,
        0xBE4B544B,
        0xBEB88632,
        0x3F342D41,
        0xBF107E9F,
        0x3FA865FB,
        0x3EA42502,
        0x3F996AEF,
    ],
    123456789: [
        0x3D503861,
        0x3F7C9EE8,
        0xBE828077,
        0xBEFED2B6,
        0xBE831BDB,
        0x3F71FCED,
        0x3FB069D7,
        0x3F2C1FDF,
    ],
}


@pytest.mark.parametrize("seed", sorted(GOLDEN))
def test_golden_values_are_pinned(seed: int) -> None:
    """The first 8 values for two seeds, as float32 bit patterns.

    Breaks on any change of the generator, table or counter layout. If that
    change is intended, bump GENERATOR_VERSION (peers compare it in the
    handshake) and re-pin these values.
    """
    assert GENERATOR_VERSION == "philox4x32-10+gauss-lut16/1"
    for backend in CPU_BACKENDS:
        got = gaussian(seed, "model.layers.0.weight", 8, backend=backend)
        assert [int(w) for w in _bits(got)] == GOLDEN[seed], backend


@pytest.mark.gpu
def test_cuda_torch_backend_matches_numpy_bits() -> None:
    """Torch int ops on CUDA give the numpy bits, and replay on CUDA equals CPU.

    Breaks if a CUDA kernel treats int64 shifts, masks or the table lookup
    differently from the CPU, or if CUDA fuses the replay's multiply-add.
    """
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    for seed, name, numel in [*CASES, (3, "big", 3 * 2**22 + 1)]:
        got = gaussian(seed, name, numel, device="cuda")
        assert got.device.type == "cuda"
        assert np.array_equal(_bits(got), _bits(gaussian_numpy(seed, name, numel)))
    seeds = candidate_seeds(11, 32)
    coefficients = np.random.default_rng(0).normal(size=32).tolist()
    w_cpu = torch.randn(333, 77, generator=torch.Generator().manual_seed(0))
    w_gpu = w_cpu.cuda()
    apply_seed_sum_([("w", w_cpu)], seeds, coefficients)
    apply_seed_sum_([("w", w_gpu)], seeds, coefficients)
    assert np.array_equal(_bits(w_gpu), _bits(w_cpu))
    perturb_([("w", w_cpu)], seeds[0], 1e-3)
    perturb_([("w", w_gpu)], seeds[0], 1e-3)
    assert np.array_equal(_bits(w_gpu), _bits(w_cpu))


# ---------------------------------------------------------------- the table


def test_lut_file_is_pinned_and_rebuildable() -> None:
    """The committed table hashes to the pinned value and the script rebuilds it.

    Breaks if someone regenerates the table differently (another quantile
    algorithm, another scaling), edits the file, or changes the pin without
    changing the protocol version.
    """
    data = philox.LUT_PATH.read_bytes()
    assert len(data) == 262_144
    assert hashlib.sha256(data).hexdigest() == PINNED_LUT_SHA256 == philox.LUT_SHA256
    assert build_table() == data


def test_lut_has_unit_variance_zero_mean_and_symmetry() -> None:
    """Table moments: mean 0, population variance 1 within 1e-6, antisymmetric.

    Breaks if the rescaling or the float32 rounding is wrong, which would
    bias every perturbation (and FedKSeed's gradient estimate).
    """
    lut = philox.gaussian_lut()
    assert lut.dtype == np.float32 and lut.shape == (65_536,)
    x = lut.astype(np.float64)
    assert np.array_equal(lut, -lut[::-1])
    assert abs(x.mean()) < 1e-12
    assert abs((x * x).mean() - 1.0) < 1e-6
    assert np.all(np.diff(x) > 0)
    assert 4.3 < x[-1] < 4.35 and np.all(lut != 0)


def test_tampered_or_missing_lut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table with one flipped bit is refused; a missing file is rebuilt.

    Breaks if the hash check is skipped (a corrupted table would silently
    desynchronise a client) or if a bundle without the .f32 file cannot work.
    """
    bad = bytearray(philox.LUT_PATH.read_bytes())
    bad[1000] ^= 1
    (tmp_path / "bad.f32").write_bytes(bytes(bad))
    philox.gaussian_lut.cache_clear()
    try:
        monkeypatch.setattr(philox, "LUT_PATH", tmp_path / "bad.f32")
        with pytest.raises(ProtocolError, match="sha256"):
            philox.gaussian_lut()
        monkeypatch.setattr(philox, "LUT_PATH", tmp_path / "absent.f32")
        philox.gaussian_lut.cache_clear()
        rebuilt = philox.gaussian_lut()
        assert hashlib.sha256(rebuilt.tobytes()).hexdigest() == PINNED_LUT_SHA256
        assert not rebuilt.flags.writeable
    finally:
        monkeypatch.undo()
        philox.gaussian_lut.cache_clear()


# --------------------------------------------------------------- statistics


def test_draws_look_standard_normal() -> None:
    """10^6 draws: mean within 0.01 of 0, std within 0.01 of 1, sane tails.

    Breaks if words are reused, the table index is taken from the wrong bits,
    or the table is mis-scaled.
    """
    z = gaussian(42, "stats", 10**6).double()
    assert abs(z.mean().item()) < 0.01
    assert abs(z.std().item() - 1.0) < 0.01
    frac = (z.abs() > 1.96).double().mean().item()
    assert 0.045 < frac < 0.055


def test_streams_of_other_names_and_seeds_are_uncorrelated() -> None:
    """Different names, seeds or neighbouring seeds give uncorrelated streams.

    Breaks if the name word or the key does not reach every output word
    (e.g. two tensors of one seed sharing a stream would correlate fully).
    """
    n = 10**6
    base = gaussian(1000, "a", n).double()
    for other in (
        gaussian(1000, "b", n),
        gaussian(1001, "a", n),
        gaussian(1000 + 2**32, "a", n),
    ):
        r = torch.corrcoef(torch.stack([base, other.double()]))[0, 1].item()
        assert abs(r) < 0.01
    shifted = torch.corrcoef(torch.stack([base[:-4], base[4:]]))[0, 1].item()
    assert abs(shifted) < 0.01


# ----------------------------------------------------------- candidate seeds


def test_candidate_seeds_are_deterministic_distinct_and_63_bit() -> None:
    """The pool depends only on (master seed, k), has k distinct 63-bit seeds.

    Breaks if the server and clients could derive different pools from the
    same master seed, or a seed could exceed 2**63 (not a valid int64).
    """
    pool = candidate_seeds(2024, 4096)
    assert pool == candidate_seeds(2024, 4096)
    assert len(pool) == 4096 and len(set(pool)) == 4096
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in pool)
    assert candidate_seeds(2024, 10) == pool[:10]
    assert candidate_seeds(2025, 10) != pool[:10]
    assert candidate_seeds(2**64 - 1, 1)[0] < 2**63


@pytest.mark.parametrize("k", [0, -3, True, 2.0, philox.MAX_CANDIDATE_SEEDS + 1])
def test_candidate_seeds_rejects_bad_k(k: object) -> None:
    """A k < 1, a non-integer or an absurd k raises ProtocolError naming it.

    Breaks if an empty pool or a float k were accepted.
    """
    with pytest.raises(ProtocolError, match="k must"):
        candidate_seeds(1, k)  # type: ignore[arg-type]


# ----------------------------------------------------------------- ParamWalk


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.block = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.steps = torch.nn.Parameter(
            torch.zeros(2, dtype=torch.long), requires_grad=False
        )


def test_param_walk_follows_named_parameters_once_per_tensor() -> None:
    """Order = named_parameters(); tied weights once (first name); floats only.

    Breaks if the walk order depends on something else (dict order of a state
    dict, sorting) or a tied weight is perturbed twice.
    """
    model = _Tied()
    walk = ParamWalk.from_model(model)
    expected = [n for n, p in model.named_parameters() if p.is_floating_point()]
    assert list(walk.names) == expected
    assert "head.weight" not in walk.names and walk.names[0] == "embed.weight"
    assert walk.shapes[0] == (10, 4)
    assert walk.numel == sum(p.numel() for _, p in walk.params(model))
    assert [p for _, p in walk.params(model)][0] is model.embed.weight


def test_param_walk_include_globs_and_errors() -> None:
    """Include globs filter (any name of a tied tensor counts); a bad glob is named.

    Breaks if a typo in a config glob silently perturbs nothing, or if a
    model missing a walked tensor / with another shape is accepted.
    """
    model = _Tied()
    walk = ParamWalk.from_model(model, include=["block.*", "norm.weight"])
    assert walk.names == ("block.weight", "block.bias", "norm.weight")
    assert ParamWalk.from_model(model, include=["head.*"]).names == ("embed.weight",)
    with pytest.raises(ProtocolError, match=r"'nrom\.\*'"):
        ParamWalk.from_model(model, include=["block.*", "nrom.*"])
    with pytest.raises(ProtocolError, match="globs"):
        ParamWalk.from_model(model, include="block.*")
    model.block.weight.requires_grad_(False)
    trainable = ParamWalk.from_model(model, trainable_only=True)
    assert "block.weight" not in trainable.names and "block.bias" in trainable.names

    other = _Tied()
    other.block = torch.nn.Linear(4, 5)
    with pytest.raises(ProtocolError, match=r"block\.weight.*\(5, 4\)"):
        walk.params(other)
    with pytest.raises(ProtocolError, match="missing.w"):
        ParamWalk(("missing.w",), ((1,),)).params(model)
    with pytest.raises(ProtocolError, match="twice"):
        ParamWalk(("a", "a"), ((1,), (1,)))


def test_param_walk_fingerprint() -> None:
    """The fingerprint is 16 hex digits and changes with any name or shape.

    Breaks if two parties with different parameter lists could shake hands
    on the same fingerprint.
    """
    walk = ParamWalk(("a", "b"), ((2, 3), (4,)))
    fp = walk.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == ParamWalk(("a", "b"), ((2, 3), (4,))).fingerprint()
    assert fp != ParamWalk(("a", "b"), ((3, 2), (4,))).fingerprint()
    assert fp != ParamWalk(("b", "a"), ((2, 3), (4,))).fingerprint()
    assert fp != ParamWalk(("a", "c"), ((2, 3), (4,))).fingerprint()


# ------------------------------------------------------------------ perturb_


def _weights(
    shape: tuple[int, ...], seed: int = 0, dtype=torch.float32
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_perturb_equals_weight_plus_scaled_gaussian(backend: str) -> None:
    """perturb_ is exactly p + float32(scale) * gaussian(seed, name) per tensor.

    Breaks if a backend fuses the multiply-add (one rounding instead of two),
    multiplies in float64, or uses another stream than gaussian()'s.
    """
    scale = 1e-3 / 3
    params = [("a", _weights((37, 5), 1)), ("b", _weights((2**17 + 1,), 2))]
    expected = [
        p + float(np.float32(scale)) * gaussian(99, n, p.numel()).view(p.shape)
        for n, p in params
    ]
    perturb_(params, 99, scale, backend=backend)
    for (_, p), e in zip(params, expected, strict=True):
        assert np.array_equal(_bits(p), _bits(e))


def test_perturb_round_trip_and_zero_scale() -> None:
    """+eps, -2eps, +eps returns float32 weights to within 2 ulps; scale 0 is a no-op.

    Each step is one rounded float32 addition, so the round trip is exact up
    to rounding: at most half an ulp of the running value per step. Breaks if
    perturbation drifts (MeZO issue #42) or scale 0 touches the weights
    (even -0.0 vs +0.0).
    """
    w = torch.nn.Parameter(_weights((300, 70)))
    w.data[0, 0] = -0.0
    original = w.detach().clone()
    params = [("layer.weight", w)]
    eps = 1e-3
    perturb_(params, 5, eps)
    perturb_(params, 5, -2 * eps)
    perturb_(params, 5, eps)
    ulp = np.spacing(np.abs(original.numpy()) + np.float32(2 * eps * 4.33))
    diff = np.abs(w.detach().numpy() - original.numpy())
    assert np.all(diff <= 2 * ulp)
    perturb_(params, 5, 0.0)
    perturb_(params, 5, 1e-60)  # rounds to 0 in float32
    snapshot = _bits(w)
    perturb_(params, 6, 0.0)
    assert np.array_equal(_bits(w), snapshot)


def test_perturb_half_precision_rounds_once() -> None:
    """float16/bfloat16 weights: the float32 sum rounded once to the dtype.

    Breaks if z is cast to half before scaling (two extra roundings) or if
    backends differ for half-precision parameters.
    """
    for dtype in (torch.float16, torch.bfloat16):
        results = []
        for backend in CPU_BACKENDS:
            p = _weights((1001,), 3, dtype)
            want = (p.float() + gaussian(8, "h", 1001) * float(np.float32(0.01))).to(
                dtype
            )
            perturb_([("h", p)], 8, 0.01, backend=backend)
            assert torch.equal(p.view(torch.int16), want.view(torch.int16)), (
                dtype,
                backend,
            )
            results.append(p)


def test_numba_in_place_path_is_seen_by_autograd() -> None:
    """Writing a parameter through numpy still bumps its autograd version.

    Breaks if a perturbed weight that a pending backward pass saved is used
    silently (autograd must raise, as for any in-place op).
    """
    w = torch.nn.Parameter(_weights((64,)))
    loss = (w * w).sum()
    perturb_([("w", w)], 1, 1e-3, backend="numba")
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_numba_is_lazy_and_fastmath_is_off() -> None:
    """Importing seeds compiles and imports nothing heavy; kernels keep IEEE math.

    Breaks if numba is imported at module import (seconds of start-up on
    every client), or if fastmath (FMA contraction, reassociation) is turned
    on, which would change the replay's bits.
    """
    code = "import sys, protocols.seeds; print(int('numba' in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == "0"
    kernels = philox._numba_kernels()
    assert kernels is not None
    for dispatcher in (kernels.fill, kernels.axpy):
        assert not dispatcher.targetoptions.get("fastmath")
        assert dispatcher.targetoptions.get("nogil")
        assert dispatcher.targetoptions.get("cache") in (None, False)


@pytest.mark.parametrize("threads", [1, 3])
def test_numba_thread_split_does_not_change_bits(
    threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generation and replay give the same bits on 1 thread and on 3 threads.

    Breaks if the block ranges handed to the helper threads overlap, leave a
    gap or shift the block numbering (the counter must stay global).
    """
    numel = 4 * 512 * 7 + 2
    seeds, coefficients = candidate_seeds(3, 5), [0.5, -0.25, 1e-3, 2.0, -1.0]
    ref = _bits(gaussian_numpy(seeds[0], "s", numel))
    w = _weights((numel,), 4)
    expected = _weights((numel,), 4)
    apply_seed_sum_([("s", expected)], seeds, coefficients, backend="torch")
    monkeypatch.setattr(philox, "_cpu_threads", lambda: threads)
    monkeypatch.setattr(philox, "_THREAD_MIN_WORK", 1)
    assert np.array_equal(_bits(gaussian(seeds[0], "s", numel, backend="numba")), ref)
    apply_seed_sum_([("s", w)], seeds, coefficients, backend="numba")
    assert np.array_equal(_bits(w), _bits(expected))


def test_without_numba_auto_falls_back_to_numpy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With numba missing, "auto" uses numpy (same bits); "numba" is refused.

    Breaks if a device without numba cannot perturb or replay at all, or if
    asking for numba there silently does something else.
    """
    monkeypatch.setattr(philox, "_numba_kernels", lambda: None)
    ref = _bits(gaussian_numpy(4, "n", 1001))
    assert np.array_equal(_bits(gaussian(4, "n", 1001)), ref)
    w, expected = _weights((1001,)), _weights((1001,))
    apply_seed_sum_([("n", w)], [4, 5], [0.5, 0.25])
    apply_seed_sum_([("n", expected)], [4, 5], [0.5, 0.25], backend="torch")
    assert np.array_equal(_bits(w), _bits(expected))
    with pytest.raises(ProtocolError, match="numba"):
        gaussian(4, "n", 10, backend="numba")


def test_numpy_generator_runs_without_torch() -> None:
    """protocols.philox works where torch is not installed (edge devices).

    Breaks if the pure-numpy path starts importing torch (directly or via the
    protocols package's __init__).
    """
    code = (
        "import sys, types\n"
        "sys.modules['torch'] = None\n"
        "pkg = types.ModuleType('protocols')\n"
        f"pkg.__path__ = [{str(REPO_ROOT / 'protocols')!r}]\n"
        "sys.modules['protocols'] = pkg\n"
        "from protocols.philox import gaussian_numpy\n"
        "z = gaussian_numpy(0, 'model.layers.0.weight', 8)\n"
        "print(hex(int(z.view('uint32')[0])), int('torch' in sys.modules and sys.modules['torch'] is not None))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == [hex(GOLDEN[0][0]), "0"]


# ------------------------------------------------------------ apply_seed_sum_


def _replay_case() -> tuple[list[int], list[float]]:
    seeds = candidate_seeds(77, 24)
    rng = np.random.default_rng(3)
    coefficients = (rng.normal(size=24) * 1e-3).tolist()
    coefficients[5] = 0.0
    coefficients[17] = 0.0
    return seeds, coefficients


# Sizes: inline and thread-split numba calls, tails and a 0-d tensor.
SHAPES = [(3,), (513, 7), (4 * 512 * 9 + 3,), (2**17 + 5,), ()]


def test_apply_seed_sum_matches_float64_reference() -> None:
    """The replay equals the exact (float64) sum within 1e-6 relative.

    "Relative" is measured against the magnitude of the summed terms,
    ``||sum_j |c_j z_j| ||``, plus one rounding of the weights themselves,
    because a sum with cancellation (the lone scalar here) has no useful
    relative accuracy of its own. The float32 accumulation of 22 terms is
    ~4e-8 off on that scale. Breaks if a seed, coefficient or tensor is
    mismatched, skipped or applied twice.
    """
    seeds, coefficients = _replay_case()
    params = [(f"t{i}", _weights(s, i)) for i, s in enumerate(SHAPES)]
    before = [p.double().clone() for _, p in params]
    apply_seed_sum_(params, seeds, coefficients)
    for (name, p), w0 in zip(params, before, strict=True):
        ref = w0.clone().reshape(-1)
        magnitude = torch.zeros_like(ref)
        for s, c in zip(seeds, coefficients, strict=True):
            term = c * gaussian(s, name, p.numel()).double()
            ref += term
            magnitude += term.abs()
        err = (p.double().reshape(-1) - ref).norm()
        weight_rounding = torch.from_numpy(
            np.spacing(ref.float().abs().numpy())
        ).double()
        assert err <= 1e-6 * magnitude.norm() + weight_rounding.norm(), name


def _replay(
    backend: str, shapes, seeds, coefficients, dtype=torch.float32, transpose=False
):
    params = []
    for i, s in enumerate(shapes):
        w = _weights(s, i, dtype)
        if transpose and w.dim() == 2:
            # Same values, non-contiguous: the numba path takes its buffered route.
            w = w.t().contiguous().t()
            assert not w.is_contiguous()
        params.append((f"layer{i}.weight", w))
    apply_seed_sum_(params, seeds, coefficients, backend=backend)
    return [p for _, p in params]


def test_apply_seed_sum_is_bit_identical_across_backends() -> None:
    """Numba (fused, in place and buffered), numpy and torch replays agree.

    Breaks if any backend differs in accumulation order, start value (+0.0),
    coefficient rounding or fused multiply-add: clients and server would then
    hold different models after a FedKSeed pull.
    """
    seeds, coefficients = _replay_case()
    ref = _replay("torch", SHAPES, seeds, coefficients)
    for backend, transpose in [("numba", False), ("numba", True), ("numpy", False)]:
        got = _replay(backend, SHAPES, seeds, coefficients, transpose=transpose)
        for r, g in zip(ref, got, strict=True):
            assert np.array_equal(_bits(g.contiguous()), _bits(r.contiguous())), backend
    for dtype in (torch.float16, torch.bfloat16):
        halves = [
            _replay(b, SHAPES[:3], seeds, coefficients, dtype) for b in CPU_BACKENDS
        ]
        for other in halves[1:]:
            for a, b in zip(halves[0], other, strict=True):
                assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_apply_seed_sum_rounding_rule() -> None:
    """Replay = p + (((+0 + z1*c1) + z2*c2) + ...), each product rounded to float32.

    Written out with numpy float32 operations; skipping zero coefficients is
    the same as dropping them. Breaks if the rule of the module docstring and
    the implementation part ways.
    """
    seeds, coefficients = _replay_case()
    n = 1001
    w = _weights((n,), 9)
    expected = w.numpy().copy()
    acc = np.zeros(n, dtype=np.float32)
    for s, c in zip(seeds, coefficients, strict=True):
        if c:
            acc = acc + gaussian_numpy(s, "r", n) * np.float32(c)
    expected = expected + acc
    apply_seed_sum_([("r", w)], seeds, coefficients)
    assert np.array_equal(_bits(w), _bits(expected))
    w2 = _weights((n,), 9)
    kept = [(s, c) for s, c in zip(seeds, coefficients, strict=True) if c]
    apply_seed_sum_([("r", w2)], [s for s, _ in kept], [c for _, c in kept])
    assert np.array_equal(_bits(w2), _bits(w))


def test_apply_seed_sum_order_matters_but_is_reproducible() -> None:
    """Same order -> same bits; reversed order -> tiny (ulp-level) differences.

    Documents why FedKSeed must replay in the canonical (pool index) order:
    float32 addition is not associative.
    """
    seeds, coefficients = _replay_case()
    shape = [(4096,)]
    a = _replay("auto", shape, seeds, coefficients)[0]
    b = _replay("auto", shape, seeds, coefficients)[0]
    r = _replay("auto", shape, seeds[::-1], coefficients[::-1])[0]
    assert np.array_equal(_bits(a), _bits(b))
    assert not np.array_equal(_bits(a), _bits(r))
    assert torch.allclose(a, r, rtol=0, atol=1e-8)


def test_apply_seed_sum_rejects_bad_input() -> None:
    """Mismatched lengths, bad seeds, non-finite coefficients, bad backends raise.

    Breaks if a corrupted accumulator vector (NaN) from the wire could poison
    a model instead of being rejected with the offending index.
    """
    w = _weights((8,))
    with pytest.raises(ProtocolError, match="2 seeds but 1"):
        apply_seed_sum_([("w", w)], [1, 2], [0.5])
    with pytest.raises(ProtocolError, match=r"coefficients\[1\]"):
        apply_seed_sum_([("w", w)], [1, 2], [0.5, float("nan")])
    with pytest.raises(ProtocolError, match=r"seeds\[0\] -5"):
        apply_seed_sum_([("w", w)], [-5], [0.5])
    with pytest.raises(ProtocolError, match="'cuda-fast'"):
        apply_seed_sum_([("w", w)], [1], [0.5], backend="cuda-fast")
    with pytest.raises(ProtocolError, match="'steps'"):
        apply_seed_sum_([("steps", torch.zeros(3, dtype=torch.long))], [1], [0.5])
    with pytest.raises(ProtocolError, match="integer"):
        gaussian(True, "w", 3)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="numel"):
        gaussian(1, "w", -1)
    before = _bits(w).copy()
    apply_seed_sum_([("w", w)], [1, 2], [0.0, 0.0])
    assert np.array_equal(_bits(w), before)


def test_generation_throughput_reports_values_per_second() -> None:
    """The bench helper returns a positive rate for every CPU backend.

    Breaks if the helper stops exercising the backend it is asked for.
    """
    for backend in CPU_BACKENDS:
        rate = generation_throughput(4096, backend, min_time=0.0)
        assert rate > 0
