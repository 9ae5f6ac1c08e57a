"""Build ``protocols/gaussian_lut.f32``, the quantile table of the seed generator.

The table is part of the wire protocol (see :mod:`protocols.seeds`): entry
``k`` (``k = 0 .. 65535``) is the standard-normal quantile at
``(k + 0.5) / 65536``, rescaled so the 65,536 entries, taken as equally likely
values, have variance exactly 1, then rounded to float32. Definition, all in
float64:

1. ``x[k] = NormalDist().inv_cdf((k + 0.5) / 65536)`` for ``k < 32768`` and
   ``x[65535 - k] = -x[k]`` (the table is antisymmetric by construction, so its
   mean is exactly 0);
2. ``s = sqrt(65536 / fsum(x[k] ** 2))`` (population variance, exactly
   rounded sum);
3. ``lut[k] = float32(x[k] * s)``, stored as raw little-endian float32
   (262,144 bytes, no header).

Run ``python -m protocols.make_gaussian_lut`` (or this file) to rewrite the
file; :data:`protocols.philox.LUT_SHA256` pins the result, so a rebuild that
changes a single bit is caught when the table is loaded. Standard library
only, so the table can be rebuilt where numpy is absent.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import struct
from pathlib import Path
from statistics import NormalDist

__all__ = ["LUT_BITS", "LUT_SIZE", "build_table", "main"]

LUT_BITS = 16
LUT_SIZE = 1 << LUT_BITS
DEFAULT_PATH = Path(__file__).with_name("gaussian_lut.f32")


def build_table() -> bytes:
    """The table as raw little-endian float32 bytes (``4 * LUT_SIZE`` bytes)."""
    normal = NormalDist()
    half = LUT_SIZE // 2
    lower = [normal.inv_cdf((k + 0.5) / LUT_SIZE) for k in range(half)]
    values = lower + [-v for v in reversed(lower)]
    scale = math.sqrt(LUT_SIZE / math.fsum(v * v for v in values))
    return struct.pack(f"<{LUT_SIZE}f", *(v * scale for v in values))


def main(argv: list[str] | None = None) -> int:
    """Write the table to ``--out`` and print its SHA-256."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args(argv)
    data = build_table()
    args.out.write_bytes(data)
    print(f"{args.out}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
