"""Split-learning trunk service: wire frames, the gRPC service, the device client.

Everything runs over real gRPC on 127.0.0.1 with a toy frozen body
(``tanh(Linear(D, D)(h)) * mask``), and results are compared bit for bit with a
local autograd computation of the same body.
"""

from __future__ import annotations

import datetime
import ipaddress
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch

from client.trunk_client import TrunkClient, TrunkError, TrunkSession
from protocols.errors import PayloadTooLargeError, ProtocolError
from protocols.proto import trunk_pb2, trunk_pb2_grpc
from protocols.specs import SplitSpec
from protocols.split_wire import (
    split_spec_from_json,
    split_spec_to_json,
    tensor_from_proto,
    tensor_to_proto,
)
from server.trunk_service import TrunkService, start_trunk_server
from server.trunk_sessions import TrunkLimits

P, D = 2, 8
MiB = 1024 * 1024


def make_spec(client_blocks: int = 0, dtype: str = "float32") -> SplitSpec:
    return SplitSpec(
        model="toy",
        num_prompts=P,
        client_blocks=client_blocks,
        num_blocks=3,
        hidden_size=D,
        activation_dtype=dtype,
        max_length=8,
    )


class ToyBody:
    """A frozen ``tanh(Linear(h)) * mask`` computed in float32."""

    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.linear = torch.nn.Linear(D, D)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(D, D, generator=gen))
            self.linear.bias.copy_(torch.randn(D, generator=gen))
        self.linear.requires_grad_(False)
        self.device = torch.device("cpu")

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.linear.parameters()

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        out = torch.tanh(self.linear(hidden.float()))
        return out * attention_mask.unsqueeze(-1).float()


def reference(
    body: ToyBody, hidden: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local body output (wire dtype) and gradient at its input."""
    h = hidden.clone().requires_grad_()
    out = body.forward(h, mask)
    out.backward(grad.to(out.dtype))
    return out.detach().to(hidden.dtype), h.grad


def inputs(seed: int, batch: int = 3, tokens: int = 5, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, P + tokens, D, generator=gen).to(dtype)
    mask = torch.ones(batch, P + tokens, dtype=torch.int64)
    mask[0, -2:] = 0  # padding, so the mask matters
    grad = torch.randn(batch, P + tokens, D, generator=gen).to(dtype)
    return hidden, mask, grad


LABELS = ("dev-0", "dev-1", "dev-a", "dev-b")


@dataclass
class Served:
    service: TrunkService
    body: ToyBody
    address: str
    port: int
    grants: dict[str, bytes]

    def grant(self, label: str) -> bytes:
        """The round-1 secret of ``label`` (issued when the server started)."""
        return self.grants[label]


def serving() -> Iterator[Callable[..., Served]]:
    """Start trunk servers on free ports; stop them at teardown (fixture body)."""
    servers: list[grpc.Server] = []

    def start(
        spec: SplitSpec | None = None, *, tls: tuple[bytes, bytes] | None = None, **kw
    ) -> Served:
        body = ToyBody()
        service = TrunkService(body, spec or make_spec(), **kw)
        server, port = start_trunk_server(service, tls=tls)
        servers.append(server)
        grants = service.grant_round(1, LABELS)
        return Served(service, body, f"127.0.0.1:{port}", port, grants)

    yield start
    for server in servers:
        server.stop(None)


def connecting() -> Iterator[Callable[..., TrunkClient]]:
    """Make trunk clients; close them at teardown (fixture body)."""
    made: list[TrunkClient] = []

    def connect(address: str, **kw) -> TrunkClient:
        c = TrunkClient(address, timeout_s=10.0, **kw)
        made.append(c)
        return c

    yield connect
    for c in made:
        c.close()


serve = pytest.fixture(name="serve")(serving)
clients = pytest.fixture(name="clients")(connecting)


def raises_code(code: grpc.StatusCode, *words: str):
    """Context manager: a TrunkError with ``code`` whose details hold ``words``."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(TrunkError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            suppressed = self.ctx.__exit__(*exc)
            err = self.info.value
            assert err.code == code, f"{err.code} != {code}: {err.details}"
            for w in words:
                assert w in err.details, f"{w!r} not in {err.details!r}"
            return suppressed

    return _Check()


def train_step(s: TrunkSession, body: ToyBody, seed: int) -> None:
    """One training step through the session, checked against the reference."""
    hidden, mask, grad = inputs(seed)
    want_out, want_grad = reference(body, hidden, mask, grad)
    assert torch.equal(s.forward(hidden, mask, train=True), want_out)
    got = s.backward(grad)
    want = want_grad if s.spec.returns_all_positions else want_grad[:, :P]
    assert torch.equal(got, want)


# --- frame codec ------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32]
)
def test_frame_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    """Encode/decode must keep every bit (bf16 as raw bits, ints untouched)."""
    gen = torch.Generator().manual_seed(1)
    if dtype.is_floating_point:
        t = (torch.randn(2, 3, 4, generator=gen) * 1e3).to(dtype)
    else:
        t = torch.randint(-(2**30), 2**30, (2, 3, 4), generator=gen, dtype=dtype)
    msg = trunk_pb2.Tensor.FromString(tensor_to_proto(t).SerializeToString())
    back = tensor_from_proto(msg, max_bytes=MiB, dtype=str(dtype).split(".")[1])
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))
    assert msg.crc32 == zlib.crc32(msg.data)


def test_frame_empty_and_wildcard_shape() -> None:
    """Zero-element tensors and -1 wildcards must decode; a rank change must not."""
    empty = tensor_to_proto(torch.empty(0, 5))
    assert tensor_from_proto(empty, max_bytes=10, shape=(-1, 5)).shape == (0, 5)
    frame = tensor_to_proto(torch.zeros(2, 3))
    with pytest.raises(ProtocolError, match="'x' has shape"):
        tensor_from_proto(frame, max_bytes=MiB, shape=(2, 3, -1), field="x")


def test_frame_rejects_bad_crc() -> None:
    """A flipped byte must be caught by the checksum, not decoded as data."""
    msg = tensor_to_proto(torch.ones(4))
    msg.data = bytes([msg.data[0] ^ 0x01]) + msg.data[1:]
    with pytest.raises(ProtocolError, match="'hidden' fails its checksum"):
        tensor_from_proto(msg, max_bytes=MiB, field="hidden")


def test_frame_rejects_shape_byte_mismatch_and_negative_dims() -> None:
    """Shape and byte count must agree; negative dims are refused."""
    msg = tensor_to_proto(torch.ones(2, 3))
    msg.shape[:] = [2, 4]
    with pytest.raises(ProtocolError, match="'grad' holds 24 bytes.*needs 32"):
        tensor_from_proto(msg, max_bytes=MiB, field="grad")
    msg.shape[:] = [-2, -3]
    with pytest.raises(ProtocolError, match="negative"):
        tensor_from_proto(msg, max_bytes=MiB, field="grad")


def test_frame_rejects_dtype_size_and_nonfinite() -> None:
    """Unknown or unexpected dtypes, oversized data and NaN/Inf are refused."""
    msg = tensor_to_proto(torch.ones(4))
    with pytest.raises(ProtocolError, match="expected float16"):
        tensor_from_proto(msg, max_bytes=MiB, dtype="float16")
    bad = trunk_pb2.Tensor(dtype="float64", shape=[1], data=b"\0" * 8)
    with pytest.raises(ProtocolError, match="dtype 'float64'"):
        tensor_from_proto(bad, max_bytes=MiB)
    with pytest.raises(PayloadTooLargeError, match="limit of 15"):
        tensor_from_proto(msg, max_bytes=15)
    nan = tensor_to_proto(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ProtocolError, match="'m' contains NaN"):
        tensor_from_proto(nan, max_bytes=MiB, field="m")
    assert tensor_from_proto(nan, max_bytes=MiB, allow_nonfinite=True).isnan().any()
    with pytest.raises(ProtocolError, match="float64"):
        tensor_to_proto(torch.ones(2, dtype=torch.float64))


def test_spec_json_round_trip() -> None:
    """The spec must survive its JSON form; a tampered one must be refused."""
    spec = make_spec(1, "bfloat16")
    assert split_spec_from_json(split_spec_to_json(spec)) == spec
    with pytest.raises(ProtocolError):
        split_spec_from_json(split_spec_to_json(spec).replace('"toy"', '"other"'))
    with pytest.raises(ProtocolError, match="spec_json"):
        split_spec_from_json("[1, 2]")


# --- the service ------------------------------------------------------------


def test_forward_and_backward_match_local_autograd(serve, clients) -> None:
    """k == 0: body output exact, gradient exactly the prompt positions' slice."""
    srv = serve()
    with clients(srv.address).open(srv.service.spec, "dev-0", srv.grant("dev-0")) as s:
        hidden, mask, grad = inputs(0)
        want_out, want_grad = reference(srv.body, hidden, mask, grad)
        out = s.forward(hidden, mask, train=True)
        assert torch.equal(out, want_out)
        g = s.backward(grad)
        assert g.shape == (3, P, D)
        assert torch.equal(g, want_grad[:, :P])
        train_step(s, srv.body, seed=1)
        assert s.step == 2


def test_all_positions_when_device_holds_blocks(serve, clients) -> None:
    """k > 0: the device back-propagates its own blocks, so every position returns."""
    srv = serve(make_spec(client_blocks=1))
    s = clients(srv.address).open(srv.service.spec, "dev-0", srv.grant("dev-0"))
    hidden, mask, grad = inputs(2)
    _, want_grad = reference(srv.body, hidden, mask, grad)
    s.forward(hidden, mask, train=True)
    g = s.backward(grad)
    assert g.shape == hidden.shape and torch.equal(g, want_grad)


def test_bfloat16_activations(serve, clients) -> None:
    """bf16 on the wire: body output and prompt gradient still bit-exact."""
    srv = serve(make_spec(dtype="bfloat16"))
    s = clients(srv.address).open(srv.service.spec, "dev-0", srv.grant("dev-0"))
    hidden, mask, grad = inputs(3, dtype=torch.bfloat16)
    want_out, want_grad = reference(srv.body, hidden, mask, grad)
    out = s.forward(hidden, mask, train=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want_out)
    g = s.backward(grad)
    assert g.dtype == torch.bfloat16 and torch.equal(g, want_grad[:, :P])


def test_eval_forward_completes_the_step(serve, clients) -> None:
    """train=False returns body(h), advances the step and leaves nothing pending."""
    srv = serve()
    s = clients(srv.address).open(srv.service.spec, "dev-0", srv.grant("dev-0"))
    hidden, mask, grad = inputs(4)
    want_out, _ = reference(srv.body, hidden, mask, grad)
    assert torch.equal(s.forward(hidden, mask, train=False), want_out)
    assert s.step == 1
    with raises_code(grpc.StatusCode.FAILED_PRECONDITION, "out of order"):
        s.backward(grad)
    train_step(s, srv.body, seed=5)


def test_concurrent_sessions_interleave_correctly(serve, clients) -> None:
    """Interleaved forward/backward of two sessions must not mix their graphs."""
    srv = serve()
    client = clients(srv.address)
    barrier = threading.Barrier(2, timeout=10)
    results: dict[int, tuple[torch.Tensor, ...]] = {}
    errors: list[BaseException] = []

    def run(idx: int) -> None:
        try:
            s = client.open(srv.service.spec, f"dev-{idx}", srv.grant(f"dev-{idx}"))
            hidden, mask, grad = inputs(10 + idx)
            barrier.wait()
            out = s.forward(hidden, mask, train=True)
            barrier.wait()  # both forwards done before either backward
            g = s.backward(grad)
            barrier.wait()
            results[idx] = (hidden, mask, grad, out, g)
            s.close()
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    for hidden, mask, grad, out, g in results.values():
        want_out, want_grad = reference(srv.body, hidden, mask, grad)
        assert torch.equal(out, want_out)
        assert torch.equal(g, want_grad[:, :P])
    assert not torch.equal(results[0][4], results[1][4])


def test_spec_mismatch_is_failed_precondition(serve, clients) -> None:
    """A device with another split is refused, naming its own fingerprint only.

    Breaks if the message reveals the server's spec or fingerprint (enough to
    forge a matching spec).
    """
    srv = serve()
    other = make_spec(client_blocks=1)
    with raises_code(
        grpc.StatusCode.FAILED_PRECONDITION, "spec mismatch", other.fingerprint()
    ) as info:
        clients(srv.address).open(other, "dev-0", srv.grant("dev-0"))
    assert srv.service.spec.fingerprint() not in info.value.details
    assert "toy" not in info.value.details and "\n" not in info.value.details
    assert srv.service.open_sessions() == 0


def test_unknown_and_closed_sessions_are_not_found(serve, clients) -> None:
    """Calls on a session the server does not hold must get NOT_FOUND."""
    srv = serve()
    client = clients(srv.address)
    s = client.open(srv.service.spec, "dev-0", srv.grant("dev-0"))
    hidden, mask, _ = inputs(0)
    ghost = TrunkSession(client, srv.service.spec, "feedbeef", 1)
    with raises_code(grpc.StatusCode.NOT_FOUND, "unknown split session"):
        ghost.forward(hidden, mask, train=True)
    train_step(s, srv.body, seed=0)
    counters = s.close()
    assert counters == {"steps": 1, "bytes_up": s.bytes_up, "bytes_down": s.bytes_down}
    assert s.close() == counters  # idempotent, no second RPC
    with raises_code(grpc.StatusCode.NOT_FOUND):
        s.forward(hidden, mask, train=True)
    with raises_code(grpc.StatusCode.NOT_FOUND):
        ghost.close()


def test_out_of_order_steps_are_refused_and_session_survives(serve, clients) -> None:
    """Backward first, forward twice, a wrong step: FAILED_PRECONDITION, no damage."""
    srv = serve()
    client = clients(srv.address)
    s = client.open(srv.service.spec, "dev-0", srv.grant("dev-0"))
    hidden, mask, grad = inputs(0)
    with raises_code(grpc.StatusCode.FAILED_PRECONDITION, "expected step 0"):
        s.backward(grad)
    s.forward(hidden, mask, train=True)
    with raises_code(grpc.StatusCode.FAILED_PRECONDITION, "expected step 0", "pending"):
        s.forward(hidden, mask, train=True)
    stub = trunk_pb2_grpc.SplitTrunkStub(client._channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Backward(
            trunk_pb2.BackwardRequest(
                session_id=s.session_id, step=7, grad=tensor_to_proto(grad)
            )
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "out of order: expected step 0" in info.value.details()
    # The pending step is intact: its backward is still exact.
    _, want_grad = reference(srv.body, hidden, mask, grad)
    assert torch.equal(s.backward(grad), want_grad[:, :P])
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(
            trunk_pb2.ForwardRequest(
                session_id=s.session_id,
                step=5,
                hidden=tensor_to_proto(hidden),
                attention_mask=tensor_to_proto(mask),
            )
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expected step 1" in info.value.details()
    train_step(s, srv.body, seed=1)


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("hidden_dtype", "hidden"),
        ("hidden_width", "hidden"),
        ("too_many_tokens", "hidden"),
        ("hidden_nan", "hidden"),
        ("hidden_crc", "hidden"),
        ("mask_dtype", "attention_mask"),
        ("mask_shape", "attention_mask"),
        ("mask_values", "attention_mask"),
    ],
)
def test_bad_forward_frames_are_invalid_argument(serve, clients, case, field) -> None:
    """Each bad input is named in INVALID_ARGUMENT and the session keeps working."""
    srv = serve()
    client = clients(srv.address)
    s = client.open(srv.service.spec, "dev-0", srv.grant("dev-0"))
    hidden, mask, _ = inputs(0)
    h, m = tensor_to_proto(hidden), tensor_to_proto(mask)
    if case == "hidden_dtype":
        h = tensor_to_proto(hidden.half())
    elif case == "hidden_width":
        h = tensor_to_proto(hidden[..., :-1])
    elif case == "too_many_tokens":
        h = tensor_to_proto(torch.zeros(1, P + 9, D))
        m = tensor_to_proto(torch.ones(1, P + 9, dtype=torch.int64))
    elif case == "hidden_nan":
        bad = hidden.clone()
        bad[1, 3, 4] = float("nan")
        h = tensor_to_proto(bad)
    elif case == "hidden_crc":
        h.crc32 ^= 1
    elif case == "mask_dtype":
        m = tensor_to_proto(mask.int())
    elif case == "mask_shape":
        m = tensor_to_proto(mask[:, 1:])
    elif case == "mask_values":
        m = tensor_to_proto(mask * 2)
    stub = trunk_pb2_grpc.SplitTrunkStub(client._channel)
    request = trunk_pb2.ForwardRequest(
        session_id=s.session_id, step=0, hidden=h, attention_mask=m, train=True
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"'{field}'" in info.value.details()
    train_step(s, srv.body, seed=0)


def test_bad_gradient_is_invalid_argument_and_step_stays_pending(
    serve, clients
) -> None:
    """A wrong-shape or NaN gradient is refused; a good one then completes the step."""
    srv = serve()
    s = clients(srv.address).open(srv.service.spec, "dev-0", srv.grant("dev-0"))
    hidden, mask, grad = inputs(0)
    s.forward(hidden, mask, train=True)
    with raises_code(grpc.StatusCode.INVALID_ARGUMENT, "'grad' has shape"):
        s.backward(grad[:, 1:])
    nan = grad.clone()
    nan[0, 0, 0] = float("inf")
    with raises_code(grpc.StatusCode.INVALID_ARGUMENT, "'grad' contains NaN or Inf"):
        s.backward(nan)
    _, want_grad = reference(srv.body, hidden, mask, grad)
    assert torch.equal(s.backward(grad), want_grad[:, :P])


def test_oversized_message_is_resource_exhausted(serve, clients) -> None:
    """Past max_message_bytes the transport refuses; the session is unharmed."""
    srv = serve(max_message_bytes=64 * 1024)
    s = clients(srv.address).open(srv.service.spec, "dev-0", srv.grant("dev-0"))
    assert s.server_max_message_bytes == 64 * 1024
    big = torch.zeros(300, P + 8, D)  # 96 000 bytes of activations
    with raises_code(grpc.StatusCode.RESOURCE_EXHAUSTED):
        s.forward(big, torch.ones(300, P + 8, dtype=torch.int64), train=True)
    train_step(s, srv.body, seed=0)


def test_one_sessions_error_leaves_another_untouched(serve, clients) -> None:
    """A refused call in session B must not disturb A's pending step."""
    srv = serve()
    client = clients(srv.address)
    a = client.open(srv.service.spec, "dev-a", srv.grant("dev-a"))
    b = client.open(srv.service.spec, "dev-b", srv.grant("dev-b"))
    hidden, mask, grad = inputs(0)
    a.forward(hidden, mask, train=True)
    bad = hidden.clone()
    bad[0, 0, 0] = float("nan")
    with raises_code(grpc.StatusCode.INVALID_ARGUMENT, "'hidden'"):
        b.forward(bad, mask, train=True)
    with raises_code(grpc.StatusCode.FAILED_PRECONDITION):
        b.backward(grad)
    b.close()
    _, want_grad = reference(srv.body, hidden, mask, grad)
    assert torch.equal(a.backward(grad), want_grad[:, :P])
    train_step(a, srv.body, seed=1)


def test_usage_counts_bytes_per_client(serve, clients) -> None:
    """usage() must equal the serialized traffic both sides counted, per client."""
    srv = serve()
    client = clients(srv.address)
    a = client.open(srv.service.spec, "dev-a", srv.grant("dev-a"))
    b = client.open(srv.service.spec, "dev-b", srv.grant("dev-b"))
    train_step(a, srv.body, seed=0)
    train_step(a, srv.body, seed=1)
    train_step(b, srv.body, seed=2)
    usage = srv.service.usage()
    assert usage == {
        "dev-a": {"up": a.bytes_up, "down": a.bytes_down, "steps": 2},
        "dev-b": {"up": b.bytes_up, "down": b.bytes_down, "steps": 1},
    }
    assert a.bytes_up > 2 * 3 * (P + 5) * D * 4  # activations + gradients went up
    assert a.close() == {"steps": 2, "bytes_up": a.bytes_up, "bytes_down": a.bytes_down}
    assert srv.service.reset_usage() == usage
    assert srv.service.usage() == {}


def test_idle_sessions_expire_and_session_limit(serve, clients) -> None:
    """Idle sessions are dropped at the next Open; the cap is RESOURCE_EXHAUSTED."""
    now = [0.0]
    limits = TrunkLimits(max_sessions=1, idle_timeout_s=60.0)
    srv = serve(limits=limits, clock=lambda: now[0])
    client = clients(srv.address)
    old = client.open(srv.service.spec, "dev-0", srv.grant("dev-0"))
    with raises_code(grpc.StatusCode.RESOURCE_EXHAUSTED, "no free session"):
        client.open(srv.service.spec, "dev-1", srv.grant("dev-1"))
    now[0] = 61.0
    new = client.open(srv.service.spec, "dev-1", srv.grant("dev-1"))
    hidden, mask, _ = inputs(0)
    with raises_code(grpc.StatusCode.NOT_FOUND):
        old.forward(hidden, mask, train=True)
    train_step(new, srv.body, seed=0)


def test_end_of_round_drops_its_sessions_and_their_graphs(serve, clients) -> None:
    """A device that vanished between Forward and Backward leaves a pending
    graph; the end of its round frees it, and later rounds' sessions stay.

    Breaks if a finished round's sessions (and activation memory) are kept
    until some later Open happens to expire them.
    """
    srv = serve()
    client = clients(srv.address)
    gone = client.open(srv.service.spec, "dev-0", srv.grant("dev-0"))
    hidden, mask, grad = inputs(0)
    gone.forward(hidden, mask, train=True)  # and never calls Backward
    round2 = srv.service.grant_round(2, ["dev-1"])
    later = client.open(srv.service.spec, "dev-1", round2["dev-1"])
    assert srv.service.open_sessions() == 2
    assert srv.service.end_round(1) == 1
    assert srv.service.open_sessions() == 1
    with raises_code(grpc.StatusCode.NOT_FOUND):
        gone.backward(grad)
    train_step(later, srv.body, seed=1)


def test_body_with_trainable_parameters_is_refused() -> None:
    """The shared body must be frozen, or backward would accumulate into it."""
    body = ToyBody()
    body.linear.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        TrunkService(body, make_spec())


# --- TLS ----------------------------------------------------------------------


def self_signed() -> tuple[bytes, bytes]:
    """A certificate for 127.0.0.1 and localhost, with its private key (PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


def test_tls_server_accepts_tls_and_refuses_plaintext(serve, clients) -> None:
    """With TLS the trusted client works; a plaintext client must not get through."""
    cert, key = self_signed()
    srv = serve(tls=(cert, key))
    secure = clients(srv.address, root_certificates=cert)
    with secure.open(srv.service.spec, "dev-0", srv.grant("dev-0")) as s:
        train_step(s, srv.body, seed=0)
    with raises_code(grpc.StatusCode.UNAVAILABLE):
        clients(srv.address).open(srv.service.spec, "dev-1", srv.grant("dev-1"))
    assert srv.service.open_sessions() == 0


def test_trunk_uses_the_deployments_certificates(serve, clients, tmp_path) -> None:
    """``server start --certs DIR`` recorded in server.json gives the trunk TLS.

    Breaks if the trunk stays plaintext while the SuperLink runs with
    certificates (activations and grants would cross the network in clear).
    """
    from server.certificates import make_dev_pki
    from server.config import SplitSection
    from server.deploy import ServerInfo, write_server_info
    from server.split_driver import trunk_tls

    split = SplitSection()
    assert trunk_tls(split, None) == (None, b"")
    assert trunk_tls(split, tmp_path) == (None, b"")  # never served
    pki = make_dev_pki(tmp_path / "certs")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    info = ServerInfo(
        1, "127.0.0.1", 9092, "127.0.0.1:9092", str(pki.ca_cert.parent), None
    )
    write_server_info(run_dir, info)
    tls, root = trunk_tls(split, run_dir)
    assert root == pki.ca_cert.read_bytes() and tls is not None
    srv = serve(tls=tls)
    with clients(srv.address, root_certificates=root).open(
        srv.service.spec, "dev-0", srv.grant("dev-0")
    ) as s:
        train_step(s, srv.body, seed=0)
    with raises_code(grpc.StatusCode.UNAVAILABLE):
        clients(srv.address).open(srv.service.spec, "dev-1", srv.grant("dev-1"))


def test_split_config_defaults_are_the_trunk_defaults() -> None:
    """``[split]`` documents the same quotas and pool as the trunk's classes."""
    from server.config import SplitSection
    from server.split_driver import trunk_limits, trunk_transport
    from server.trunk_transport import TrunkTransport

    assert trunk_limits(SplitSection()) == TrunkLimits()
    assert trunk_transport(SplitSection()) == TrunkTransport()
