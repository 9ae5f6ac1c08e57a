"""FedKSeed end to end without the engine: server driver and client handlers.

The server's :class:`~server.zo_driver.ZoDriver` and the real ClientApp
(``client.app.build_client_app``) exchange real Flower messages in-process, so
the bit-exactness of seed replay is checked on the very code paths a
deployment uses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from client.app import build_client_app
from client.runtime import ClientRuntime
from corpora import generate_tasks, write_jsonl
from protocols import ZOSpec, state_hash
from protocols.seeds import ParamWalk, gaussian, perturb_
from protocols.zo_messages import ZoTrainRes, decode_zo_train_res, encode_zo_train_res
from server.app import build_driver
from server.config import load_config
from server.federation import FederationError
from tests.conftest import fake_zo_spec

K = 32


class _Client:
    """One device process: a ClientApp with its own model cache."""

    def __init__(self) -> None:
        self.runtime = ClientRuntime()
        self.app = build_client_app(self.runtime)

    def train_zo(self, message: Message, context: Context) -> Message:
        return self.app(message, context)

    def zo_state(self):  # noqa: ANN201
        return next(iter(self.runtime._zo.values()))


def _nodes(ids: list[int]) -> dict[int, str]:
    return {n: f"n{n}" for n in ids}


def _labelled(replies: list[Message]) -> list[tuple[str, Message]]:
    return [(f"n{r.metadata.src_node_id}", r) for r in replies]


@pytest.fixture()
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flower_identity: None):
    """A FedKSeed server driver, three client contexts, a fresh client cache."""
    monkeypatch.setenv("POLLINATE_CACHE_DIR", str(tmp_path / "cache-a"))
    config = load_config(
        None,
        {
            "run.method": "fedkseed",
            "model.name": "tiny-llama",
            "model.max_length": 64,
            "zo.num_seeds": K,
            "zo.learning_rate": 1e-3,
            "zo.eps": 1e-3,
            "train.local_steps": 4,
            "train.batch_size": 2,
            "eval.max_new_tokens": 2,
        },
    )
    examples = generate_tasks(48, seed=1)
    driver = build_driver(config, examples[:4])
    contexts = {}
    for node in (1, 2, 3):
        path = tmp_path / f"node{node}.jsonl"
        write_jsonl(examples[node * 12 : node * 12 + 12], path)
        contexts[node] = Context(
            run_id=7,
            node_id=node,
            node_config={"data-path": str(path), "label": f"n{node}"},
            state=RecordDict(),
            run_config={},
        )
    return driver, contexts, _Client()


def _round(driver, contexts, client, server_round: int, alive: set[int]):  # noqa: ANN001, ANN202
    messages = driver.configure(server_round, _nodes(sorted(contexts)))
    replies = [
        client.train_zo(m, contexts[m.metadata.dst_node_id])
        for m in messages
        if m.metadata.dst_node_id in alive
    ]
    return replies, driver.apply(server_round, _labelled(replies))


def test_clients_and_server_stay_bit_identical_through_dropouts(cluster) -> None:  # noqa: ANN001
    """Over four rounds with nodes dropping out, every reply proves the client
    rebuilt exactly the server's model (same hash), so none is rejected.

    Breaks if replay is not bit-exact, a node's catch-up history is wrong, or
    the server's own update differs from what clients apply.
    """
    driver, contexts, client = cluster
    hashes = [driver.hash]
    for server_round, alive in enumerate([{1, 2}, {2}, {1, 2}, {1}], start=1):
        replies, result = _round(driver, contexts, client, server_round, alive)
        assert result.rejected == 0, [r.error.reason for r in replies if r.has_error()]
        assert result.clients == len(alive)
        assert result.extra["distinct_seeds"] > 0
        hashes.append(driver.hash)
    assert len(set(hashes)) == len(hashes), "some round did not change the model"


def test_a_late_joiner_replays_the_history_to_the_exact_global_model(
    cluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    """A node that never trained joins at round 4, starts from w0 in a fresh
    process (no snapshot) and reaches the server's model bit for bit.

    Breaks if the catch-up history is incomplete or replayed in another order.
    """
    driver, contexts, client = cluster
    for server_round in (1, 2, 3):
        _, result = _round(driver, contexts, client, server_round, {1, 2})
        assert result.rejected == 0
    monkeypatch.setenv("POLLINATE_CACHE_DIR", str(tmp_path / "cache-fresh"))
    fresh = _Client()  # a fresh device process
    (message,) = [
        m for m in driver.configure(4, _nodes([3])) if m.metadata.dst_node_id == 3
    ]
    reply = fresh.train_zo(message, contexts[3])
    assert not reply.has_error(), reply.error.reason
    res = decode_zo_train_res(reply.content, num_seeds=K, max_steps=4)
    assert (res.synced_round, res.synced_hash) == (3, driver.hash)
    state = fresh.zo_state()
    assert all(
        torch.equal(a, b)
        for (_, a), (_, b) in zip(state.params, driver.params, strict=True)
    )


def test_spec_mismatches_are_refused_and_change_nothing(cluster) -> None:  # noqa: ANN001
    """A tampered spec, another parameter walk or another generator version
    gets an error reply naming the problem, and the node's state is untouched."""
    driver, contexts, client = cluster
    message = driver.configure(1, _nodes([1]))[0]
    content = message.content
    content["spec"]["eps"] = 0.5  # fingerprint no longer matches
    reply = client.train_zo(message, contexts[1])
    assert reply.has_error() and "fingerprint" in reply.error.reason

    for field, value, expect in (
        ("walk_fingerprint", "0" * 16, "parameter walk"),
        ("generator", "xorshift/9", "generator"),
    ):
        spec = ZOSpec(**{**_spec_fields(driver.spec), field: value})
        fresh = driver.configure(1, _nodes([1]))[0]
        fresh.content["spec"] = spec.to_config_record()
        cached = dict(client.runtime._zo)
        reply = client.train_zo(fresh, contexts[1])
        assert reply.has_error() and expect in reply.error.reason, reply.error.reason
        assert client.runtime._zo == cached


def _spec_fields(spec: ZOSpec) -> dict[str, object]:
    import dataclasses

    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


def _forged(
    reply: Message, *, index: int | None = None, scalar: float | None = None
) -> Message:
    res = decode_zo_train_res(reply.content, num_seeds=K, max_steps=4)
    idx, g = res.indices.copy(), res.scalars.copy()
    if index is not None:
        idx[0] = index
    if scalar is not None:
        g[0] = scalar
    forged = ZoTrainRes(
        idx, g, res.num_examples, res.train_loss, res.synced_round, res.synced_hash
    )
    content = encode_zo_train_res(forged)  # the encoder does not police values
    return Message(content, reply_to=_Reply.of(reply))


class _Reply:
    @staticmethod
    def of(reply: Message) -> Message:
        return Message(
            RecordDict(),
            dst_node_id=reply.metadata.src_node_id,
            message_type="train.zo",
        )


def test_bad_scalars_are_rejected_without_touching_the_global_model(cluster) -> None:  # noqa: ANN001
    """An out-of-pool seed index or a NaN scalar gets the reply dropped with a
    reason; with no good reply the round fails and the model, its hash and
    the seed history are unchanged."""
    driver, contexts, client = cluster
    messages = driver.configure(1, _nodes([1, 2]))
    good = [client.train_zo(m, contexts[m.metadata.dst_node_id]) for m in messages]
    before = (
        driver.hash,
        [p.clone() for _, p in driver.params],
        len(driver.strategy.history),
    )
    bad = [_forged(good[0], index=K), _forged(good[1], scalar=float("nan"))]
    with pytest.raises(FederationError) as info:
        driver.apply(1, _labelled(bad))
    assert "outside the pool" in str(info.value) and "NaN" in str(info.value)
    assert driver.hash == before[0] == state_hash(driver.params)
    assert all(
        torch.equal(a, b) for (_, a), b in zip(driver.params, before[1], strict=True)
    )
    assert len(driver.strategy.history) == before[2]
    result = driver.apply(1, _labelled([good[0], _forged(good[1], index=-1)]))
    assert result.clients == 1 and result.rejected == 1


def test_zo_estimate_matches_the_true_gradient_in_expectation() -> None:
    """On f(w) = 0.5 * sum(a * w^2) the mean of g * z over many pool seeds
    points along the true gradient a * w (cosine > 0.99) with the right scale.

    Breaks if z is not zero-mean unit-variance, or perturb_ scales wrongly.
    """
    d, n, eps = 16, 6000, 1e-3
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(d, generator=gen) + 0.5
    w = torch.randn(d, generator=gen)
    params = [("w", w)]
    true = a * w
    estimate = torch.zeros(d, dtype=torch.float64)
    for seed in range(n):
        perturb_(params, seed, eps)
        f_plus = float(0.5 * (a * w * w).sum())
        perturb_(params, seed, -2 * eps)
        f_minus = float(0.5 * (a * w * w).sum())
        perturb_(params, seed, eps)
        g = (f_plus - f_minus) / (2 * eps)
        estimate += g * gaussian(seed, "w", d).double()
    estimate /= n
    cos = torch.nn.functional.cosine_similarity(estimate, true.double(), dim=0)
    assert cos > 0.99, cos
    assert float(estimate.norm() / true.norm()) == pytest.approx(1.0, abs=0.1)


def test_the_walk_restricts_perturbation_to_the_named_parameters() -> None:
    """Only parameters matching ``include`` move; the rest stay bit-identical."""
    from models import load_causal_lm

    model = load_causal_lm("tiny-llama").model
    before = {n: p.clone() for n, p in model.named_parameters()}
    walk = ParamWalk.from_model(model, ["model.layers.1.*"])
    perturb_(walk.params(model), seed=3, scale=0.1)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith("model.layers.1.") for n in moved)


def test_a_history_with_an_out_of_pool_seed_is_refused_by_the_client(cluster) -> None:  # noqa: ANN001
    """A catch-up history naming seed index K is refused before any replay,
    and the node's model is left exactly as it was."""
    from protocols import decode_tensors, encode_tensors

    driver, contexts, client = cluster
    _, result = _round(driver, contexts, client, 1, {1})
    assert result.rejected == 0
    state = client.zo_state()
    before = state_hash(state.params)
    (message,) = [
        m for m in driver.configure(2, _nodes([2])) if m.metadata.dst_node_id == 2
    ]
    history = decode_tensors(message.content["history"])
    history["indices"][0] = K
    message.content["history"] = encode_tensors(history)
    reply = client.train_zo(message, contexts[2])
    assert reply.has_error() and "outside the pool" in reply.error.reason
    assert state_hash(state.params) == before


def test_every_setting_travels_once(cluster) -> None:  # noqa: ANN001
    """The learning rate of a train.zo instruction is in its spec only: the
    round schedule carries steps, batch, seed and round, so the two can never
    disagree."""
    driver, _, _ = cluster
    (message,) = driver.configure(1, _nodes([1]))
    schedule = dict(message.content["train"])
    assert set(schedule) == {"server-round", "local-steps", "batch-size", "seed"}
    assert message.content["spec"]["learning_rate"] == driver.spec.learning_rate


def test_runs_of_one_spec_in_one_process_keep_their_own_snapshot_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs with the same run id and spec in one process (in-process
    tests and benchmarks: every InProcessGrid run is run 1) get separate
    seed-synced states, each under its own run folder's scratch space.

    Breaks if the cache key leaves the folder out: the second run's node
    then reads snapshots from the first run's folder, deleted by then, and
    fails out of sync (seen in the robustness benchmark).
    """
    import client.runtime as runtime

    made: list[Path] = []

    class _State:
        def __init__(self, spec: ZOSpec, device: torch.device, folder: Path) -> None:
            made.append(folder)

    monkeypatch.setattr(runtime, "ZoModelState", _State)
    rt = ClientRuntime()
    spec = fake_zo_spec(8, 1e-4)
    first = rt.zo_state(spec, torch.device("cpu"), 1, tmp_path / "a")
    again = rt.zo_state(spec, torch.device("cpu"), 1, tmp_path / "a")
    other = rt.zo_state(spec, torch.device("cpu"), 1, tmp_path / "b")
    assert first is again and other is not first
    assert [p.parent for p in made] == [tmp_path / "a", tmp_path / "b"]
