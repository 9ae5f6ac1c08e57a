"""Frames of the split-learning trunk service: tensors and the spec on the wire.

A tensor crosses the split as a :class:`protocols.proto.trunk_pb2.Tensor`: its
torch dtype name, its shape, its raw little-endian bytes (bfloat16 as the raw
16-bit pattern, since NumPy has no bfloat16) and the ``zlib.crc32`` of those
bytes. :func:`tensor_from_proto` validates a received frame before building
anything (dtype, shape, byte count, size limit, checksum, finiteness) and raises
:class:`~protocols.errors.ProtocolError` naming the field.

The :class:`~protocols.specs.SplitSpec` travels in ``OpenRequest.spec_json`` as
the JSON of its ``to_config_record()`` mapping (:func:`split_spec_to_json`,
:func:`split_spec_from_json`).
"""

from __future__ import annotations

import json
import math
import sys
import zlib
from collections.abc import Mapping, Sequence

import torch

from protocols.errors import PayloadTooLargeError, ProtocolError
from protocols.proto import trunk_pb2
from protocols.specs import SplitSpec

__all__ = [
    "ACTIVATION_DTYPES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MASK_DTYPES",
    "WIRE_DTYPES",
    "split_spec_from_json",
    "split_spec_to_json",
    "tensor_from_proto",
    "tensor_to_proto",
]

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")
MASK_DTYPES = ("int64", "int32")
WIRE_DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
_DTYPE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}
_MAX_NDIM = 8


def tensor_to_proto(t: torch.Tensor) -> trunk_pb2.Tensor:
    """Encode a tensor as a wire frame (detached, copied to the CPU).

    Parameters
    ----------
    t : torch.Tensor
        Any shape, on any device; dtype one of :data:`WIRE_DTYPES`
        (float32/float16/bfloat16 activations, int64/int32 masks).

    Returns
    -------
    trunk_pb2.Tensor
        Dtype name, shape, raw little-endian bytes and their CRC-32.

    Raises
    ------
    ProtocolError
        If the dtype is not carried by the wire.
    """
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise ProtocolError(
            f"tensor dtype {t.dtype} is not carried by the split wire; "
            f"supported: {sorted(WIRE_DTYPES)}"
        )
    if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts here
        raise ProtocolError("the split wire needs a little-endian host")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes()
    return trunk_pb2.Tensor(
        dtype=name, shape=list(t.shape), data=data, crc32=zlib.crc32(data)
    )


def _check_shape(
    field: str, shape: Sequence[int], expected: Sequence[int] | None
) -> None:
    """Reject negative dims, absurd ranks and a mismatch with ``expected``."""
    if len(shape) > _MAX_NDIM:
        raise ProtocolError(
            f"field '{field}' has {len(shape)} dimensions, at most {_MAX_NDIM} allowed"
        )
    if any(d < 0 for d in shape):
        raise ProtocolError(f"field '{field}' has a negative dimension in {shape}")
    if expected is None:
        return
    ok = len(shape) == len(expected) and all(
        e == -1 or e == d for d, e in zip(shape, expected, strict=False)
    )
    if not ok:
        want = tuple("*" if e == -1 else e for e in expected)
        raise ProtocolError(
            f"field '{field}' has shape {tuple(shape)}, expected {want}"
        )


def tensor_from_proto(
    msg: trunk_pb2.Tensor,
    *,
    max_bytes: int,
    dtype: str | None = None,
    shape: Sequence[int] | None = None,
    allow_nonfinite: bool = False,
    field: str = "tensor",
) -> torch.Tensor:
    """Decode and validate a wire frame.

    Checks run in this order, before any tensor is built: dtype, shape, size
    limit, byte count, checksum; then finiteness of floating-point values.

    Parameters
    ----------
    msg : trunk_pb2.Tensor
        The received frame.
    max_bytes : int
        Largest ``data`` accepted, in bytes.
    dtype : str, optional
        Required dtype name (e.g. ``"float32"``); any of :data:`WIRE_DTYPES`
        when omitted.
    shape : Sequence[int], optional
        Required shape; ``-1`` matches any size in that dimension. The rank
        must match. Any shape when omitted.
    allow_nonfinite : bool
        Accept NaN and Inf (off by default).
    field : str
        Name of the message field, used in error messages.

    Returns
    -------
    torch.Tensor
        A fresh CPU tensor (it owns its memory, not the message buffer).

    Raises
    ------
    PayloadTooLargeError
        If ``data`` is longer than ``max_bytes``.
    ProtocolError
        On any other violation; the message names ``field``.
    """
    if msg.dtype not in WIRE_DTYPES:
        raise ProtocolError(
            f"field '{field}' has dtype {msg.dtype!r}; supported: {sorted(WIRE_DTYPES)}"
        )
    if dtype is not None and msg.dtype != dtype:
        raise ProtocolError(f"field '{field}' has dtype {msg.dtype}, expected {dtype}")
    dims = tuple(int(d) for d in msg.shape)
    _check_shape(field, dims, shape)
    data = msg.data
    if len(data) > max_bytes:
        raise PayloadTooLargeError(
            f"field '{field}' holds {len(data)} bytes, over the limit of {max_bytes}"
        )
    tdtype = WIRE_DTYPES[msg.dtype]
    itemsize = torch.empty((), dtype=tdtype).element_size()
    numel = math.prod(dims)
    if numel * itemsize != len(data):
        raise ProtocolError(
            f"field '{field}' holds {len(data)} bytes, but shape {dims} of "
            f"{msg.dtype} needs {numel * itemsize}"
        )
    crc = zlib.crc32(data)
    if crc != msg.crc32:
        raise ProtocolError(
            f"field '{field}' fails its checksum: crc32 {crc:#010x}, "
            f"frame says {msg.crc32:#010x}"
        )
    if numel == 0:
        return torch.empty(dims, dtype=tdtype)
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(tdtype).reshape(dims)
    if not allow_nonfinite and t.is_floating_point() and not bool(t.isfinite().all()):
        raise ProtocolError(f"field '{field}' contains NaN or Inf values")
    return t


def split_spec_to_json(spec: SplitSpec) -> str:
    """JSON text of ``spec.to_config_record()`` (sorted keys), for ``OpenRequest``."""
    return json.dumps(dict(spec.to_config_record()), sort_keys=True)


def split_spec_from_json(text: str) -> SplitSpec:
    """Parse and validate a :class:`SplitSpec` sent as JSON.

    Raises
    ------
    ProtocolError
        If the text is not a JSON object or the spec is invalid (a
        :class:`~protocols.errors.SpecMismatchError` for a bad schema version
        or fingerprint).
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"field 'spec_json' is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ProtocolError(
            f"field 'spec_json' must be a JSON object, got {type(data).__name__}"
        )
    return SplitSpec.from_config_record(data)
