"""Tests for protocols.zo_messages on NumPy payloads (the train.zo wire format).

Breaks if the NumPy payloads change a byte of what the torch encoder wrote,
if a payload built with the wrong array type slips through, if a decoded
history of the wrong dtype is accepted, or if the torch client's FedKSeed-Pro
distribution (and so its seed draws) changes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from protocols import ProtocolError
from protocols.codecs import encode_arrays, encode_tensors
from protocols.messages import MAX_WIRE_FLOAT, RoundSchedule
from protocols.specs import ZOSpec
from protocols.zo_messages import (
    _MAX_SCALAR,
    RoundDelta,
    ZoTrainIns,
    ZoTrainRes,
    decode_zo_train_ins,
    encode_zo_train_ins,
    encode_zo_train_res,
)

SPEC = ZOSpec(model="m", walk_fingerprint="w", generator="g", num_seeds=8)
SCHEDULE = RoundSchedule(server_round=4, local_steps=3, batch_size=2, seed=1)


def _same_record(a: ArrayRecord, b: ArrayRecord) -> None:
    assert list(a.keys()) == list(b.keys())
    for key in a.keys():
        assert (a[key].data, a[key].dtype, a[key].shape) == (
            b[key].data,
            b[key].dtype,
            b[key].shape,
        ), key


def test_the_wire_bytes_are_those_of_the_torch_encoder() -> None:
    """The records equal what encode_tensors made of the same torch values."""
    idx = [1, 3, 3, 7]
    g = [0.5, -1.25, 2.0, 4.0]
    res = ZoTrainRes(np.array(idx, np.int32), np.array(g, np.float32), 9, 2.5, 3, "h")
    old = encode_tensors(
        {
            "indices": torch.tensor(idx, dtype=torch.int32),
            "scalars": torch.tensor(g, dtype=torch.float32),
        }
    )
    _same_record(encode_zo_train_res(res)["steps"], old)

    q = np.array([0, 255, 7, 9, 100, 3, 200, 1], np.uint8)
    history = (
        RoundDelta(2, np.array([0, 3], np.int32), np.array([0.5, -1.25], np.float32)),
        RoundDelta(3, np.array([7], np.int32), np.array([3e-3], np.float32)),
    )
    content = encode_zo_train_ins(ZoTrainIns(SPEC, SCHEDULE, 1, 3, "h", history, q))
    old_history = encode_tensors(
        {
            "rounds": torch.tensor([2, 3], dtype=torch.int32),
            "counts": torch.tensor([2, 1], dtype=torch.int32),
            "indices": torch.tensor([0, 3, 7], dtype=torch.int32),
            "coefficients": torch.tensor([0.5, -1.25, 3e-3], dtype=torch.float32),
        }
    )
    _same_record(content["history"], old_history)
    _same_record(
        content["importance"], encode_tensors({"importance": torch.from_numpy(q)})
    )


def test_payloads_refuse_arrays_of_the_wrong_kind() -> None:
    good_i, good_g = np.array([1], np.int32), np.array([0.5], np.float32)
    for idx, g in (
        (torch.tensor([1], dtype=torch.int32), good_g),
        (good_i, torch.tensor([0.5])),
        (good_i.astype(np.int64), good_g),
        (good_i, good_g.astype(np.float64)),
        (good_i, np.array([0.5, 1.0], np.float32)),
        (good_i.reshape(1, 1), good_g.reshape(1, 1)),
    ):
        with pytest.raises(TypeError, match="numpy"):
            ZoTrainRes(idx, g, 1, 1.0, 0, "h")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="numpy"):
            RoundDelta(1, idx, g)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="uint8"):
        ZoTrainIns(SPEC, SCHEDULE, 0, 0, "h", (), np.zeros(8, np.int32))  # type: ignore[arg-type]


def test_a_history_of_the_wrong_dtype_is_refused() -> None:
    content = encode_zo_train_ins(ZoTrainIns(SPEC, SCHEDULE, 0, 1, "h", ()))
    content["history"] = encode_arrays(
        {
            "rounds": np.array([1], np.int32),
            "counts": np.array([1], np.int32),
            "indices": np.array([2], np.int64),
            "coefficients": np.array([0.5], np.float32),
        }
    )
    with pytest.raises(ProtocolError, match="history 'indices'.*int32"):
        decode_zo_train_ins(content)


def test_the_scalar_bound_is_max_wire_float_in_float32() -> None:
    assert _MAX_SCALAR == float(torch.tensor(MAX_WIRE_FLOAT, dtype=torch.float32))


def test_pro_distributions_numpy_close_and_torch_client_unchanged() -> None:
    """The NumPy distribution agrees with torch's to rounding; the torch client
    computes exactly what it computed before (torch.softmax in float64)."""
    from client.zo_handler import pro_probabilities

    gen = np.random.default_rng(0)
    for k in (8, 64, 1024):
        q = gen.integers(0, 256, size=k, dtype=np.uint8)
        spec = ZOSpec(model="m", walk_fingerprint="w", generator="g", num_seeds=k)
        ins = decode_zo_train_ins(
            encode_zo_train_ins(ZoTrainIns(spec, SCHEDULE, 0, 0, "h", (), q))
        )
        old = torch.softmax(torch.from_numpy(q).double() / 255.0, dim=0)
        client = pro_probabilities(ins)
        assert client is not None and client.dtype == torch.float64
        assert torch.equal(client, old)
        p = ins.probabilities()
        assert p is not None and p.dtype == np.float64
        np.testing.assert_allclose(p, old.numpy(), rtol=1e-13, atol=0)
    uniform = ZoTrainIns(SPEC, SCHEDULE, 0, 0, "h", ())
    assert uniform.probabilities() is None and pro_probabilities(uniform) is None
