"""Rules 5 and 6 of the seed protocol on NumPy arrays, without torch.

:mod:`protocols.seeds` states the protocol and applies it to torch tensors;
this module applies the same two rules to float32 NumPy arrays in place, for
a device that runs an inference engine over NumPy buffers (the edge client)
and for the torch CPU path, whose tensors share memory with NumPy. It imports
only NumPy and the generator (:mod:`protocols.philox`): the numba kernels when
numba is importable, the NumPy reference otherwise. Both give the same bits,
and the same bits as the torch backend (``tests/test_seed_arrays.py``).

- Perturb (rule 5): ``p <- p + float32(z * c)``, one rounded product and one
  rounded addition per element; ``c == 0`` changes nothing.
- Replay (rule 6): per array ``a = +0.0; a <- a + float32(z_j * c_j)`` over
  ``j`` in the order given (zero coefficients skipped), then ``p <- p + a``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from protocols.errors import ProtocolError
from protocols.philox import (
    accumulate_numba,
    check_seed,
    float32_coefficient,
    gaussian_numpy,
    name_hash32,
    numba_available,
)

__all__ = ["apply_seed_sum_arrays", "checked_terms", "perturb_arrays"]

Float32Array = npt.NDArray[np.float32]


def _check_arrays(
    params: Sequence[tuple[str, Float32Array]],
) -> list[tuple[str, Float32Array]]:
    """``params`` as a list, each a writable C-contiguous float32 array."""
    out = list(params)
    for name, p in out:
        name_hash32(name)
        if (
            not isinstance(p, np.ndarray)
            or p.dtype != np.float32
            or not p.flags.c_contiguous
            or not p.flags.writeable
        ):
            raise ProtocolError(
                f"parameter '{name}' must be a writable C-contiguous float32 "
                f"array, got {getattr(p, 'dtype', type(p).__name__)}"
            )
    return out


def checked_terms(
    seeds: Sequence[int], coefficients: Sequence[float]
) -> tuple[list[int], list[np.float32]]:
    """Validated seeds and float32 coefficients of a replay, zeros dropped.

    Raises
    ------
    ProtocolError
        If the lengths differ, a seed is out of range or a coefficient is not
        finite in float32.
    """
    seeds, coefficients = list(seeds), list(coefficients)
    if len(seeds) != len(coefficients):
        raise ProtocolError(
            f"replay got {len(seeds)} seeds but {len(coefficients)} coefficients"
        )
    active_seeds: list[int] = []
    active_cs: list[np.float32] = []
    for j, (s, c) in enumerate(zip(seeds, coefficients, strict=True)):
        seed = check_seed(s, f"seeds[{j}]")
        c32 = float32_coefficient(c, f"coefficients[{j}]")
        if c32 != 0:
            active_seeds.append(seed)
            active_cs.append(c32)
    return active_seeds, active_cs


def _accumulate(
    flat: Float32Array,
    name: str,
    seeds: list[int],
    cs: list[np.float32],
    *,
    direct: bool,
    use_numba: bool,
) -> None:
    """Add the terms of ``seeds`` into the 1-D array ``flat`` (rule 5 or 6)."""
    if use_numba:
        accumulate_numba(flat, name, seeds, cs, direct=direct)
        return
    n = flat.shape[0]
    if direct:
        flat += gaussian_numpy(seeds[0], name, n) * cs[0]
        return
    acc = np.zeros(n, dtype=np.float32)
    for seed, c in zip(seeds, cs, strict=True):
        acc += gaussian_numpy(seed, name, n) * c
    flat += acc


def perturb_arrays(
    params: Sequence[tuple[str, Float32Array]],
    seed: int,
    scale: float,
    *,
    use_numba: bool | None = None,
) -> None:
    """``p <- p + float32(scale) * z(seed, name)`` for every ``(name, p)``, in place.

    Parameters
    ----------
    params
        ``(name, array)`` pairs; each array float32, C-contiguous, writable.
    seed
        The stream's seed, ``0 <= seed < 2**64``.
    scale
        The coefficient (rounded to float32 first; 0 changes nothing).
    use_numba
        Force the numba kernels (True) or the NumPy reference (False); None
        uses numba when it is importable.

    Raises
    ------
    ProtocolError
        If an array is not a writable contiguous float32 array, the seed or
        scale is invalid, or numba is forced but missing.
    """
    seed = check_seed(seed)
    c = float32_coefficient(scale, "scale")
    arrays = _check_arrays(params)
    if c == 0:
        return
    numba = numba_available() if use_numba is None else use_numba
    for name, p in arrays:
        if p.size:
            _accumulate(p.reshape(-1), name, [seed], [c], direct=True, use_numba=numba)


def apply_seed_sum_arrays(
    params: Sequence[tuple[str, Float32Array]],
    seeds: Sequence[int],
    coefficients: Sequence[float],
    *,
    use_numba: bool | None = None,
) -> None:
    """``p <- p + sum_j coefficients[j] * z(seeds[j], name)`` in place (replay).

    Same arguments as :func:`perturb_arrays`, with one coefficient per seed;
    the result is bit-identical to :func:`protocols.seeds.apply_seed_sum_` on
    float32 tensors with the same values, seeds, coefficients and order.

    Raises
    ------
    ProtocolError
        As :func:`perturb_arrays`, or if ``seeds`` and ``coefficients`` differ
        in length.
    """
    active_seeds, active_cs = checked_terms(seeds, coefficients)
    arrays = _check_arrays(params)
    if not active_seeds:
        return
    numba = numba_available() if use_numba is None else use_numba
    for name, p in arrays:
        if p.size:
            _accumulate(
                p.reshape(-1),
                name,
                active_seeds,
                active_cs,
                direct=False,
                use_numba=numba,
            )
