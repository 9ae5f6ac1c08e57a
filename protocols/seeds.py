"""The seed -> perturbation map of seed-based zeroth-order methods (wire protocol).

This module owns how an integer seed becomes a perturbation of a model's
weights for MeZO and FedKSeed: the random direction ``z``, the ordered set of
perturbed parameters (:class:`ParamWalk`), and the float32 arithmetic that
applies ``z`` to weights (:func:`perturb_`, :func:`apply_seed_sum_`). A
client on CPU, an edge device with numpy only (:mod:`protocols.philox`) and a
server on CUDA produce the same bits from the same seeds; PyTorch's own
generators do not (see ``docs/algorithms.md`` section 5), so ``z`` is defined
here, not by torch.

Protocol, version ``philox4x32-10+gauss-lut16/1`` (:data:`GENERATOR_VERSION`)
-----------------------------------------------------------------------------
1. **Streams.** A stream is a pair ``(seed, name)``: ``seed`` an integer with
   ``0 <= seed < 2**64``, ``name`` a tensor name (``str``). Element ``i``
   (``i >= 0``) of a tensor is element ``i`` of its row-major (C-order)
   flattening.
2. **Bits.** Philox4x32-10 exactly as in Random123 (multipliers
   ``M0 = 0xD2511F53``, ``M1 = 0xCD9E8D57``; key increments
   ``W0 = 0x9E3779B9``, ``W1 = 0xBB67AE85``; 10 rounds; round ``r`` uses key
   ``(k0 + r*W0, k1 + r*W1) mod 2**32``; one round maps ``(c0, c1, c2, c3)`` to
   ``(hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0))``).
   Key ``(k0, k1) = (seed & 0xFFFFFFFF, seed >> 32)``. Element ``i`` lies in
   block ``b = i // 4``, whose counter is
   ``(b & 0xFFFFFFFF, b >> 32, name_hash32(name), 0)``; it takes output word
   ``u = out[i % 4]``. ``name_hash32(name)`` is the first 4 bytes of
   ``sha256(name.encode("utf-8"))`` read as a little-endian uint32.
3. **Values.** ``z = LUT[u >> 16]`` (float32). ``LUT`` holds the 65,536
   standard-normal quantiles at ``(k + 0.5) / 65536``, antisymmetric, scaled in
   float64 to population variance exactly 1, rounded to float32; the table is
   ``protocols/gaussian_lut.f32`` (raw little-endian float32), built by
   :mod:`protocols.make_gaussian_lut` and pinned by
   :data:`~protocols.philox.LUT_SHA256`. ``|z| <= 4.325``, ``z != 0``. No
   transcendental function is evaluated at run time, so every device agrees.
4. **Coefficients.** Every scalar that multiplies ``z`` (a perturbation scale,
   a FedKSeed accumulated gradient times the learning rate) is first rounded
   to float32 (``c = float32(c)``). The term is ``t = float32(z * c)``, one
   rounded product; no fused multiply-add anywhere (``torch.add_(z, alpha=c)``
   rounds once, which is a different number, so it is not used).
5. **Perturb** (:func:`perturb_`): for each tensor ``p`` of the walk,
   ``p <- p + t`` with ``t = z(seed, name) * c``. Float32 ``p``: one rounded
   float32 addition. Other floating dtypes: the sum is formed in float32 and
   rounded once to ``p.dtype`` (round to nearest even). ``c == 0`` leaves
   every weight untouched (no addition of signed zeros).
6. **Replay** (:func:`apply_seed_sum_`): for each tensor, an accumulator
   ``a = +0.0`` (float32), then ``a <- a + float32(z_j * c_j)`` for ``j`` in
   the order given, skipping ``c_j == 0``; then ``p <- p + a`` once, rounded
   as in 5. Float32 addition is not associative: a different order of seeds
   is a different result (differences of an ulp or so per element), the same
   order gives the same bits on every device. FedKSeed's canonical order is
   the index order of the candidate pool.
7. **Which tensors** (:class:`ParamWalk`): the floating-point parameters of
   ``model.named_parameters()``, in that order, each tensor once under its
   first name (tied weights once), optionally filtered by ``fnmatch`` globs.
   Its :meth:`ParamWalk.fingerprint` is the first 16 hex digits of
   ``sha256(json.dumps([[name, [dims...]], ...], separators=(",", ":")))``.
   Because streams are keyed by name, not position, the walk's order does not
   change ``z``; it only fixes the order in which tensors are visited.
8. **Seed pool** (:func:`candidate_seeds`): ``K`` distinct 63-bit seeds from
   one 64-bit master seed, from the stream ``(master_seed,
   "pollinate/seed-pool")``: block ``b`` gives ``(w0 | w1 << 32) & (2**63-1)``
   then ``(w2 | w3 << 32) & (2**63-1)``; repeats are skipped.

Backends (all produce the same bits; ``backend="auto"`` picks the fastest):
``"numba"`` (compiled CPU kernel, threaded, the default on CPU; compiled on
first call), ``"numpy"`` (reference, no compiler), ``"torch"`` (int64 tensor
ops, on any torch device, the default on CUDA). A CPU-generated ``z`` is
copied to the parameter's device before the arithmetic of rules 4-6.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from protocols.errors import ProtocolError
from protocols.param_walk import ParamWalk
from protocols.philox import (
    GENERATOR_VERSION,
    PHILOX_M0,
    PHILOX_M1,
    accumulate_numba,
    candidate_seeds,
    check_numel,
    check_seed,
    float32_coefficient,
    gaussian_lut,
    gaussian_numba,
    gaussian_numpy,
    name_hash32,
    numba_available,
    philox4x32,
    round_keys,
)
from protocols.seed_arrays import checked_terms

__all__ = [
    "BACKENDS",
    "GENERATOR_VERSION",
    "ParamWalk",
    "apply_seed_sum_",
    "candidate_seeds",
    "gaussian",
    "gaussian_numpy",
    "name_hash32",
    "perturb_",
    "philox4x32",
]

BACKENDS = ("auto", "numba", "numpy", "torch")

_MASK32 = 0xFFFFFFFF
# Blocks per torch chunk: bounds the int64 temporaries (about 12 live tensors).
_TORCH_CHUNK_BLOCKS_CPU = 1 << 16
_TORCH_CHUNK_BLOCKS_ACCEL = 1 << 22


# ------------------------------------------------------------------- helpers


def _as_device(device: torch.device | str) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ProtocolError(f"device {device!r} is not a torch device") from None


def _check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ProtocolError(f"backend {backend!r} is not one of {BACKENDS}")


def _resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` on ``device``."""
    _check_backend_name(backend)
    if backend == "auto":
        if device.type != "cpu":
            return "torch"
        return "numba" if numba_available() else "numpy"
    if backend == "numba" and not numba_available():
        raise ProtocolError("backend 'numba' requested but numba is not importable")
    return backend


@functools.lru_cache(maxsize=8)
def _torch_lut(device: torch.device) -> torch.Tensor:
    """The Gaussian table as a float32 tensor on ``device`` (cached per device)."""
    return torch.from_numpy(gaussian_lut().copy()).to(device)


def _split16(m: int) -> tuple[int, int]:
    return m >> 16, m & 0xFFFF


_M0_HI, _M0_LO = _split16(PHILOX_M0)
_M1_HI, _M1_LO = _split16(PHILOX_M1)


def _mulhilo(
    x: torch.Tensor, m_hi: int, m_lo: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` 32-bit halves of ``x * m`` for int64 ``x < 2**32``, no overflow.

    ``m = m_hi * 2**16 + m_lo``; every intermediate stays below ``2**49``, so
    the result does not depend on how a device treats signed overflow.
    """
    a = x * m_lo
    b = x * m_hi
    s = a + ((b & 0xFFFF) << 16)
    return (b >> 16) + (s >> 32), s & _MASK32


def _gaussian_rows_torch(
    seeds: Sequence[int], name: str, numel: int, device: torch.device
) -> torch.Tensor:
    """The streams ``(seed, name)`` for several seeds, one row each, torch ops.

    All rows are computed by the same sequence of tensor ops (keys broadcast
    per row), so a replay on CUDA launches ~250 kernels per batch of seeds
    instead of per seed. Returns float32 of shape ``(len(seeds), numel)``.
    """
    rows = len(seeds)
    out = torch.empty((rows, numel), dtype=torch.float32, device=device)
    if numel == 0 or rows == 0:
        return out
    lut = _torch_lut(device)
    per_round = [round_keys(s) for s in seeds]
    keys = torch.tensor(
        [[per_round[j][r] for j in range(rows)] for r in range(len(per_round[0]))],
        dtype=torch.int64,
        device=device,
    ).unsqueeze(-1)  # (rounds, rows, 2, 1)
    h = name_hash32(name)
    nblocks = (numel + 3) // 4
    budget = (
        _TORCH_CHUNK_BLOCKS_CPU if device.type == "cpu" else _TORCH_CHUNK_BLOCKS_ACCEL
    )
    step = max(1, budget // rows)
    for start in range(0, nblocks, step):
        stop = min(nblocks, start + step)
        b = torch.arange(start, stop, dtype=torch.int64, device=device).expand(rows, -1)
        c0 = b & _MASK32
        c1 = b >> 32
        c2 = torch.full_like(b, h)
        c3 = torch.zeros_like(b)
        for r in range(keys.shape[0]):
            k0, k1 = keys[r, :, 0], keys[r, :, 1]
            hi0, lo0 = _mulhilo(c0, _M0_HI, _M0_LO)
            hi1, lo1 = _mulhilo(c2, _M1_HI, _M1_LO)
            c0 = hi1 ^ c1 ^ k0
            c1 = lo1
            c2 = hi0 ^ c3 ^ k1
            c3 = lo0
        words = torch.stack((c0, c1, c2, c3), dim=2).view(rows, -1)
        lo, hi = 4 * start, min(numel, 4 * stop)
        out[:, lo:hi] = lut[words[:, : hi - lo] >> 16]
    return out


def _gaussian_torch(
    seed: int, name: str, numel: int, device: torch.device
) -> torch.Tensor:
    """The stream ``(seed, name)`` with int64 torch ops on ``device``."""
    return _gaussian_rows_torch([seed], name, numel, device)[0]


def _seed_sum_torch(
    seeds: Sequence[int],
    coefficients: Sequence[np.float32],
    name: str,
    numel: int,
    device: torch.device,
) -> torch.Tensor:
    """Rule 6's accumulator with torch ops: ``a = +0; a = a + z_j * c_j`` in order.

    Seeds are generated in batches of rows (bounded memory); the products are
    one broadcast multiply per batch and the additions stay sequential, one
    row at a time, so the result is the same as one seed at a time.
    """
    acc = torch.zeros(numel, dtype=torch.float32, device=device)
    budget = (
        _TORCH_CHUNK_BLOCKS_CPU if device.type == "cpu" else _TORCH_CHUNK_BLOCKS_ACCEL
    )
    per_batch = max(1, budget // max(1, (numel + 3) // 4))
    for i in range(0, len(seeds), per_batch):
        batch = list(seeds[i : i + per_batch])
        cs = torch.tensor(
            np.asarray(coefficients[i : i + per_batch], dtype=np.float32), device=device
        ).unsqueeze(1)
        terms = _gaussian_rows_torch(batch, name, numel, device).mul_(cs)
        for row in terms:
            acc.add_(row)
    return acc


# ----------------------------------------------------------------- generation


def gaussian(
    seed: int,
    name: str,
    numel: int,
    *,
    device: torch.device | str = "cpu",
    backend: str = "auto",
) -> torch.Tensor:
    """``numel`` values of the stream ``(seed, name)`` as a float32 tensor.

    Parameters
    ----------
    seed
        ``0 <= seed < 2**64``.
    name
        The tensor name the stream belongs to.
    numel
        Number of values (the tensor's ``numel()``).
    device
        Where the result lives.
    backend
        ``"auto"`` (numba on CPU, numpy if numba is missing; torch ops
        elsewhere), ``"numba"``, ``"numpy"`` or ``"torch"``. A CPU backend with a
        non-CPU ``device`` generates on the CPU and copies. All give the same
        bits.

    Returns
    -------
    torch.Tensor
        float32, shape ``(numel,)``, on ``device``.

    Raises
    ------
    ProtocolError
        If an argument is out of range, the backend is unknown or unavailable,
        or ``device`` is not a torch device.
    """
    seed, numel = check_seed(seed), check_numel(numel)
    name_hash32(name)  # validates the name before any work
    dev = _as_device(device)
    chosen = _resolve_backend(backend, dev)
    if chosen == "torch":
        return _gaussian_torch(seed, name, numel, dev)
    values = (
        gaussian_numba(seed, name, numel)
        if chosen == "numba"
        else gaussian_numpy(seed, name, numel)
    )
    return torch.from_numpy(values).to(dev)


def _check_param(name: str, p: torch.Tensor) -> None:
    name_hash32(name)
    if not isinstance(p, torch.Tensor) or not p.is_floating_point():
        raise ProtocolError(
            f"parameter '{name}' must be a floating-point tensor, got "
            f"{getattr(p, 'dtype', type(p).__name__)}"
        )


def _numba_inplace_ok(p: torch.Tensor) -> bool:
    return p.dtype == torch.float32 and p.device.type == "cpu" and p.is_contiguous()


def _numba_inplace(p: torch.Tensor) -> np.ndarray:
    """A writable numpy view of ``p``'s elements (float32, CPU, contiguous)."""
    return p.detach().view(-1).numpy()


def _bump_version(p: torch.Tensor) -> None:
    """Tell autograd ``p`` changed in place (its buffer was written from numpy)."""
    if not p.is_inference():
        torch.autograd.graph.increment_version(p)


def perturb_(
    params: Sequence[tuple[str, torch.Tensor]],
    seed: int,
    scale: float,
    *,
    backend: str = "auto",
) -> None:
    """``p <- p + float32(scale) * z(seed, name)`` for every ``(name, p)``, in place.

    ``z`` is generated for one tensor at a time (at most one tensor's worth of
    extra memory; none on the numba path for contiguous float32 CPU tensors,
    which adds in the kernel). Rounding follows rule 5 of the module docstring:
    for float32 parameters the result equals
    ``p + float32(scale) * gaussian(seed, name, p.numel())`` bit for bit, and
    ``+eps, -2*eps, +eps`` returns each weight to within a few ulps of itself
    (each addition rounds once). ``scale`` rounding to 0 in float32 changes
    nothing.

    Raises
    ------
    ProtocolError
        If the seed or scale is invalid, a tensor is not floating point, or the
        backend is unknown or unavailable.
    """
    seed = check_seed(seed)
    c = float32_coefficient(scale, "scale")
    _check_backend_name(backend)
    params = list(params)
    for name, p in params:
        _check_param(name, p)
    if c == 0:
        return
    with torch.no_grad():
        for name, p in params:
            if p.numel() == 0:
                continue
            chosen = _resolve_backend(backend, p.device)
            if chosen == "numba" and _numba_inplace_ok(p):
                accumulate_numba(_numba_inplace(p), name, [seed], [c], direct=True)
                _bump_version(p)
                continue
            z = gaussian(seed, name, p.numel(), device=p.device, backend=chosen)
            p.add_(z.mul_(float(c)).view(p.shape))


def apply_seed_sum_(
    params: Sequence[tuple[str, torch.Tensor]],
    seeds: Sequence[int],
    coefficients: Sequence[float],
    *,
    backend: str = "auto",
) -> None:
    """``p <- p + sum_j coefficients[j] * z(seeds[j], name)``, in place (replay).

    For each tensor a float32 accumulator starts at +0.0 and receives
    ``float32(z_j * float32(c_j))`` for ``j`` in the given order (zero
    coefficients skipped); it is then added to ``p`` once (rule 6 of the
    module docstring). Same seeds, coefficients and order give the same bits on
    every backend and device for float32 parameters. The numba path fuses the
    whole sum into one pass per tensor without materialising ``z``.

    Raises
    ------
    ProtocolError
        If ``seeds`` and ``coefficients`` differ in length, a seed is out of
        range, a coefficient is not finite in float32, a tensor is not
        floating point, or the backend is unknown or unavailable.
    """
    _check_backend_name(backend)
    active_seeds, active_cs = checked_terms(seeds, coefficients)
    params = list(params)
    for name, p in params:
        _check_param(name, p)
    if not active_seeds:
        return
    with torch.no_grad():
        for name, p in params:
            n = p.numel()
            if n == 0:
                continue
            chosen = _resolve_backend(backend, p.device)
            if chosen == "numba":
                if _numba_inplace_ok(p):
                    accumulate_numba(
                        _numba_inplace(p), name, active_seeds, active_cs, direct=False
                    )
                    _bump_version(p)
                    continue
                buf = np.zeros(n, dtype=np.float32)
                accumulate_numba(buf, name, active_seeds, active_cs, direct=False)
                acc = torch.from_numpy(buf).to(p.device)
            elif chosen == "numpy":
                buf = np.zeros(n, dtype=np.float32)
                for seed_j, c_j in zip(active_seeds, active_cs, strict=True):
                    buf += gaussian_numpy(seed_j, name, n) * c_j
                acc = torch.from_numpy(buf).to(p.device)
            else:
                acc = _seed_sum_torch(active_seeds, active_cs, name, n, p.device)
            p.add_(acc.view(p.shape))
