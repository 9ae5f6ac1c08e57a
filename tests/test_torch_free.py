"""The wire path of FedKSeed imports and works without torch (an edge client).

Breaks if a module an edge client needs (the protocol, the codec, the seed
generator, the model hash, the parameter walk, seed derivation) imports torch,
transformers, peft or accelerate at module level, or if the train.zo payloads
stop round-tripping through the NumPy codec.
"""

from __future__ import annotations

import numpy as np
import torch

from protocols.codecs import encode_arrays, encode_tensors
from tests.torch_blocker import prelude, run_without

MODULES = (
    "protocols.errors",
    "protocols.specs",
    "protocols.methods",
    "protocols.messages",
    "protocols.zo_messages",
    "protocols.codecs",
    "protocols.philox",
    "protocols.seed_arrays",
    "protocols.model_hash",
    "protocols.param_walk",
    "client.seeding",
    "strategies.seed_clip",
)

ROUND_TRIP = """
import numpy as np

from client.seeding import derive_seed
from protocols.errors import OutOfSyncError, ProtocolError
from protocols.messages import ClientClip, RoundSchedule
from protocols.specs import ZOSpec
from protocols.zo_messages import (
    RoundDelta, ZoTrainIns, ZoTrainRes, decode_zo_train_ins, decode_zo_train_res,
    encode_zo_train_ins, encode_zo_train_res,
)

assert issubclass(OutOfSyncError, ProtocolError)
assert derive_seed(5, 5, "z") == 8453137181802234872
spec = ZOSpec(model="m", walk_fingerprint="w", generator="g", num_seeds=8)
history = (
    RoundDelta(2, np.array([0, 3], np.int32), np.array([0.5, -1.25], np.float32)),
    RoundDelta(3, np.array([7], np.int32), np.array([3e-3], np.float32)),
)
q = np.array([0, 255, 7, 9, 100, 3, 200, 1], np.uint8)
ins = ZoTrainIns(
    spec, RoundSchedule(server_round=4, local_steps=3, batch_size=2, seed=1),
    1, 3, "abc", history, q, None, ClientClip(2.0),
)
got = decode_zo_train_ins(encode_zo_train_ins(ins))
assert (got.spec, got.config, got.base_round, got.target_round, got.target_hash) == (
    ins.spec, ins.config, 1, 3, "abc"
)
assert got.client_clip == ClientClip(2.0) and got.local_privacy is None
assert [d.round for d in got.history] == [2, 3]
for a, b in zip(got.history, history, strict=True):
    assert a.indices.dtype == np.int32 and a.coefficients.dtype == np.float32
    assert np.array_equal(a.indices, b.indices)
    assert np.array_equal(a.coefficients, b.coefficients)
assert got.importance.dtype == np.uint8 and np.array_equal(got.importance, q)
p = got.probabilities()
assert p.dtype == np.float64 and abs(p.sum() - 1.0) < 1e-12 and p.argmax() == 1

res = ZoTrainRes(
    np.array([1, 3, 3, 7], np.int32), np.array([0.5, -1.25, 2.0, 4.0], np.float32),
    9, 2.5, 3, "abc", skipped_steps=1,
)
back = decode_zo_train_res(encode_zo_train_res(res), num_seeds=8, max_steps=4)
assert np.array_equal(back.indices, res.indices) and back.indices.dtype == np.int32
assert np.array_equal(back.scalars, res.scalars) and back.scalars.dtype == np.float32
assert (back.num_examples, back.train_loss, back.synced_round, back.synced_hash) == (
    9, 2.5, 3, "abc"
)
assert back.skipped_steps == 1
try:
    decode_zo_train_res(encode_zo_train_res(res), num_seeds=7, max_steps=4)
except ProtocolError as exc:
    assert "outside the pool" in str(exc)
else:
    raise AssertionError("an out-of-pool index was accepted")
print("torch-free round trip ok")
"""


def test_the_wire_modules_import_and_round_trip_without_torch() -> None:
    imports = "\n".join(f"import {m}" for m in MODULES)
    out = run_without(imports + "\n" + ROUND_TRIP)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "torch-free round trip ok" in out.stdout


def test_the_blocker_blocks() -> None:
    """The prelude must make ``import torch`` fail, or the test above proves nothing."""
    out = run_without("import torch")
    assert out.returncode != 0
    assert "blocked by the test" in out.stderr
    # The torch front end of the codec imports torch when called, not before.
    lazy = run_without(
        "import numpy as np\nfrom protocols import codecs\n"
        "record = codecs.encode_arrays({'a': np.zeros(2, np.float32)})\n"
        "codecs.decode_tensors(record)"
    )
    assert lazy.returncode != 0 and "blocked by the test" in lazy.stderr
    assert "_Blocker" in prelude()


def test_numpy_and_torch_encoders_write_the_same_bytes() -> None:
    """One wire format: the NumPy and torch front ends agree byte for byte."""
    gen = np.random.default_rng(3)
    arrays = {
        "w": gen.normal(size=(3, 4)).astype(np.float32),
        "h": gen.normal(size=5).astype(np.float16),
        "i": np.array([1, -2, 2**31 - 1], np.int32),
        "l": np.array([[2**40, -1]], np.int64),
        "q": np.array([0, 7, 255], np.uint8),
        "s": np.array(1.5, np.float32),
        "e": np.zeros((0, 2), np.float32),
        "w2": gen.normal(size=2).astype(np.float32),
    }
    a = encode_arrays(arrays)
    t = encode_tensors({k: torch.from_numpy(v) for k, v in arrays.items()})
    assert list(a.keys()) == list(t.keys())
    for key in a.keys():
        assert a[key].data == t[key].data, key
        assert (a[key].dtype, a[key].shape, a[key].stype) == (
            t[key].dtype,
            t[key].shape,
            t[key].stype,
        )
