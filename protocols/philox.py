"""Philox4x32-10 and the LUT Gaussian: the seed generator without torch.

This module owns the pure-numpy reference of the seed -> perturbation map
(version :data:`GENERATOR_VERSION`) and its numba-compiled CPU kernels. It
imports only the standard library, numpy and :mod:`protocols.errors` (numba
is imported on first use, if present), so an edge device without torch can
copy this file, ``errors.py``, ``make_gaussian_lut.py`` and
``gaussian_lut.f32`` (plus ``philox_numba.py`` for the compiled kernels) and
produce the same bits as the server. The full
protocol, including how the values are applied to model weights, is written
out in :mod:`protocols.seeds`; the generator part is:

- Key: the 64-bit seed ``s`` (``0 <= s < 2**64``) as ``(s & 0xFFFFFFFF, s >> 32)``.
- Counter of element ``i`` of tensor ``n``: block ``b = i // 4``,
  ``(b & 0xFFFFFFFF, b >> 32, name_hash32(n), 0)``; the element takes output
  word ``i % 4`` of Philox4x32-10 (Random123 constants and round structure)
  applied to that counter and key.
- ``name_hash32(n)``: the first 4 bytes of ``sha256(n.encode("utf-8"))`` read
  as a little-endian uint32.
- Value: ``z = LUT[u >> 16]`` with ``u`` the 32-bit output word and ``LUT`` the
  65,536-entry float32 table in ``gaussian_lut.f32`` (built by
  :mod:`protocols.make_gaussian_lut`, pinned by :data:`LUT_SHA256`).

The numba kernels (their source is :mod:`protocols.philox_numba`) are
compiled on their first call (never at import), with ``fastmath`` off, and
multiply-add as two rounded float32 operations (``t = z * c``, then
``acc + t``), exactly what numpy and torch do. They are serial, GIL-free
kernels over a block range; large calls are split into
contiguous block ranges run on the calling thread plus a per-process pool of
helper threads. (``numba.prange`` was measured and dropped: its OpenMP
workers spin-wait, and interleaved with torch's own OpenMP pool on a 2-core
machine a MeZO perturbation took 70 ms instead of 4 ms.)
"""

from __future__ import annotations

import functools
import hashlib
import math
import operator
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVarTuple

import numpy as np
import numpy.typing as npt

from protocols.errors import ProtocolError

if TYPE_CHECKING:
    from protocols.philox_numba import NumbaKernels

__all__ = [
    "CANDIDATE_POOL_NAME",
    "GENERATOR_VERSION",
    "LUT_SHA256",
    "LUT_SIZE",
    "MAX_CANDIDATE_SEEDS",
    "PHILOX_M0",
    "PHILOX_M1",
    "PHILOX_ROUNDS",
    "PHILOX_W0",
    "PHILOX_W1",
    "Float32Array",
    "UInt32Array",
    "accumulate_numba",
    "candidate_seeds",
    "check_numel",
    "check_seed",
    "float32_coefficient",
    "gaussian_lut",
    "gaussian_numba",
    "gaussian_numpy",
    "name_hash32",
    "numba_available",
    "philox4x32",
    "round_keys",
]

GENERATOR_VERSION = "philox4x32-10+gauss-lut16/1"

Float32Array = npt.NDArray[np.float32]
"""A float32 array: Gaussian values, the table, perturbed weights."""
UInt32Array = npt.NDArray[np.uint32]
"""A uint32 array: Philox counter and output words, key words."""

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

LUT_SIZE = 1 << 16
LUT_PATH = Path(__file__).with_name("gaussian_lut.f32")
LUT_SHA256 = "8babbcaf96568f10165a1eab530c0e5c92d04de96761b6dbb3dadfa94baba37f"

CANDIDATE_POOL_NAME = "pollinate/seed-pool"
MAX_CANDIDATE_SEEDS = 1 << 24

_MASK32 = 0xFFFFFFFF
_SEED_LIMIT = 1 << 64
_SEED63_MASK = (1 << 63) - 1
# Blocks per numpy chunk: keeps the uint64 temporaries in cache.
_NUMPY_CHUNK_BLOCKS = 1 << 14
# Blocks per numba chunk (scratch stays in L1); block evaluations (blocks x
# streams) below which one thread is faster than handing work to the pool;
# most threads used.
_NUMBA_CHUNK_BLOCKS = 512
_THREAD_MIN_WORK = 1 << 15
_MAX_THREADS = 32

# The arguments a kernel takes before its block range (b_lo, b_hi).
_KernelArgs = TypeVarTuple("_KernelArgs")


# --------------------------------------------------------------------- checks


def check_seed(seed: int, what: str = "seed") -> int:
    """Return ``seed`` as an int after checking ``0 <= seed < 2**64``.

    Raises
    ------
    ProtocolError
        If ``seed`` is not an integer (bools are refused) or out of range.
    """
    if isinstance(seed, bool):
        raise ProtocolError(f"{what} must be an integer, got {seed!r}")
    try:
        value = operator.index(seed)
    except TypeError:
        raise ProtocolError(f"{what} must be an integer, got {seed!r}") from None
    if not 0 <= value < _SEED_LIMIT:
        raise ProtocolError(f"{what} {value} is outside [0, 2**64)")
    return value


def check_numel(numel: int) -> int:
    """Return ``numel`` as an int after checking it is a count (``>= 0``).

    Raises
    ------
    ProtocolError
        If ``numel`` is not a non-negative integer.
    """
    if isinstance(numel, bool):
        raise ProtocolError(f"numel must be an integer, got {numel!r}")
    try:
        value = operator.index(numel)
    except TypeError:
        raise ProtocolError(f"numel must be an integer, got {numel!r}") from None
    if value < 0:
        raise ProtocolError(f"numel must be >= 0, got {value}")
    return value


def float32_coefficient(value: float, what: str = "coefficient") -> np.float32:
    """``value`` rounded to float32, the form every backend multiplies by.

    Raises
    ------
    ProtocolError
        If ``value`` is not a real number or is not finite in float32.
    """
    try:
        with np.errstate(over="ignore"):
            c = np.float32(float(value))
    except (TypeError, ValueError):
        raise ProtocolError(f"{what} must be a real number, got {value!r}") from None
    if not np.isfinite(c):
        raise ProtocolError(f"{what} {value!r} is not finite in float32")
    return c


# ------------------------------------------------------------------ reference


def name_hash32(name: str) -> int:
    """The 32-bit tensor-name word of the Philox counter.

    First 4 bytes of ``sha256(name.encode("utf-8"))`` as a little-endian uint32.

    Raises
    ------
    ProtocolError
        If ``name`` is not a ``str``.
    """
    if not isinstance(name, str):
        raise ProtocolError(f"tensor name must be a str, got {name!r}")
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little")


def round_keys(key: int) -> list[tuple[int, int]]:
    """The ``PHILOX_ROUNDS`` per-round keys ``(k0, k1)`` for a 64-bit ``key``.

    Round ``r`` uses ``((lo + r * W0) mod 2**32, (hi + r * W1) mod 2**32)``.

    Raises
    ------
    ProtocolError
        If ``key`` is not in ``[0, 2**64)``.
    """
    key = check_seed(key, "key")
    lo, hi = key & _MASK32, key >> 32
    return [
        ((lo + r * PHILOX_W0) & _MASK32, (hi + r * PHILOX_W1) & _MASK32)
        for r in range(PHILOX_ROUNDS)
    ]


def _philox_words(
    key: int, c0: np.ndarray, c1: np.ndarray, c2: np.ndarray, c3: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Philox4x32-10 on uint64 arrays holding 32-bit counter words."""
    m0, m1, mask = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1), np.uint64(_MASK32)
    s32 = np.uint64(32)
    for k0, k1 in round_keys(key):
        p0 = c0 * m0
        p1 = c2 * m1
        c0 = (p1 >> s32) ^ c1 ^ np.uint64(k0)
        c1 = p1 & mask
        c2 = (p0 >> s32) ^ c3 ^ np.uint64(k1)
        c3 = p0 & mask
    return c0, c1, c2, c3


def philox4x32(key: int, counters: np.ndarray) -> UInt32Array:
    """Philox4x32-10 of each counter under a 64-bit key (numpy reference).

    Parameters
    ----------
    key
        ``0 <= key < 2**64``; the Random123 key words are
        ``(key & 0xFFFFFFFF, key >> 32)``.
    counters
        uint32 array of shape ``(n, 4)`` (or ``(4,)`` for one counter); any
        integer dtype is accepted if every value fits in 32 bits.

    Returns
    -------
    numpy.ndarray
        uint32 array of the same shape: the four output words per counter.

    Raises
    ------
    ProtocolError
        If ``key`` is out of range, or ``counters`` has the wrong shape or
        values outside ``[0, 2**32)``.
    """
    arr = np.asarray(counters)
    if arr.shape[-1:] != (4,) or arr.ndim not in (1, 2):
        raise ProtocolError(f"counters must have shape (n, 4) or (4,), got {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ProtocolError(f"counters must be uint32 words, got dtype {arr.dtype}")
    if (
        arr.dtype != np.uint32
        and arr.size
        and (int(arr.min()) < 0 or int(arr.max()) > _MASK32)
    ):
        raise ProtocolError(
            f"counters must be uint32 words, got {arr.dtype} values in "
            f"[{int(arr.min())}, {int(arr.max())}]"
        )
    words = arr.reshape(-1, 4).astype(np.uint64)
    out = _philox_words(key, words[:, 0], words[:, 1], words[:, 2], words[:, 3])
    return np.stack(out, axis=1).astype(np.uint32).reshape(arr.shape)


@functools.lru_cache(maxsize=1)
def gaussian_lut() -> Float32Array:
    """The 65,536-entry float32 table, loaded once and checked against its hash.

    Reads ``gaussian_lut.f32`` next to this file; if the file is absent (for
    example a Flower app bundle that ships only ``.py`` files) the table is
    rebuilt with :func:`protocols.make_gaussian_lut.build_table`. Either way the
    bytes must hash to :data:`LUT_SHA256`. The returned array is read-only.

    Raises
    ------
    ProtocolError
        If the table's SHA-256 is not :data:`LUT_SHA256`.
    """
    if LUT_PATH.is_file():
        data, source = LUT_PATH.read_bytes(), str(LUT_PATH)
    else:
        from protocols.make_gaussian_lut import build_table

        data, source = build_table(), "protocols.make_gaussian_lut.build_table()"
    digest = hashlib.sha256(data).hexdigest()
    if digest != LUT_SHA256:
        raise ProtocolError(
            f"Gaussian table from {source} has sha256 {digest}, expected "
            f"{LUT_SHA256} ({GENERATOR_VERSION}); rebuild it with "
            "python -m protocols.make_gaussian_lut"
        )
    lut = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if lut.shape != (LUT_SIZE,):
        raise ProtocolError(
            f"Gaussian table holds {lut.size} values, expected {LUT_SIZE}"
        )
    lut.setflags(write=False)
    return lut


def _block_words_numpy(key: int, h: int, start: int, stop: int) -> UInt32Array:
    """Output words of blocks ``start .. stop-1`` of one stream, flat uint32."""
    b = np.arange(start, stop, dtype=np.uint64)
    c0 = b & np.uint64(_MASK32)
    c1 = b >> np.uint64(32)
    c2 = np.full_like(b, h)
    c3 = np.zeros_like(b)
    words = _philox_words(key, c0, c1, c2, c3)
    return np.stack(words, axis=1).reshape(-1).astype(np.uint32)


def gaussian_numpy(seed: int, name: str, numel: int) -> Float32Array:
    """``numel`` values of the stream ``(seed, name)``, pure numpy.

    Returns
    -------
    numpy.ndarray
        float32 array of shape ``(numel,)``; element ``i`` is the protocol's
        ``z(seed, name, i)``.

    Raises
    ------
    ProtocolError
        If ``seed`` is outside ``[0, 2**64)``, ``name`` is not a str or
        ``numel`` is negative.
    """
    seed, numel = check_seed(seed), check_numel(numel)
    h = name_hash32(name)
    lut = gaussian_lut()
    out = np.empty(numel, dtype=np.float32)
    nblocks = (numel + 3) // 4
    for start in range(0, nblocks, _NUMPY_CHUNK_BLOCKS):
        stop = min(nblocks, start + _NUMPY_CHUNK_BLOCKS)
        words = _block_words_numpy(seed, h, start, stop)
        lo, hi = 4 * start, min(numel, 4 * stop)
        out[lo:hi] = lut[words[: hi - lo] >> np.uint32(16)]
    return out


# -------------- numba: dispatch and threads (kernels: protocols.philox_numba)


@functools.lru_cache(maxsize=1)
def _numba_kernels() -> NumbaKernels | None:
    """The kernels of :mod:`protocols.philox_numba`, defined once on first use.

    ``None`` without numba. Imported here rather than at the top because that
    module imports this one (for the Philox constants).
    """
    from protocols.philox_numba import build_kernels

    return build_kernels(_NUMBA_CHUNK_BLOCKS)


def numba_available() -> bool:
    """Whether the numba kernels can be used (imports numba on first call)."""
    return _numba_kernels() is not None


def _require_numba() -> NumbaKernels:
    kernels = _numba_kernels()
    if kernels is None:
        raise ProtocolError("backend 'numba' requested but numba is not importable")
    return kernels


def _cpu_threads() -> int:
    """CPUs this process may run on (at most :data:`_MAX_THREADS`)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, _MAX_THREADS))


@functools.lru_cache(maxsize=2)
def _thread_pool(pid: int, workers: int) -> ThreadPoolExecutor:
    """Helper threads for :func:`_run_split`, one pool per process.

    Keyed by ``pid`` so a forked child (Ray, multiprocessing) makes its own
    pool instead of waiting on threads that did not survive the fork. Idle
    workers block on a queue; they never spin.
    """
    return ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="pollinate-philox"
    )


def _run_split(
    kernel: Callable[[*_KernelArgs, int, int], None],
    args: tuple[*_KernelArgs],
    nblocks: int,
    streams: int,
) -> None:
    """Run ``kernel(*args, b_lo, b_hi)`` over blocks ``[0, nblocks)``, threaded.

    Contiguous block ranges (multiples of the chunk size) go to the calling
    thread and up to ``_cpu_threads() - 1`` pool threads; small jobs
    (``nblocks * streams`` below :data:`_THREAD_MIN_WORK`) run inline.
    """
    threads = _cpu_threads()
    if threads < 2 or nblocks * streams < _THREAD_MIN_WORK:
        kernel(*args, 0, nblocks)
        return
    nchunks = -(-nblocks // _NUMBA_CHUNK_BLOCKS)
    parts = min(threads, nchunks)
    bounds = [
        min(nblocks, (nchunks * k // parts) * _NUMBA_CHUNK_BLOCKS)
        for k in range(parts + 1)
    ]
    pool = _thread_pool(os.getpid(), threads - 1)
    futures = [
        pool.submit(kernel, *args, lo, hi)
        for lo, hi in zip(bounds[1:-1], bounds[2:], strict=True)
    ]
    try:
        kernel(*args, bounds[0], bounds[1])
    finally:
        for future in futures:
            future.result()


def gaussian_numba(seed: int, name: str, numel: int) -> Float32Array:
    """Same values as :func:`gaussian_numpy`, from the compiled kernel.

    Raises
    ------
    ProtocolError
        On the same bad arguments as :func:`gaussian_numpy`, or if numba is not
        importable.
    """
    seed, numel = check_seed(seed), check_numel(numel)
    kernels = _require_numba()
    out = np.empty(numel, dtype=np.float32)
    args = (
        out,
        gaussian_lut(),
        np.uint32(name_hash32(name)),
        np.uint32(seed & _MASK32),
        np.uint32(seed >> 32),
    )
    _run_split(kernels.fill, args, (numel + 3) // 4, 1)
    return out


def accumulate_numba(
    out: Float32Array,
    name: str,
    seeds: Sequence[int],
    coefficients: Sequence[np.float32],
    *,
    direct: bool,
) -> None:
    """Add seeded perturbations into the float32 array ``out`` in place.

    With ``direct=True`` (one seed): ``out[i] = out[i] + c * z[i]``. Otherwise
    ``a = +0.0; a = a + c_j * z_j[i]`` over ``j`` in the given order, then
    ``out[i] = out[i] + a``. Each ``c * z`` is one rounded float32 product.

    Raises
    ------
    ProtocolError
        If ``out`` is not a writable contiguous 1-D float32 array, the lengths
        differ, ``direct`` is used with more than one seed, or numba is missing.
    """
    kernels = _require_numba()
    if (
        not isinstance(out, np.ndarray)
        or out.dtype != np.float32
        or out.ndim != 1
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise ProtocolError(
            "accumulate_numba needs a writable contiguous 1-D float32 array"
        )
    if len(seeds) != len(coefficients):
        raise ProtocolError(f"{len(seeds)} seeds but {len(coefficients)} coefficients")
    if direct and len(seeds) != 1:
        raise ProtocolError(f"direct accumulation takes one seed, got {len(seeds)}")
    if not seeds:
        return
    checked = [check_seed(s) for s in seeds]
    k0s = np.array([s & _MASK32 for s in checked], dtype=np.uint32)
    k1s = np.array([s >> 32 for s in checked], dtype=np.uint32)
    cs = np.array(coefficients, dtype=np.float32)
    args = (
        out,
        gaussian_lut(),
        np.uint32(name_hash32(name)),
        k0s,
        k1s,
        cs,
        bool(direct),
    )
    _run_split(kernels.axpy, args, (out.shape[0] + 3) // 4, len(checked))


# -------------------------------------------------------------- seed pool


def candidate_seeds(master_seed: int, k: int) -> list[int]:
    """``k`` distinct 63-bit seeds derived from ``master_seed``.

    The stream is Philox4x32-10 with key ``master_seed`` and the counters of
    tensor name :data:`CANDIDATE_POOL_NAME`; block ``b`` gives two candidates,
    ``(w0 | w1 << 32) & (2**63 - 1)`` then ``(w2 | w3 << 32) & (2**63 - 1)``.
    Candidates are taken in stream order, skipping any already taken.

    Raises
    ------
    ProtocolError
        If ``master_seed`` is outside ``[0, 2**64)`` or ``k`` is not in
        ``[1, MAX_CANDIDATE_SEEDS]``.
    """
    master_seed = check_seed(master_seed, "master_seed")
    if isinstance(k, bool):
        raise ProtocolError(f"k must be an integer, got {k!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise ProtocolError(f"k must be an integer, got {k!r}") from None
    if not 1 <= k <= MAX_CANDIDATE_SEEDS:
        raise ProtocolError(f"k must be in [1, {MAX_CANDIDATE_SEEDS}], got {k}")
    h = name_hash32(CANDIDATE_POOL_NAME)
    seen: set[int] = set()
    pool: list[int] = []
    start = 0
    while len(pool) < k:
        stop = start + max(1, math.ceil((k - len(pool)) / 2))
        words = _block_words_numpy(master_seed, h, start, stop).astype(np.uint64)
        pairs = words.reshape(-1, 2)
        values = (pairs[:, 0] | (pairs[:, 1] << np.uint64(32))) & np.uint64(
            _SEED63_MASK
        )
        for v in values.tolist():
            if v not in seen:
                seen.add(v)
                pool.append(v)
                if len(pool) == k:
                    break
        start = stop
    return pool
