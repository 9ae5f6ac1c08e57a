"""The numba kernels of the Philox Gaussian stream: fill, and seeded axpy.

Compiled twins of the numpy reference in :mod:`protocols.philox`, which owns
the protocol and decides when these kernels run and on which threads; this
module holds only their source. numba is imported by :func:`build_kernels`,
never at import, and compiles each kernel on its first call, with
``fastmath`` off and multiply-add as two rounded float32 operations
(``t = z * c``, then ``acc + t``), exactly what numpy and torch do.

A kernel processes the blocks ``[b_lo, b_hi)`` of one tensor's stream (block
``b`` holds elements ``4b .. 4b+3``) in chunks held as four uint32 arrays, one
per counter word, so LLVM vectorises the rounds (32x32->64-bit multiplies).
Kernels release the GIL, so the caller may run disjoint block ranges on
several threads; every element's arithmetic is the same however the range is
split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from protocols.philox import (
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_ROUNDS,
    PHILOX_W0,
    PHILOX_W1,
    Float32Array,
    UInt32Array,
)

__all__ = ["AxpyKernel", "FillKernel", "NumbaKernels", "build_kernels"]

FillKernel = Callable[
    [Float32Array, Float32Array, np.uint32, np.uint32, np.uint32, int, int], None
]
"""``fill(out, lut, h, k0, k1, b_lo, b_hi)``: ``out[e] = z[e]`` over the blocks."""

AxpyKernel = Callable[
    [
        Float32Array,
        Float32Array,
        np.uint32,
        UInt32Array,
        UInt32Array,
        Float32Array,
        bool,
        int,
        int,
    ],
    None,
]
"""``axpy(out, lut, h, k0s, k1s, cs, direct, b_lo, b_hi)``: seeded updates.

``direct`` (one stream): ``out[e] = out[e] + c*z``. Otherwise ``a = +0.0``,
``a = a + c_j*z_j`` for ``j`` in order, then ``out[e] = out[e] + a``.
"""


@dataclass(frozen=True)
class NumbaKernels:
    """The compiled-on-first-call kernels; each works on a block range."""

    fill: FillKernel
    axpy: AxpyKernel


def build_kernels(chunk_blocks: int) -> NumbaKernels | None:
    """Define the numba kernels; ``None`` when numba cannot be imported.

    Definitions only: numba compiles each dispatcher on its first call.

    Parameters
    ----------
    chunk_blocks
        Blocks per chunk of scratch (``4 * chunk_blocks`` uint32 words, sized
        to stay in L1). Block ranges handed to different threads should start
        on a multiple of it; results do not depend on it.
    """
    try:
        from numba import njit
    except ImportError:
        return None

    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    w0, w1 = np.uint32(PHILOX_W0), np.uint32(PHILOX_W1)
    mask64, s32, s16 = np.uint64(0xFFFFFFFF), np.uint64(32), np.uint32(16)
    zero32 = np.uint32(0)
    rounds = PHILOX_ROUNDS
    chunk = chunk_blocks

    @njit(cache=False, fastmath=False, nogil=True, parallel=False)
    def philox_chunk(
        w: UInt32Array, h: np.uint32, k0: np.uint32, k1: np.uint32, b0: int, n: int
    ) -> None:  # pragma: no cover - compiled
        # w: (4, chunk) uint32 scratch; on return w[q, i] = word q of block b0 + i.
        c0, c1, c2, c3 = w[0], w[1], w[2], w[3]
        for i in range(n):
            b = np.uint64(b0 + i)
            c0[i] = np.uint32(b & mask64)
            c1[i] = np.uint32(b >> s32)
            c2[i] = h
            c3[i] = zero32
        for _ in range(rounds):
            for i in range(n):
                p0 = np.uint64(c0[i]) * m0
                p1 = np.uint64(c2[i]) * m1
                x1 = c1[i]
                x3 = c3[i]
                c0[i] = np.uint32(p1 >> s32) ^ x1 ^ k0
                c1[i] = np.uint32(p1 & mask64)
                c2[i] = np.uint32(p0 >> s32) ^ x3 ^ k1
                c3[i] = np.uint32(p0 & mask64)
            k0 = np.uint32(k0 + w0)
            k1 = np.uint32(k1 + w1)

    @njit(cache=False, fastmath=False, nogil=True, parallel=False)
    def fill(
        out: Float32Array,
        lut: Float32Array,
        h: np.uint32,
        k0: np.uint32,
        k1: np.uint32,
        b_lo: int,
        b_hi: int,
    ) -> None:  # pragma: no cover - compiled
        # out[e] = z[e] for the elements of blocks [b_lo, b_hi).
        total = out.shape[0]
        w = np.empty((4, chunk), dtype=np.uint32)
        for b0 in range(b_lo, b_hi, chunk):
            b1 = min(b_hi, b0 + chunk)
            n = b1 - b0
            philox_chunk(w, h, k0, k1, b0, n)
            nfull = min(b1, total // 4) - b0
            for i in range(nfull):
                j = 4 * (b0 + i)
                out[j] = lut[w[0, i] >> s16]
                out[j + 1] = lut[w[1, i] >> s16]
                out[j + 2] = lut[w[2, i] >> s16]
                out[j + 3] = lut[w[3, i] >> s16]
            if nfull < n:
                j = 4 * (b0 + nfull)
                for q in range(total - j):
                    out[j + q] = lut[w[q, nfull] >> s16]

    @njit(cache=False, fastmath=False, nogil=True, parallel=False)
    def axpy(
        out: Float32Array,
        lut: Float32Array,
        h: np.uint32,
        k0s: UInt32Array,
        k1s: UInt32Array,
        cs: Float32Array,
        direct: bool,
        b_lo: int,
        b_hi: int,
    ) -> None:  # pragma: no cover - compiled
        # direct: out[e] = out[e] + c*z (one stream, no accumulator).
        # else:   a = +0.0; a = a + c_j*z_j for j in order; out[e] = out[e] + a.
        total = out.shape[0]
        w = np.empty((4, chunk), dtype=np.uint32)
        a = np.empty((4, chunk), dtype=np.float32)
        a0, a1, a2, a3 = a[0], a[1], a[2], a[3]
        for b0 in range(b_lo, b_hi, chunk):
            b1 = min(b_hi, b0 + chunk)
            n = b1 - b0
            nfull = min(b1, total // 4) - b0
            a[:, :] = np.float32(0.0)
            for s in range(cs.shape[0]):
                philox_chunk(w, h, k0s[s], k1s[s], b0, n)
                c = cs[s]
                if direct:
                    for i in range(nfull):
                        j = 4 * (b0 + i)
                        out[j] = out[j] + lut[w[0, i] >> s16] * c
                        out[j + 1] = out[j + 1] + lut[w[1, i] >> s16] * c
                        out[j + 2] = out[j + 2] + lut[w[2, i] >> s16] * c
                        out[j + 3] = out[j + 3] + lut[w[3, i] >> s16] * c
                    if nfull < n:
                        j = 4 * (b0 + nfull)
                        for q in range(total - j):
                            out[j + q] = out[j + q] + lut[w[q, nfull] >> s16] * c
                else:
                    w0_, w1_, w2_, w3_ = w[0], w[1], w[2], w[3]
                    for i in range(n):
                        a0[i] = a0[i] + lut[w0_[i] >> s16] * c
                        a1[i] = a1[i] + lut[w1_[i] >> s16] * c
                        a2[i] = a2[i] + lut[w2_[i] >> s16] * c
                        a3[i] = a3[i] + lut[w3_[i] >> s16] * c
            if not direct:
                for i in range(nfull):
                    j = 4 * (b0 + i)
                    out[j] = out[j] + a0[i]
                    out[j + 1] = out[j + 1] + a1[i]
                    out[j + 2] = out[j + 2] + a2[i]
                    out[j + 3] = out[j + 3] + a3[i]
                if nfull < n:
                    j = 4 * (b0 + nfull)
                    for q in range(total - j):
                        out[j + q] = out[j + q] + a[q, nfull]

    return NumbaKernels(fill=fill, axpy=axpy)
