"""Tests for protocols.specs (LoraSpec) and protocols.messages (typed payloads).

The spec and the per-round messages are what server and client must agree on
bit for bit. These tests check lossless round trips (also through Flower's
protobuf serialization, i.e. what really travels), that fingerprints catch
any change, and that every bad or tampered payload raises a ProtocolError (or
SpecMismatchError) naming the offending field, key or record.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from protocols import (
    LocalTrainConfig,
    LoraSpec,
    LoraTrainIns,
    LoraTrainRes,
    NodeHello,
    ProtocolError,
    SpecMismatchError,
    TensorLayout,
    decode_hello,
    decode_lora_train_ins,
    decode_lora_train_res,
    encode_hello,
    encode_lora_train_ins,
    encode_lora_train_res,
    encode_tensors,
)


def _wire(content: RecordDict) -> RecordDict:
    """What the other side receives: Flower's protobuf round trip."""
    return recorddict_from_proto(recorddict_to_proto(content))


def _spec() -> LoraSpec:
    return LoraSpec(
        model="tiny-llama",
        model_dtype="bfloat16",
        rank=4,
        alpha=8.0,
        dropout=0.05,
        target_modules=("q_proj", "k_proj", "v_proj"),
        max_length=64,
    )


def _config() -> LocalTrainConfig:
    return LocalTrainConfig(
        server_round=3,
        local_steps=5,
        batch_size=4,
        learning_rate=1e-3,
        weight_decay=0.01,
        seed=7,
    )


def _adapter() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "layer.0.lora_A.weight": torch.randn(4, 8, generator=g),
        "layer.0.lora_B.weight": torch.randn(8, 4, generator=g),
    }


# -- LoraSpec --------------------------------------------------------------------


def test_spec_round_trip_equal_and_same_fingerprint() -> None:
    """A spec sent over the wire must come back equal with the same fingerprint,
    or every client would refuse (or misread) every instruction."""
    spec = _spec()
    back = LoraSpec.from_config_record(spec.to_config_record())
    assert back == spec
    assert back.fingerprint() == spec.fingerprint()
    assert isinstance(back.target_modules, tuple)
    wired = _wire(RecordDict({"spec": spec.to_config_record()}))["spec"]
    assert LoraSpec.from_config_record(wired) == spec


def test_spec_defaults_round_trip() -> None:
    """The default spec (only a model name) round-trips too."""
    spec = LoraSpec(model="tiny-llama")
    assert LoraSpec.from_config_record(spec.to_config_record()) == spec


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", "other-model"),
        ("model_dtype", "float32"),
        ("rank", 8),
        ("alpha", 8.5),
        ("dropout", 0.0),
        ("target_modules", ("q_proj", "v_proj", "k_proj")),
        ("max_length", 65),
    ],
)
def test_fingerprint_changes_with_every_field(field: str, value: object) -> None:
    """Changing any single field (even the order of target modules) must change
    the fingerprint; otherwise two incompatible federations could match."""
    spec = _spec()
    other = dataclasses.replace(spec, **{field: value})
    assert other != spec
    assert other.fingerprint() != spec.fingerprint()


def test_fingerprint_is_stable_value() -> None:
    """The fingerprint is a 16-hex-digit digest that depends only on the fields."""
    fp = _spec().fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == _spec().fingerprint()


def test_tampered_field_raises_spec_mismatch() -> None:
    """Editing a field after encoding (corruption or a hand-edited spec) must be
    caught by the fingerprint check."""
    record = _spec().to_config_record()
    record["rank"] = 16
    with pytest.raises(SpecMismatchError, match="fingerprint"):
        LoraSpec.from_config_record(record)


def test_tampered_fingerprint_raises_spec_mismatch() -> None:
    """A missing or wrong fingerprint must be refused."""
    record = _spec().to_config_record()
    record["fingerprint"] = "0" * 16
    with pytest.raises(SpecMismatchError):
        LoraSpec.from_config_record(record)
    record = _spec().to_config_record()
    del record["fingerprint"]
    with pytest.raises(SpecMismatchError):
        LoraSpec.from_config_record(record)


def test_unknown_key_named() -> None:
    """A key this side does not know (e.g. from a newer server) must be refused
    by name rather than silently ignored."""
    record = _spec().to_config_record()
    record["use_dora"] = True
    with pytest.raises(ProtocolError, match="use_dora"):
        LoraSpec.from_config_record(record)


def test_missing_key_named() -> None:
    """A spec lacking a field must be refused naming that field."""
    record = _spec().to_config_record()
    del record["rank"]
    with pytest.raises(ProtocolError, match="rank"):
        LoraSpec.from_config_record(record)


@pytest.mark.parametrize("version", [2, 0, None])
def test_wrong_schema_version(version: int | None) -> None:
    """Another (or no) schema version must raise SpecMismatchError."""
    record = _spec().to_config_record()
    if version is None:
        del record["schema-version"]
    else:
        record["schema-version"] = version
    with pytest.raises(SpecMismatchError, match="schema"):
        LoraSpec.from_config_record(record)


@pytest.mark.parametrize(
    ("field", "value"),
    [("rank", "4"), ("rank", 4.0), ("rank", True), ("max_length", 64.5)],
)
def test_badly_typed_int_field_named(field: str, value: object) -> None:
    """Integers of the wrong type on the wire must be refused naming the field
    (a float rank would otherwise reach PEFT)."""
    record = _spec().to_config_record()
    record[field] = value
    with pytest.raises(ProtocolError, match=field):
        LoraSpec.from_config_record(record)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": -2}, "rank"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"max_length": 4}, "max_length"),
        ({"model": ""}, "model"),
        ({"target_modules": ()}, "target_modules"),
        ({"model_dtype": "int8"}, "model_dtype"),
    ],
)
def test_invalid_spec_values_raise_naming_field(kwargs: dict, field: str) -> None:
    """Out-of-range settings (including a NaN alpha, which is not > 0) must be
    refused at construction, naming the field."""
    base = {"model": "tiny-llama"}
    with pytest.raises(ProtocolError, match=field):
        LoraSpec(**{**base, **kwargs})


def test_out_of_range_value_on_wire_rejected() -> None:
    """A record claiming rank 0 must be refused by the value checks, naming the
    field (the decoder must not trust wire values more than the constructor)."""
    record = _spec().to_config_record()
    record["rank"] = 0
    with pytest.raises(ProtocolError, match="rank"):
        LoraSpec.from_config_record(record)


# -- LocalTrainConfig -------------------------------------------------------------


def test_train_config_round_trip() -> None:
    """The per-round training settings must survive the wire unchanged."""
    cfg = _config()
    assert LocalTrainConfig.from_config_record(cfg.to_config_record()) == cfg
    wired = _wire(RecordDict({"t": cfg.to_config_record()}))["t"]
    assert LocalTrainConfig.from_config_record(wired) == cfg


def test_train_config_integer_float_accepted() -> None:
    """A learning rate sent as an int (e.g. 1) is read as a float."""
    record = _config().to_config_record()
    record["weight-decay"] = 0
    cfg = LocalTrainConfig.from_config_record(record)
    assert cfg.weight_decay == 0.0 and isinstance(cfg.weight_decay, float)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"local_steps": 0}, "local_steps"),
        ({"server_round": 0}, "server_round"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": float("inf")}, "learning_rate"),
        ({"weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_train_config_bad_values_named(kwargs: dict, field: str) -> None:
    """Out-of-range training settings must raise naming the field."""
    base = dataclasses.asdict(_config())
    with pytest.raises(ProtocolError, match=field):
        LocalTrainConfig(**{**base, **kwargs})


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("local-steps", 0, "local_steps"),
        ("learning-rate", math.nan, "learning-rate"),
        ("learning-rate", math.inf, "learning-rate"),
        ("batch-size", 4.0, "batch-size"),
        ("seed", True, "seed"),
        ("learning-rate", "0.1", "learning-rate"),
    ],
)
def test_train_config_bad_record_named(key: str, value: object, needle: str) -> None:
    """A record with a bad value or type must be refused naming the key (or the
    field it maps to)."""
    record = _config().to_config_record()
    record[key] = value
    with pytest.raises(ProtocolError, match=needle):
        LocalTrainConfig.from_config_record(record)


def test_train_config_missing_key_named() -> None:
    """A record lacking a key must be refused naming it."""
    record = _config().to_config_record()
    del record["seed"]
    with pytest.raises(ProtocolError, match="'seed'"):
        LocalTrainConfig.from_config_record(record)


# -- train.lora instruction ----------------------------------------------------------


def test_train_ins_round_trip() -> None:
    """An instruction must decode (after the protobuf round trip) to the same
    spec, config and bit-identical adapter."""
    ins = LoraTrainIns(spec=_spec(), config=_config(), adapter=_adapter())
    back = decode_lora_train_ins(_wire(encode_lora_train_ins(ins)))
    assert back.spec == ins.spec
    assert back.config == ins.config
    assert list(back.adapter) == list(ins.adapter)
    for name, t in ins.adapter.items():
        assert torch.equal(back.adapter[name], t)


@pytest.mark.parametrize("record", ["spec", "train", "adapter"])
def test_train_ins_missing_record_named(record: str) -> None:
    """An instruction lacking one of its records must be refused naming it."""
    content = encode_lora_train_ins(LoraTrainIns(_spec(), _config(), _adapter()))
    del content[record]
    with pytest.raises(ProtocolError, match=f"'{record}'"):
        decode_lora_train_ins(content)


def test_train_ins_wrong_record_kind() -> None:
    """A record of the wrong kind under a known key must be refused."""
    content = encode_lora_train_ins(LoraTrainIns(_spec(), _config(), _adapter()))
    content["adapter"] = ConfigRecord({"x": 1})
    with pytest.raises(ProtocolError, match="adapter"):
        decode_lora_train_ins(content)


def test_train_ins_tampered_spec_and_size_limit() -> None:
    """The instruction decoder applies the spec fingerprint check and the
    payload size limit."""
    content = encode_lora_train_ins(LoraTrainIns(_spec(), _config(), _adapter()))
    content["spec"]["rank"] = 2
    with pytest.raises(SpecMismatchError):
        decode_lora_train_ins(content)
    content = encode_lora_train_ins(LoraTrainIns(_spec(), _config(), _adapter()))
    with pytest.raises(ProtocolError):
        decode_lora_train_ins(content, max_bytes=64 * 4 - 1)


# -- train.lora reply ------------------------------------------------------------------


def test_train_res_round_trip() -> None:
    """A reply must decode with the expected layout to the same adapter, count
    and loss (after the protobuf round trip)."""
    res = LoraTrainRes(adapter=_adapter(), num_examples=12, train_loss=1.25)
    back = decode_lora_train_res(
        _wire(encode_lora_train_res(res)), expected=TensorLayout.of(res.adapter)
    )
    assert back.num_examples == 12 and back.train_loss == 1.25
    for name, t in res.adapter.items():
        assert torch.equal(back.adapter[name], t)


def test_train_res_layout_enforced() -> None:
    """A reply whose adapter differs from the expected layout is refused naming
    the tensor."""
    res = LoraTrainRes(adapter=_adapter(), num_examples=3, train_loss=1.0)
    expected = TensorLayout.of(
        {
            "layer.0.lora_A.weight": torch.zeros(4, 8),
            "layer.0.lora_B.weight": torch.zeros(4, 8),
        }
    )
    with pytest.raises(ProtocolError, match="layer.0.lora_B.weight"):
        decode_lora_train_res(encode_lora_train_res(res), expected=expected)


@pytest.mark.parametrize("count", [0, -5])
def test_train_res_non_positive_examples_rejected(count: int) -> None:
    """A reply claiming <= 0 examples would zero or flip its FedAvg weight."""
    res = LoraTrainRes(adapter=_adapter(), num_examples=count, train_loss=1.0)
    with pytest.raises(ProtocolError, match="num-examples"):
        decode_lora_train_res(
            encode_lora_train_res(res), expected=TensorLayout.of(_adapter())
        )


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_train_res_nonfinite_loss_rejected(loss: float) -> None:
    """A NaN/Inf train loss would poison the round's reported loss."""
    res = LoraTrainRes(adapter=_adapter(), num_examples=3, train_loss=loss)
    with pytest.raises(ProtocolError, match="train-loss"):
        decode_lora_train_res(
            encode_lora_train_res(res), expected=TensorLayout.of(_adapter())
        )


def test_train_res_nan_adapter_rejected() -> None:
    """A reply adapter with NaN values must be refused naming the tensor."""
    adapter = _adapter()
    adapter["layer.0.lora_A.weight"][1, 2] = float("nan")
    res = LoraTrainRes(adapter=adapter, num_examples=3, train_loss=1.0)
    with pytest.raises(ProtocolError, match="layer.0.lora_A.weight"):
        decode_lora_train_res(
            encode_lora_train_res(res), expected=TensorLayout.of(adapter)
        )


@pytest.mark.parametrize("record", ["metrics", "adapter"])
def test_train_res_missing_record_named(record: str) -> None:
    """A reply lacking its metrics or adapter record is refused naming it."""
    content = encode_lora_train_res(LoraTrainRes(_adapter(), 3, 1.0))
    del content[record]
    with pytest.raises(ProtocolError, match=f"'{record}'"):
        decode_lora_train_res(content, expected=TensorLayout.of(_adapter()))


def test_train_res_missing_metric_key_named() -> None:
    """A metrics record without num-examples is refused naming the key."""
    content = RecordDict(
        {
            "adapter": encode_tensors(_adapter()),
            "metrics": MetricRecord({"train-loss": 1.0}),
        }
    )
    with pytest.raises(ProtocolError, match="num-examples"):
        decode_lora_train_res(content, expected=TensorLayout.of(_adapter()))
    content["metrics"] = MetricRecord({"num-examples": 2.5, "train-loss": 1.0})
    with pytest.raises(ProtocolError, match="num-examples"):
        decode_lora_train_res(content, expected=TensorLayout.of(_adapter()))
    content["adapter"] = ArrayRecord()
    content["metrics"] = MetricRecord({"num-examples": 2, "train-loss": 1.0})
    with pytest.raises(ProtocolError):
        decode_lora_train_res(content, expected=TensorLayout.of(_adapter()))


# -- query.hello ----------------------------------------------------------------------


def test_hello_round_trip() -> None:
    """A node's hello (label, example count) must survive the wire."""
    hello = NodeHello(label="p0003", num_examples=41)
    assert decode_hello(_wire(encode_hello(hello))) == hello


def test_signed_hello_and_its_nonce_round_trip() -> None:
    """The hello's nonce and the node's signature must survive the wire; an
    empty hello instruction carries no nonce (nothing to sign)."""
    from protocols.messages import decode_hello_ins, encode_hello_ins

    hello = NodeHello(label="site-a", num_examples=2, signature=b"\x00sig\xff")
    assert decode_hello(_wire(encode_hello(hello))) == hello
    nonce = bytes(range(32))
    assert decode_hello_ins(_wire(encode_hello_ins(nonce))) == nonce
    assert decode_hello_ins(RecordDict()) is None
    with pytest.raises(ProtocolError, match="nonce"):
        decode_hello_ins(encode_hello_ins(b"short"))


@pytest.mark.parametrize("label", ["", "a\nround 3: forged log line", "x" * 129])
def test_hello_label_must_be_short_printable_text(label: str) -> None:
    """Labels go into logs and the ledger: an empty, multi-line or overlong
    label is refused at decode."""
    with pytest.raises(ProtocolError, match="'label'"):
        decode_hello(encode_hello(NodeHello(label=label, num_examples=1)))


def test_hello_missing_record_and_key() -> None:
    """A hello without its record or label is refused naming what is missing."""
    with pytest.raises(ProtocolError, match="'hello'"):
        decode_hello(RecordDict())
    with pytest.raises(ProtocolError, match="'label'"):
        decode_hello(RecordDict({"hello": ConfigRecord({"num-examples": 3})}))
    with pytest.raises(ProtocolError, match="num-examples"):
        decode_hello(
            RecordDict({"hello": ConfigRecord({"label": "a", "num-examples": "3"})})
        )
