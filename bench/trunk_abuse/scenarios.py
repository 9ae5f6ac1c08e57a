"""The abuse scenarios against a real SmolLM2-135M trunk (see the package doc).

Everything runs in this process: the trunk service on 127.0.0.1 and the
attacking and honest clients over real gRPC. The service's clock is the
monotonic clock plus an offset the scenarios advance, so deadlines pass
without waiting.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bench.harness import rss_mib

MiB = 1 << 20
LABELS = ("dev-0", "dev-1", "dev-2", "dev-3", "device")
TOKENS = 96  # model.max_length of the recorded results (the default before "auto")


@dataclass
class Trunk:
    """The running service and what the scenarios need to reach it."""

    service: Any
    server: Any
    spec: Any
    address: str
    offset: list[float]
    grants: dict[str, bytes] = field(default_factory=dict)
    round: int = 0

    def next_round(self) -> None:
        """End the current round (closing its sessions) and grant the next."""
        if self.round:
            self.service.end_round(self.round)
        self.round += 1
        self.grants = self.service.grant_round(self.round, LABELS)

    def frame(self, batch: int, train: bool = True) -> tuple[Any, Any]:
        """Activations and mask of a (batch, P + TOKENS) frame."""
        import torch

        length = self.spec.num_prompts + TOKENS
        hidden = torch.randn(batch, length, self.spec.hidden_size) * 0.1
        return hidden, torch.ones(batch, length, dtype=torch.int64)


class Sampler:
    """Peak VmRSS and reserved bytes, sampled every 10 ms on a thread."""

    def __init__(self, reserved: Callable[[], int]) -> None:
        self._reserved = reserved
        self._stop = threading.Event()
        self.peak_rss = rss_mib()
        self.peak_reserved = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_rss = max(self.peak_rss, rss_mib())
            self.peak_reserved = max(self.peak_reserved, self._reserved())

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def start_trunk(limits: Any) -> Trunk:
    """Load SmolLM2-135M, cut it, serve its trunk on a free port."""
    import torch

    from models import load_causal_lm
    from models.split import build_split, split_spec_for
    from server.trunk_service import TrunkService, start_trunk_server

    torch.manual_seed(0)  # the bench's own frames; library code takes generators
    model = load_causal_lm("smollm2-135m", dtype="float32", device="cpu").model
    spec = split_spec_for(
        model, "smollm2-135m", num_prompts=8, client_blocks=0, max_length=TOKENS
    )
    _, body, _ = build_split(model, spec)
    offset = [0.0]
    service = TrunkService(
        body, spec, limits=limits, clock=lambda: time.monotonic() + offset[0]
    )
    server, port = start_trunk_server(service)
    return Trunk(service, server, spec, f"127.0.0.1:{port}", offset)


def measured_per_token(trunk: Trunk, batch: int) -> float:
    """Bytes autograd keeps per position for a (batch, P + TOKENS) frame."""
    import torch

    body = trunk.service.body
    weights = {p.untyped_storage().data_ptr() for p in body.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            seen[st.data_ptr()] = st.nbytes()
        return t

    hidden, mask = trunk.frame(batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = body.forward(hidden.requires_grad_(), mask)
    total = sum(seen.values()) + 2 * out.numel() * out.element_size()
    return total / (batch * hidden.shape[1])


def _code(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    code = code() if callable(code) else code
    return getattr(code, "name", type(exc).__name__)


def _train_step(trunk: Trunk, label: str) -> float:
    """Open, one training step, close; returns the seconds it took."""
    from client.trunk_client import TrunkClient

    t0 = time.monotonic()
    with (
        TrunkClient(trunk.address, timeout_s=120.0) as c,
        c.open(trunk.spec, label, trunk.grants[label]) as s,
    ):
        hidden, mask = trunk.frame(2)
        out = s.forward(hidden, mask, train=True)
        s.backward(out * 0.01)
    return time.monotonic() - t0


def opens(trunk: Trunk, refused: Counter[str]) -> str:
    """256 Opens without a valid grant, then an honest device."""
    import secrets

    from client.trunk_client import TrunkClient, TrunkError

    with TrunkClient(trunk.address, timeout_s=30.0) as c:
        for i in range(256):
            try:
                c.open(trunk.spec, LABELS[i % 4], secrets.token_bytes(32))
            except TrunkError as exc:
                refused[_code(exc)] += 1
    return f"trained a step in {_train_step(trunk, 'device'):.1f} s"


def pending(trunk: Trunk, refused: Counter[str]) -> str:
    """Maximal frames, then the largest admitted ones, never a Backward."""
    from client.trunk_client import TrunkClient, TrunkError

    lim = trunk.service.limits
    length = trunk.spec.num_prompts + TOKENS
    per_row = length * trunk.spec.hidden_size * 4
    maximal = (trunk.service.max_message_bytes - MiB) // per_row
    admitted = lim.node_memory_bytes // trunk.service.cost.bytes(1, length)
    with TrunkClient(trunk.address, timeout_s=600.0) as c:
        sessions = [
            c.open(trunk.spec, label, trunk.grants[label]) for label in LABELS[:4]
        ]
        for s in sessions:
            for batch in (maximal, admitted):
                try:
                    s.forward(*trunk.frame(batch), train=True)
                except TrunkError as exc:
                    refused[_code(exc)] += 1
        try:
            _train_step(trunk, "device")
            during = "served while full"
        except TrunkError as exc:
            refused[_code(exc)] += 1
            during = f"{_code(exc)} while the budget was full"
        trunk.offset[0] += lim.pending_timeout_s + 1
        trunk.service.sweep()
        freed = trunk.service.sessions.budget.used() == 0
        took = _train_step(trunk, "device")
    return (
        f"{during}; graphs freed by the pending deadline: {freed}; "
        f"then trained a step in {took:.1f} s"
    )


def keepalive(trunk: Trunk, refused: Counter[str]) -> str:
    """Refused calls every 5 (fake) seconds must not keep a session alive."""
    from client.trunk_client import TrunkClient, TrunkError

    lim = trunk.service.limits
    with TrunkClient(trunk.address, timeout_s=60.0) as c:
        s = c.open(trunk.spec, "dev-0", trunk.grants["dev-0"])
        s.forward(*trunk.frame(1), train=False)
        hidden, _ = trunk.frame(1)
        waited = 0.0
        while waited <= lim.idle_timeout_s + 10:
            trunk.offset[0] += 5.0
            waited += 5.0
            try:
                s.backward(hidden)  # nothing is pending: always refused
            except TrunkError as exc:
                refused[_code(exc)] += 1
                if _code(exc) == "NOT_FOUND":
                    return f"session expired {waited:.0f} s after its last success"
    return "session still alive"


def names(trunk: Trunk, refused: Counter[str]) -> str:
    """Five Opens whose node label is 40 MB."""
    from client.trunk_client import TrunkClient, TrunkError

    with TrunkClient(trunk.address, timeout_s=60.0) as c:
        for _ in range(5):
            try:
                c.open(trunk.spec, "x" * 40_000_000, trunk.grants["dev-0"])
            except TrunkError as exc:
                refused[_code(exc)] += 1
    return f"trained a step in {_train_step(trunk, 'device'):.1f} s"


def stalled(trunk: Trunk, refused: Counter[str]) -> str:
    """One connection with 8 streams whose request never completes."""
    import grpc

    release = threading.Event()

    def never() -> Iterator[bytes]:
        release.wait(120)
        return
        yield b""

    attacker = grpc.insecure_channel(
        trunk.address, options=[("grpc.use_local_subchannel_pool", 1)]
    )
    stall = attacker.stream_unary(
        "/pollinate.split.v1.SplitTrunk/Open",
        request_serializer=None,
        response_deserializer=None,
    )
    calls = [stall.future(never(), timeout=120) for _ in range(8)]
    try:
        took = _train_step(trunk, "device")
    finally:
        release.set()
        for f in calls:
            f.cancel()
        attacker.close()
    del refused
    return f"trained a step in {took:.1f} s while 8 streams stalled"


SCENARIOS: dict[str, tuple[str, Callable[[Trunk, Counter[str]], str], int]] = {
    # name: (what the attacker does, scenario, request bytes in flight at once)
    "opens": ("256 Opens without a grant", opens, 0),
    "pending": (
        "4 nodes: a 64 MB frame, then the largest admitted one, no Backward",
        pending,
        3 * 64 * MiB,
    ),
    "keepalive": ("refused calls every 5 s past the idle deadline", keepalive, 0),
    "names": ("5 Opens with a 40 MB node label", names, 3 * 40 * MiB),
    "stalled": ("1 connection, 8 stalled HTTP/2 streams", stalled, 0),
}


def run_scenario(trunk: Trunk, name: str) -> dict[str, Any]:
    """Run one scenario in a fresh round; its memory and verdict."""
    import gc

    attack, scenario, in_flight = SCENARIOS[name]
    trunk.next_round()
    gc.collect()
    base = rss_mib()
    refused: Counter[str] = Counter()
    budget = trunk.service.sessions.budget
    with Sampler(budget.used) as sampler:
        device = scenario(trunk, refused)
    gc.collect()
    peak = sampler.peak_rss - base
    allowed = (budget.total_bytes + in_flight) / MiB
    ok = peak <= allowed and "alive" not in device and "FAIL" not in device
    return {
        "name": name,
        "attack": attack,
        "refused": dict(refused),
        "baseline_rss_mib": base,
        "peak_rss_mib": peak,
        "allowed_mib": allowed,
        "peak_reserved_mib": sampler.peak_reserved / MiB,
        "after_rss_mib": rss_mib() - base,
        "after_reserved_mib": budget.used() / MiB,
        "device": device,
        "passed": bool(ok),
    }
