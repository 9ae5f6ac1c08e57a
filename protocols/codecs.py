"""Dtype-exact codec between named torch tensors and a Flower ``ArrayRecord``.

Wire format, version 1
----------------------
Tensors are grouped by dtype. Each group is concatenated, in manifest order,
into one flat little-endian byte buffer carried as a single Flower ``Array``
whose ``dtype`` field is the torch dtype name (``"float32"``, ``"float16"``,
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
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import Array, ArrayRecord

from protocols.errors import PayloadTooLargeError, ProtocolError

__all__ = [
    "CODEC_VERSION",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "MANIFEST_KEY",
    "RAW_STYPE",
    "SUPPORTED_DTYPES",
    "TensorEntry",
    "TensorLayout",
    "decode_tensors",
    "encode_tensors",
]

CODEC_VERSION = 1
RAW_STYPE = "pollinate.raw.v1"
MANIFEST_STYPE = "pollinate.manifest.v1"
MANIFEST_KEY = "__manifest__"
DEFAULT_MAX_PAYLOAD_BYTES = 512 * 1024 * 1024
SUPPORTED_DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in SUPPORTED_DTYPES.items()}


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
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> TensorLayout:
        """Build the layout of ``tensors`` in their iteration order.

        Raises
        ------
        ProtocolError
            If a tensor's dtype is not one of :data:`SUPPORTED_DTYPES`.
        """
        entries = []
        for name, t in tensors.items():
            if t.dtype not in _DTYPE_NAMES:
                raise ProtocolError(
                    f"tensor '{name}' has dtype {t.dtype}; the codec carries "
                    f"{sorted(SUPPORTED_DTYPES)}"
                )
            entries.append(TensorEntry(name, _DTYPE_NAMES[t.dtype], tuple(t.shape)))
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


def _raw_bytes(t: torch.Tensor) -> bytes:
    """Little-endian raw bytes of a tensor, on the CPU."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes()
    if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts here
        raise ProtocolError("the codec needs a little-endian host")
    return data


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack named tensors into one ``ArrayRecord`` (one array per dtype).

    Parameters
    ----------
    tensors : Mapping[str, torch.Tensor]
        Tensors of dtype float32, float16 or bfloat16, on any device. The
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
    layout = TensorLayout.of(tensors)
    groups: dict[str, list[bytes]] = {}
    for entry, t in zip(layout.entries, tensors.values(), strict=True):
        groups.setdefault(entry.dtype, []).append(_raw_bytes(t))
    record = ArrayRecord()
    for dtype, chunks in groups.items():
        data = b"".join(chunks)
        itemsize = torch.empty((), dtype=SUPPORTED_DTYPES[dtype]).element_size()
        record[dtype] = Array(
            dtype=dtype, shape=(len(data) // itemsize,), stype=RAW_STYPE, data=data
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
    flats: dict[str, torch.Tensor] = {}
    for dtype, numel in need.items():
        if dtype not in record:
            raise ProtocolError(f"payload lacks the '{dtype}' array its manifest names")
        arr = record[dtype]
        tdtype = SUPPORTED_DTYPES[dtype]
        nbytes = numel * torch.empty((), dtype=tdtype).element_size()
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
        if nbytes == 0:
            flats[dtype] = torch.empty(0, dtype=tdtype)
            continue
        buf = torch.frombuffer(bytearray(arr.data), dtype=torch.uint8)
        flats[dtype] = buf.view(tdtype)
    return _split(layout, flats, allow_nonfinite=allow_nonfinite, device=device)


def _split(
    layout: TensorLayout,
    flats: Mapping[str, torch.Tensor],
    *,
    allow_nonfinite: bool,
    device: torch.device | str,
) -> dict[str, torch.Tensor]:
    """Cut flat per-dtype buffers into the tensors of ``layout``."""
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
