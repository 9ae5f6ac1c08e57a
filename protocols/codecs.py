"""Dtype-exact codec between named arrays (NumPy or torch) and a Flower ``ArrayRecord``.

Wire format, version 1
----------------------
Tensors are grouped by dtype. Each group is concatenated, in manifest order,
into one flat little-endian byte buffer carried as a single Flower ``Array``
whose ``dtype`` field is the dtype name (``"float32"``, ``"float16"``,
``"bfloat16"``, ``"int32"``, ``"int64"``, ``"uint8"``) and whose ``stype`` is
:data:`RAW_STYPE`. NumPy has no
bfloat16, so raw bits travel untouched instead of going through ``np.save``.

A manifest travels in the same record as one more ``Array`` under
:data:`MANIFEST_KEY`: UTF-8 JSON listing, in order, every tensor's name, dtype
and shape. Packing keeps the number of ``Array`` objects at one per dtype plus
one, which matters because Flower's per-message cost grows with the number of
arrays, not with their size.

Decoding validates before it builds anything: manifest form, supported dtypes,
byte counts, an optional expected :class:`TensorLayout`, a size limit and
finiteness. It raises :class:`~protocols.errors.ProtocolError` naming the
first problem found.

Two front ends share one implementation of the format:
:func:`encode_arrays` / :func:`decode_arrays` work on NumPy arrays and need no
torch (an edge client uses them); :func:`encode_tensors` /
:func:`decode_tensors` work on torch tensors (bfloat16 included) and import
torch only when called. Both produce and accept the same bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord

from protocols.errors import PayloadTooLargeError, ProtocolError

if TYPE_CHECKING:
    import torch

__all__ = [
    "CODEC_VERSION",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "MANIFEST_KEY",
    "RAW_STYPE",
    "SUPPORTED_DTYPES",
    "TensorEntry",
    "TensorLayout",
    "decode_arrays",
    "decode_tensors",
    "encode_arrays",
    "encode_tensors",
]

CODEC_VERSION = 1
RAW_STYPE = "pollinate.raw.v1"
MANIFEST_STYPE = "pollinate.manifest.v1"
MANIFEST_KEY = "__manifest__"
DEFAULT_MAX_PAYLOAD_BYTES = 512 * 1024 * 1024
SUPPORTED_DTYPES: Mapping[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
}
"""Wire dtype names and their bytes per element."""

# NumPy carries every wire dtype but bfloat16; its bits travel as int16.
_NP_DTYPES: Mapping[str, np.dtype[np.generic]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
}
_NP_NAMES = frozenset(_NP_DTYPES) - {"bfloat16"}
_FLOATS = frozenset({"float32", "float16", "bfloat16"})


@functools.cache
def _torch_dtypes() -> Mapping[str, torch.dtype]:
    """Wire dtype name -> torch dtype (imports torch)."""
    import torch

    return {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int32": torch.int32,
        "int64": torch.int64,
        "uint8": torch.uint8,
    }


@functools.cache
def _torch_names() -> Mapping[torch.dtype, str]:
    """Torch dtype -> wire dtype name (imports torch)."""
    return {v: k for k, v in _torch_dtypes().items()}


def _dtype_name(name: str, value: object) -> str:
    """The wire dtype name of a NumPy array or torch tensor ``value``."""
    if isinstance(value, np.ndarray):
        dtype: str = value.dtype.name
        if dtype not in _NP_NAMES:
            raise ProtocolError(
                f"array '{name}' has dtype {value.dtype}; the codec carries "
                f"{sorted(_NP_NAMES)} from NumPy"
            )
        return dtype
    tdtype = getattr(value, "dtype", None)
    found = _torch_names().get(tdtype) if tdtype is not None else None
    if found is None:
        raise ProtocolError(
            f"tensor '{name}' has dtype {tdtype}; the codec carries "
            f"{sorted(SUPPORTED_DTYPES)}"
        )
    return found


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a layout: its name, dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True)
class TensorLayout:
    """The ordered list of tensors both sides expect in a payload."""

    entries: tuple[TensorEntry, ...]

    @classmethod
    def of(
        cls, tensors: Mapping[str, torch.Tensor] | Mapping[str, npt.NDArray[np.generic]]
    ) -> TensorLayout:
        """Build the layout of ``tensors`` (torch or NumPy) in their iteration order.

        Raises
        ------
        ProtocolError
            If a tensor's dtype is not one of :data:`SUPPORTED_DTYPES`.
        """
        entries = []
        for name, t in tensors.items():
            shape = tuple(int(d) for d in t.shape)
            entries.append(TensorEntry(name, _dtype_name(name, t), shape))
        return cls(tuple(entries))

    @property
    def names(self) -> tuple[str, ...]:
        """Tensor names in order."""
        return tuple(e.name for e in self.entries)

    def fingerprint(self) -> str:
        """Short SHA-256 of the layout: equal layouts give equal fingerprints."""
        text = json.dumps([[e.name, e.dtype, list(e.shape)] for e in self.entries])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def check(self, received: TensorLayout) -> None:
        """Raise :class:`ProtocolError` naming the first difference from ``received``."""
        if len(received.entries) != len(self.entries):
            raise ProtocolError(
                f"payload holds {len(received.entries)} tensors, expected "
                f"{len(self.entries)}"
            )
        for want, got in zip(self.entries, received.entries, strict=True):
            if want.name != got.name:
                raise ProtocolError(
                    f"tensor name '{got.name}' where '{want.name}' was expected"
                )
            if want.dtype != got.dtype:
                raise ProtocolError(
                    f"tensor '{got.name}' has dtype {got.dtype}, expected {want.dtype}"
                )
            if want.shape != got.shape:
                raise ProtocolError(
                    f"tensor '{got.name}' has shape {got.shape}, expected {want.shape}"
                )


# ------------------------------------------------------------------ encoding


def _pack(layout: TensorLayout, chunks: list[bytes]) -> ArrayRecord:
    """The record of ``layout`` whose entries' little-endian bytes are ``chunks``."""
    groups: dict[str, list[bytes]] = {}
    for entry, chunk in zip(layout.entries, chunks, strict=True):
        groups.setdefault(entry.dtype, []).append(chunk)
    record = ArrayRecord()
    for dtype, parts in groups.items():
        data = b"".join(parts)
        record[dtype] = Array(
            dtype=dtype,
            shape=(len(data) // SUPPORTED_DTYPES[dtype],),
            stype=RAW_STYPE,
            data=data,
        )
    manifest = {
        "version": CODEC_VERSION,
        "tensors": [[e.name, e.dtype, list(e.shape)] for e in layout.entries],
    }
    blob = json.dumps(manifest, separators=(",", ":")).encode()
    record[MANIFEST_KEY] = Array(
        dtype="uint8", shape=(len(blob),), stype=MANIFEST_STYPE, data=blob
    )
    return record


def encode_arrays(arrays: Mapping[str, npt.NDArray[np.generic]]) -> ArrayRecord:
    """Pack named NumPy arrays into one ``ArrayRecord`` (one array per dtype).

    Parameters
    ----------
    arrays : Mapping[str, numpy.ndarray]
        Arrays of dtype float32, float16, int32, int64 or uint8 (any byte
        order or memory layout). The iteration order is the wire order.

    Returns
    -------
    ArrayRecord
        The same bytes :func:`encode_tensors` makes from equal tensors.

    Raises
    ------
    ProtocolError
        If a value is not an array of a supported dtype.
    """
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray):
            raise ProtocolError(
                f"array '{name}' is a {type(a).__name__}, not a numpy.ndarray"
            )
    layout = TensorLayout.of(arrays)
    chunks = [
        np.asarray(a, dtype=_NP_DTYPES[e.dtype]).tobytes(order="C")
        for e, a in zip(layout.entries, arrays.values(), strict=True)
    ]
    return _pack(layout, chunks)


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack named tensors into one ``ArrayRecord`` (one array per dtype).

    Parameters
    ----------
    tensors : Mapping[str, torch.Tensor]
        Tensors of a dtype in :data:`SUPPORTED_DTYPES`, on any device. The
        iteration order is the wire order.

    Returns
    -------
    ArrayRecord
        Keys: one per dtype name present, plus :data:`MANIFEST_KEY`.

    Raises
    ------
    ProtocolError
        If a tensor has an unsupported dtype.
    """
    import torch

    if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts here
        raise ProtocolError("the codec needs a little-endian host")
    layout = TensorLayout.of(tensors)
    chunks = [
        t.detach()
        .to("cpu")
        .contiguous()
        .reshape(-1)
        .view(torch.uint8)
        .numpy()
        .tobytes()
        for t in tensors.values()
    ]
    return _pack(layout, chunks)


# ------------------------------------------------------------------ decoding


def _read_manifest(record: ArrayRecord) -> TensorLayout:
    """Parse and check the manifest array of ``record``."""
    if MANIFEST_KEY not in record:
        raise ProtocolError(f"payload has no '{MANIFEST_KEY}' array")
    arr = record[MANIFEST_KEY]
    if arr.stype != MANIFEST_STYPE:
        raise ProtocolError(
            f"manifest stype is '{arr.stype}', expected '{MANIFEST_STYPE}'"
        )
    try:
        manifest = json.loads(arr.data.decode())
        version = manifest["version"]
        rows = manifest["tensors"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ProtocolError(f"manifest is not valid JSON of the codec: {exc}") from exc
    if version != CODEC_VERSION:
        raise ProtocolError(
            f"codec version {version!r} is not supported (this side speaks "
            f"{CODEC_VERSION})"
        )
    if not isinstance(rows, list):
        raise ProtocolError(
            f"manifest 'tensors' must be a list, got {type(rows).__name__}"
        )
    entries = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)):
            raise ProtocolError(f"manifest entry {i} is malformed: {row!r}")
        name, dtype, shape = row
        if name in seen:
            raise ProtocolError(f"manifest names tensor '{name}' twice")
        seen.add(name)
        if not isinstance(dtype, str) or dtype not in SUPPORTED_DTYPES:
            raise ProtocolError(
                f"tensor '{name}' has dtype {dtype!r}; supported: {sorted(SUPPORTED_DTYPES)}"
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and d >= 0 for d in shape
        ):
            raise ProtocolError(f"tensor '{name}' has an invalid shape {shape!r}")
        entries.append(TensorEntry(name, dtype, tuple(shape)))
    return TensorLayout(tuple(entries))


def _unpack(
    record: ArrayRecord, expected: TensorLayout | None, max_bytes: int
) -> tuple[TensorLayout, dict[str, npt.NDArray[np.generic]]]:
    """Validate ``record`` and return its layout and one fresh flat array per dtype.

    bfloat16 comes back as its int16 bit patterns.
    """
    layout = _read_manifest(record)
    if expected is not None:
        expected.check(layout)
    need: dict[str, int] = {}
    for e in layout.entries:
        need[e.dtype] = need.get(e.dtype, 0) + e.numel
    extra = set(record.keys()) - set(need) - {MANIFEST_KEY}
    if extra:
        raise ProtocolError(f"payload has unexpected arrays {sorted(extra)}")
    total = 0
    flats: dict[str, npt.NDArray[np.generic]] = {}
    for dtype, numel in need.items():
        if dtype not in record:
            raise ProtocolError(f"payload lacks the '{dtype}' array its manifest names")
        arr = record[dtype]
        nbytes = numel * SUPPORTED_DTYPES[dtype]
        total += len(arr.data)
        if total > max_bytes:
            raise PayloadTooLargeError(
                f"payload exceeds the limit of {max_bytes} bytes"
            )
        if arr.stype != RAW_STYPE or arr.dtype != dtype:
            raise ProtocolError(
                f"array '{dtype}' is tagged dtype={arr.dtype!r} stype={arr.stype!r}"
            )
        if len(arr.data) != nbytes:
            raise ProtocolError(
                f"array '{dtype}' holds {len(arr.data)} bytes, manifest needs {nbytes}"
            )
        flat = np.empty(numel, dtype=_NP_DTYPES[dtype])  # aligned, owns its memory
        if nbytes:
            flat.view(np.uint8)[:] = np.frombuffer(arr.data, dtype=np.uint8)
        flats[dtype] = flat
    return layout, flats


def decode_arrays(
    record: ArrayRecord,
    *,
    expected: TensorLayout | None = None,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    allow_nonfinite: bool = False,
) -> dict[str, npt.NDArray[Any]]:
    """Unpack an ``ArrayRecord`` into NumPy arrays, validating it (no torch needed).

    Parameters
    ----------
    record : ArrayRecord
        The received record.
    expected : TensorLayout, optional
        When given, names, dtypes and shapes must match it exactly.
    max_bytes : int
        Largest total tensor payload accepted, in bytes.
    allow_nonfinite : bool
        Accept NaN and Inf values (off by default).

    Returns
    -------
    dict[str, numpy.ndarray]
        Fresh writable arrays (not views of the message buffer) in manifest
        order, of native little-endian dtypes.

    Raises
    ------
    PayloadTooLargeError
        If the payload exceeds ``max_bytes``.
    ProtocolError
        For any other violation, including a bfloat16 tensor (NumPy has no
        bfloat16: use :func:`decode_tensors`); the message names the tensor or key.
    """
    layout, flats = _unpack(record, expected, max_bytes)
    offsets = dict.fromkeys(flats, 0)
    out: dict[str, npt.NDArray[Any]] = {}
    for e in layout.entries:
        if e.dtype not in _NP_NAMES:
            raise ProtocolError(
                f"tensor '{e.name}' has dtype {e.dtype}, which NumPy cannot hold"
            )
        start = offsets[e.dtype]
        a = flats[e.dtype][start : start + e.numel].reshape(e.shape)
        offsets[e.dtype] = start + e.numel
        if (
            not allow_nonfinite
            and e.dtype in _FLOATS
            and not bool(np.isfinite(a).all())
        ):
            raise ProtocolError(f"tensor '{e.name}' contains NaN or Inf values")
        out[e.name] = a
    return out


def decode_tensors(
    record: ArrayRecord,
    *,
    expected: TensorLayout | None = None,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    allow_nonfinite: bool = False,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Unpack an ``ArrayRecord`` made by :func:`encode_tensors`, validating it.

    Parameters
    ----------
    record : ArrayRecord
        The received record.
    expected : TensorLayout, optional
        When given, names, dtypes and shapes must match it exactly.
    max_bytes : int
        Largest total tensor payload accepted, in bytes.
    allow_nonfinite : bool
        Accept NaN and Inf values (off by default).
    device : torch.device or str
        Where the decoded tensors are placed.

    Returns
    -------
    dict[str, torch.Tensor]
        Fresh tensors (not views of the message buffer) in manifest order.

    Raises
    ------
    PayloadTooLargeError
        If the payload exceeds ``max_bytes``.
    ProtocolError
        For any other violation; the message names the tensor or key.
    """
    import torch

    if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts here
        raise ProtocolError("the codec needs a little-endian host")
    layout, arrays = _unpack(record, expected, max_bytes)
    tdtypes = _torch_dtypes()
    flats = {
        dtype: torch.from_numpy(a).view(tdtypes[dtype]) for dtype, a in arrays.items()
    }
    offsets = dict.fromkeys(flats, 0)
    out: dict[str, torch.Tensor] = {}
    for e in layout.entries:
        start = offsets[e.dtype]
        t = flats[e.dtype][start : start + e.numel].reshape(e.shape)
        offsets[e.dtype] = start + e.numel
        if not allow_nonfinite and not bool(torch.isfinite(t).all()):
            raise ProtocolError(f"tensor '{e.name}' contains NaN or Inf values")
        out[e.name] = t.to(device)
    return out
