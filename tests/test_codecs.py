"""Tests for protocols.codecs: the dtype-exact tensor <-> ArrayRecord codec.

The codec is the wire contract for every adapter that travels between server
and clients, so these tests pin down bit-exact round trips (float32, float16,
bfloat16, NaN payloads), the packing into one Flower array per dtype, and
that every malformed or tampered payload is refused with a ProtocolError that
names the problem instead of crashing or decoding garbage.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Array, ArrayRecord

from protocols import (
    CODEC_VERSION,
    PayloadTooLargeError,
    ProtocolError,
    TensorEntry,
    TensorLayout,
    decode_tensors,
    encode_tensors,
)
from protocols.codecs import MANIFEST_KEY, MANIFEST_STYPE, RAW_STYPE

_INT_VIEW = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer bit pattern of a float tensor (NaN-safe exact comparison)."""
    return t.contiguous().view(_INT_VIEW[t.dtype])


def _assert_bit_exact(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]
) -> None:
    assert list(got) == list(want)
    for name, ref in want.items():
        out = got[name]
        assert out.dtype == ref.dtype, name
        assert out.shape == ref.shape, name
        assert torch.equal(_bits(out), _bits(ref)), name


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "w32": torch.randn(4, 3, generator=g),
        "w16": torch.randn(5, generator=g).to(torch.float16),
        "wbf": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "w32b": torch.randn(7, generator=g),
        "wbf2": torch.randn(3, generator=g).to(torch.bfloat16),
    }


def _replace_manifest(
    record: ArrayRecord, blob: bytes, stype: str = MANIFEST_STYPE
) -> None:
    record[MANIFEST_KEY] = Array(
        dtype="uint8", shape=(len(blob),), stype=stype, data=blob
    )


def _manifest(record: ArrayRecord) -> dict:
    return json.loads(record[MANIFEST_KEY].data.decode())


# -- round trips ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_bit_exact_per_dtype(dtype: torch.dtype) -> None:
    """Each supported dtype must survive encode/decode bit for bit; a codec that
    went through float32 or NumPy conversion would change bits or the dtype."""
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(6, 5, generator=g) * 100).to(dtype)
    out = decode_tensors(encode_tensors({"x": t}))
    _assert_bit_exact(out, {"x": t})


def test_bfloat16_values_not_representable_in_float16_survive() -> None:
    """bf16 has float32's exponent range: 1e30, 1e-30 and 3e38 overflow or flush
    in float16. If the codec carried bf16 through float16 these would turn into
    inf or 0 and the bit patterns would differ."""
    t = torch.tensor([1e30, -1e-30, 3.0e38, 1e-38, 65504.0 * 4], dtype=torch.bfloat16)
    assert bool((t.to(torch.float16).float() != t.float()).all())  # none fits float16
    out = decode_tensors(encode_tensors({"b": t}))
    _assert_bit_exact(out, {"b": t})


def test_nan_payload_bits_preserved_when_allowed() -> None:
    """With allow_nonfinite=True, NaNs with non-canonical payloads, signed NaN
    and +/-Inf must come back with identical bits (raw bytes, no arithmetic)."""
    f32 = torch.tensor(
        [0x7FC00001, 0x7F800001, -0x00400001, 0x7F800000, 0x3F800000], dtype=torch.int32
    ).view(torch.float32)
    f16 = torch.tensor([0x7E01, 0x7C01, -0x0201, 0x7C00], dtype=torch.int16).view(
        torch.float16
    )
    bf = torch.tensor(
        [0x7FC1, 0x7F81, -0x003F, 0xFF80 - 0x10000], dtype=torch.int16
    ).view(torch.bfloat16)
    tensors = {"f32": f32, "f16": f16, "bf": bf}
    assert torch.isnan(f32[:3]).all() and torch.isnan(f16[:3]).all()
    out = decode_tensors(encode_tensors(tensors), allow_nonfinite=True)
    _assert_bit_exact(out, tensors)


def test_integer_dtypes_round_trip_exactly() -> None:
    """int32/int64 tensors (token ids, seeds) must keep dtype and every value,
    including the extremes, and pack one array per dtype beside the floats."""
    tensors = {
        "i64": torch.tensor([0, -1, 2**62, -(2**63), 2**63 - 1], dtype=torch.int64),
        "f": torch.tensor([1.5]),
        "i32": torch.tensor([[2**31 - 1, -(2**31)], [7, -7]], dtype=torch.int32),
    }
    record = encode_tensors(tensors)
    assert len(list(record.keys())) == 4
    out = decode_tensors(record, expected=TensorLayout.of(tensors))
    assert list(out) == list(tensors)
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t), name


def test_order_and_dtypes_preserved_with_interleaved_dtypes() -> None:
    """Tensors of different dtypes are packed per dtype; decoding must restore
    the original interleaved order and each tensor's dtype, or adapters would
    be loaded into the wrong parameters."""
    tensors = _mixed()
    out = decode_tensors(encode_tensors(tensors))
    _assert_bit_exact(out, tensors)
    assert [t.dtype for t in out.values()] == [t.dtype for t in tensors.values()]


def test_one_array_per_dtype_plus_manifest() -> None:
    """Packing keeps Flower's per-array cost flat: the record must hold exactly
    one array per distinct dtype plus the manifest, whatever the tensor count."""
    tensors = _mixed()
    record = encode_tensors(tensors)
    assert len(list(record.keys())) == 3 + 1
    assert set(record.keys()) == {"float32", "float16", "bfloat16", MANIFEST_KEY}
    many = {f"t{i}": torch.zeros(2) for i in range(40)}
    assert len(list(encode_tensors(many).keys())) == 2
    # the float32 array carries every float32 element, raw
    assert record["float32"].stype == RAW_STYPE
    assert len(record["float32"].data) == (12 + 7) * 4
    assert len(record["bfloat16"].data) == (4 + 3) * 2


def test_manifest_lists_every_tensor_in_order() -> None:
    """The manifest is the receiver's only source of names/shapes; it must list
    every tensor in wire order with the codec version."""
    tensors = _mixed()
    man = _manifest(encode_tensors(tensors))
    assert man["version"] == CODEC_VERSION
    assert [row[0] for row in man["tensors"]] == list(tensors)
    assert [tuple(row[2]) for row in man["tensors"]] == [
        tuple(t.shape) for t in tensors.values()
    ]


def test_scalars_and_zero_size_tensors() -> None:
    """0-d tensors (numel 1) and zero-size tensors (numel 0) must keep their
    shapes and not shift the offsets of their neighbours."""
    tensors = {
        "before": torch.arange(3, dtype=torch.float32),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "after": torch.tensor([7.0, 8.0]),
        "hscalar": torch.tensor(-1.5, dtype=torch.float16),
        "hempty": torch.zeros(3, 0, dtype=torch.float16),
    }
    out = decode_tensors(encode_tensors(tensors))
    _assert_bit_exact(out, tensors)
    assert out["scalar"].shape == () and out["empty"].shape == (0, 4)
    assert out["hempty"].shape == (3, 0)


def test_dtype_group_of_only_zero_size_tensors() -> None:
    """A dtype whose tensors are all zero-size yields an empty data array; that
    is valid encoder output and must decode (to the empty tensors), not crash
    with torch.frombuffer's ValueError on an empty buffer."""
    tensors = {
        "w": torch.ones(2),
        "bempty": torch.zeros(3, 0, dtype=torch.bfloat16),
    }
    record = encode_tensors(tensors)
    assert len(record["bfloat16"].data) == 0
    out = decode_tensors(record, expected=TensorLayout.of(tensors))
    _assert_bit_exact(out, tensors)
    only_empty = {"e": torch.zeros(0)}
    assert decode_tensors(encode_tensors(only_empty))["e"].shape == (0,)


def test_empty_mapping_round_trips() -> None:
    """An empty mapping encodes to a manifest alone and decodes to {}."""
    record = encode_tensors({})
    assert list(record.keys()) == [MANIFEST_KEY]
    assert decode_tensors(record) == {}


def test_non_contiguous_input_encodes_logical_values() -> None:
    """A transposed (non-contiguous) tensor must be sent in logical row-major
    order, not in its storage order."""
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    t = base.t()
    out = decode_tensors(encode_tensors({"t": t}))
    assert torch.equal(out["t"], t.contiguous())


def test_decoded_tensors_do_not_alias_record() -> None:
    """Decoded tensors must be writable copies: editing one must not change the
    record (a second decode) nor the other tensors."""
    record = encode_tensors({"a": torch.ones(3), "b": torch.full((2,), 5.0)})
    out = decode_tensors(record)
    out["a"].add_(1.0)
    assert torch.equal(out["b"], torch.full((2,), 5.0))
    assert torch.equal(decode_tensors(record)["a"], torch.ones(3))


def test_randomized_round_trips_fixed_generator() -> None:
    """50 random layouts (shapes incl. zero dims, random dtypes, interleaved)
    must round-trip bit-exactly; catches offset bugs that hand cases miss."""
    g = torch.Generator().manual_seed(1234)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    for trial in range(50):
        n = int(torch.randint(1, 6, (1,), generator=g))
        tensors = {}
        for i in range(n):
            ndim = int(torch.randint(0, 4, (1,), generator=g))
            shape = tuple(int(d) for d in torch.randint(0, 5, (ndim,), generator=g))
            dtype = dtypes[int(torch.randint(0, 3, (1,), generator=g))]
            tensors[f"t{trial}_{i}"] = torch.randn(shape, generator=g).to(dtype)
        # one non-empty tensor per dtype present (all-empty groups are tested above)
        for dtype in sorted({t.dtype for t in tensors.values()}, key=str):
            tensors[f"guard_{dtype}"] = torch.randn(1, generator=g).to(dtype)
        record = encode_tensors(tensors)
        assert len(list(record.keys())) == len({t.dtype for t in tensors.values()}) + 1
        _assert_bit_exact(
            decode_tensors(record, expected=TensorLayout.of(tensors)), tensors
        )


# -- layout checks -------------------------------------------------------------


def _layout_with(entries: list[TensorEntry]) -> TensorLayout:
    return TensorLayout(tuple(entries))


def test_expected_layout_match_accepts() -> None:
    """The layout of the sent tensors must be accepted as expected."""
    tensors = _mixed()
    out = decode_tensors(encode_tensors(tensors), expected=TensorLayout.of(tensors))
    _assert_bit_exact(out, tensors)


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        (TensorEntry("other", "float32", (2, 3)), "w"),
        (TensorEntry("w", "float16", (2, 3)), "float16"),
        (TensorEntry("w", "float32", (3, 2)), "(3, 2)"),
    ],
    ids=["name", "dtype", "shape"],
)
def test_expected_layout_mismatch_names_tensor(entry: TensorEntry, needle: str) -> None:
    """A payload whose name, dtype or shape differs from the expected layout must
    be refused with a message naming the tensor and the difference."""
    record = encode_tensors({"w": torch.zeros(2, 3)})
    with pytest.raises(ProtocolError) as err:
        decode_tensors(record, expected=_layout_with([entry]))
    msg = str(err.value)
    assert "'w'" in msg
    assert needle in msg


def test_expected_layout_count_mismatch() -> None:
    """A payload with fewer tensors than expected must be refused."""
    record = encode_tensors({"w": torch.zeros(2)})
    expected = _layout_with(
        [TensorEntry("w", "float32", (2,)), TensorEntry("v", "float32", (2,))]
    )
    with pytest.raises(ProtocolError, match="expected 2"):
        decode_tensors(record, expected=expected)


def test_layout_fingerprint_distinguishes_layouts() -> None:
    """Equal layouts give equal fingerprints; a changed shape or dtype does not."""
    a = TensorLayout.of({"w": torch.zeros(2, 3)})
    assert a.fingerprint() == TensorLayout.of({"w": torch.ones(2, 3)}).fingerprint()
    assert a.fingerprint() != TensorLayout.of({"w": torch.zeros(3, 2)}).fingerprint()
    assert (
        a.fingerprint()
        != TensorLayout.of({"w": torch.zeros(2, 3).half()}).fingerprint()
    )


# -- value checks --------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nonfinite_rejected_by_default(bad: float, dtype: torch.dtype) -> None:
    """NaN/Inf in an update would poison the global adapter; the default decode
    must refuse them and name the offending tensor."""
    tensors = {
        "fine": torch.ones(2, dtype=dtype),
        "poisoned": torch.tensor([1.0, bad]).to(dtype),
    }
    with pytest.raises(ProtocolError, match="'poisoned'"):
        decode_tensors(encode_tensors(tensors))


def test_max_bytes_exceeded() -> None:
    """A payload over max_bytes must raise PayloadTooLargeError (a ProtocolError);
    exactly at the limit it must still be accepted."""
    record = encode_tensors(
        {"a": torch.zeros(100), "b": torch.zeros(10, dtype=torch.float16)}
    )
    assert decode_tensors(record, max_bytes=420)["a"].shape == (100,)
    with pytest.raises(PayloadTooLargeError):
        decode_tensors(record, max_bytes=419)
    with pytest.raises(PayloadTooLargeError):
        decode_tensors(record, max_bytes=399)
    assert issubclass(PayloadTooLargeError, ProtocolError)


def test_unsupported_dtype_rejected_on_encode() -> None:
    """int16 (or float64) tensors are not part of the codec; encoding must refuse
    them with a ProtocolError naming the tensor, not silently cast."""
    with pytest.raises(ProtocolError, match="'ids'"):
        encode_tensors(
            {"ok": torch.zeros(1), "ids": torch.arange(3, dtype=torch.int16)}
        )
    with pytest.raises(ProtocolError, match="'d'"):
        encode_tensors({"d": torch.zeros(2, dtype=torch.float64)})


# -- tampered payloads -----------------------------------------------------------


def test_missing_manifest() -> None:
    """A record without the manifest array cannot be decoded."""
    record = encode_tensors({"a": torch.zeros(2)})
    del record[MANIFEST_KEY]
    with pytest.raises(ProtocolError, match=MANIFEST_KEY):
        decode_tensors(record)


def test_manifest_not_json() -> None:
    """Garbage (or non-UTF-8) manifest bytes must give a ProtocolError."""
    record = encode_tensors({"a": torch.zeros(2)})
    _replace_manifest(record, b"{not json")
    with pytest.raises(ProtocolError, match="manifest"):
        decode_tensors(record)
    _replace_manifest(record, b"\xff\xfe\x00")
    with pytest.raises(ProtocolError, match="manifest"):
        decode_tensors(record)


@pytest.mark.parametrize(
    "manifest",
    [
        [1, 2],
        5,
        {"tensors": []},
        {"version": 1},
        {"version": 1, "tensors": 5},
        {"version": 1, "tensors": None},
        {"version": 1, "tensors": [["a", ["float32"], [2]]]},
        {"version": 1, "tensors": [["a", "float32"]]},
        {"version": 1, "tensors": [["a", "float32", "2"]]},
        {"version": 1, "tensors": [["a", "float32", [-2]]]},
    ],
    ids=[
        "list",
        "int",
        "no-version",
        "no-tensors",
        "tensors-int",
        "tensors-null",
        "dtype-list",
        "short-row",
        "shape-str",
        "negative-dim",
    ],
)
def test_malformed_manifest_raises_protocol_error(manifest: object) -> None:
    """Any structurally wrong manifest must raise ProtocolError (callers catch
    only ProtocolError: a TypeError here would crash the server's round or the
    client's handler on one malicious payload)."""
    record = encode_tensors({"a": torch.zeros(2)})
    _replace_manifest(record, json.dumps(manifest).encode())
    with pytest.raises(ProtocolError):
        decode_tensors(record)


def test_wrong_manifest_stype() -> None:
    """A manifest array not tagged as a manifest must be refused."""
    record = encode_tensors({"a": torch.zeros(2)})
    _replace_manifest(record, record[MANIFEST_KEY].data, stype="numpy.ndarray")
    with pytest.raises(ProtocolError, match="stype"):
        decode_tensors(record)


def test_wrong_codec_version() -> None:
    """A manifest from another codec version must be refused, naming the version."""
    record = encode_tensors({"a": torch.zeros(2)})
    man = _manifest(record)
    man["version"] = CODEC_VERSION + 1
    _replace_manifest(record, json.dumps(man).encode())
    with pytest.raises(ProtocolError, match=str(CODEC_VERSION + 1)):
        decode_tensors(record)


def test_byte_length_mismatch() -> None:
    """A data array shorter (or longer) than the manifest needs must be refused,
    naming the array, rather than decoding misaligned tensors."""
    record = encode_tensors({"a": torch.zeros(4), "b": torch.ones(2)})
    short = record["float32"].data[:-4]
    record["float32"] = Array(dtype="float32", shape=(5,), stype=RAW_STYPE, data=short)
    with pytest.raises(ProtocolError, match="float32"):
        decode_tensors(record)
    longer = bytes(28)
    record["float32"] = Array(dtype="float32", shape=(7,), stype=RAW_STYPE, data=longer)
    with pytest.raises(ProtocolError, match="float32"):
        decode_tensors(record)


def test_mistagged_data_array() -> None:
    """A data array whose Flower dtype/stype tag disagrees with its key is refused."""
    record = encode_tensors({"a": torch.zeros(2)})
    data = record["float32"].data
    record["float32"] = Array(
        dtype="float32", shape=(2,), stype="numpy.ndarray", data=data
    )
    with pytest.raises(ProtocolError, match="float32"):
        decode_tensors(record)


def test_extra_unexpected_array() -> None:
    """An array the manifest does not account for must be refused (smuggled data)."""
    record = encode_tensors({"a": torch.zeros(2)})
    record["float16"] = Array(
        dtype="float16", shape=(1,), stype=RAW_STYPE, data=bytes(2)
    )
    with pytest.raises(ProtocolError, match="float16"):
        decode_tensors(record)


def test_missing_data_array() -> None:
    """A manifest naming a dtype whose array is absent must be refused."""
    record = encode_tensors(
        {"a": torch.zeros(2), "h": torch.zeros(2, dtype=torch.float16)}
    )
    del record["float16"]
    with pytest.raises(ProtocolError, match="float16"):
        decode_tensors(record)


def test_unsupported_dtype_in_manifest() -> None:
    """A manifest claiming an int16 tensor must be refused naming the tensor."""
    record = encode_tensors({"a": torch.zeros(2)})
    man = _manifest(record)
    man["tensors"][0][1] = "int16"
    _replace_manifest(record, json.dumps(man).encode())
    with pytest.raises(ProtocolError, match="'a'"):
        decode_tensors(record)


def test_duplicate_names_in_manifest_rejected() -> None:
    """A manifest listing the same name twice cannot describe a mapping; decoding
    must refuse it instead of silently keeping only one of the two tensors."""
    record = encode_tensors({"a": torch.arange(3, dtype=torch.float32)})
    _replace_manifest(
        record,
        json.dumps(
            {
                "version": CODEC_VERSION,
                "tensors": [["a", "float32", [3]], ["a", "float32", [0]]],
            }
        ).encode(),
    )
    with pytest.raises(ProtocolError, match="'a'"):
        decode_tensors(record)
