"""SecAgg+ rounds in process: the server learns the mean, never an update.

Five virtual nodes on :class:`~simulation.inprocess.InProcessGrid` run
Flower's real ``secaggplus_mod`` in front of Pollinate's SecAgg+ handler
(:mod:`client.secagg_handler`), whose inner ``train.lora`` handler is a fake
that returns the received global adapter plus a known per-node change. The
server side is :func:`server.secure_aggregation.secure_exchange` and the pure
mapping back is :mod:`strategies.secure_mean`. No Ray, no model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)

import server.secure_aggregation as sa
from client.secagg_handler import (
    SecAggInnerError,
    secagg_train,
    secaggplus_mod,
)
from protocols import ByteLedger
from protocols.messages import (
    MESSAGE_TRAIN_LORA,
    SECURE_MEAN_LABEL,
    LocalTrainConfig,
    LoraTrainIns,
    LoraTrainRes,
    SecAggTask,
    SecureMean,
    decode_lora_train_ins,
    encode_lora_train_ins,
    encode_lora_train_res,
    put_secagg,
)
from protocols.run_folder import RunFolder
from protocols.specs import LoraSpec
from server.evaluation import EvalResult
from server.federation import RoundResult, run_rounds
from server.secure_aggregation import SecAggSettings, secure_exchange
from simulation.inprocess import InProcessGrid
from strategies import NodeBook
from strategies.secure_mean import (
    SecureMeanError,
    check_secure_mean,
    find_secure_mean,
    lora_update,
    secure_train_loss,
    seed_coefficients,
)
from tests.conftest import UnlimitedBudget

N = 5
SHAPES = {"a.lora_A.weight": (2, 6), "b.lora_B.weight": (5, 2)}
SPEC = LoraSpec(model="tiny-llama", rank=2, target_modules=("q_proj",))
CONFIG = LocalTrainConfig(
    server_round=1,
    local_steps=1,
    batch_size=1,
    seed=7,
    learning_rate=1e-3,
    weight_decay=0.0,
)
SETTINGS = SecAggSettings(num_shares=5, threshold=3, clip=4.0)
GLOBAL = {
    name: torch.linspace(-0.5, 0.5, int(np.prod(shape))).reshape(shape)
    for name, shape in SHAPES.items()
}


def _delta(partition: int) -> dict[str, torch.Tensor]:
    """Node ``partition``'s known change to the adapter."""
    gen = torch.Generator().manual_seed(100 + partition)
    return {
        name: torch.rand(shape, generator=gen) * 2 - 1 for name, shape in SHAPES.items()
    }


def _flat(tensors: dict[str, torch.Tensor]) -> np.ndarray:
    return torch.cat([t.flatten() for t in tensors.values()]).double().numpy()


def fake_lora(msg: Message, context: Context) -> Message:
    """A ``train.lora`` handler: returns global + this node's known change."""
    assert msg.metadata.message_type == MESSAGE_TRAIN_LORA
    assert RECORD_KEY_CONFIGS not in msg.content  # stripped for the method
    ins = decode_lora_train_ins(msg.content)
    part = int(context.node_config["partition-id"])
    adapter = {k: ins.adapter[k] + d for k, d in _delta(part).items()}
    res = LoraTrainRes(adapter=adapter, num_examples=10 + part, train_loss=1.0 + part)
    return Message(encode_lora_train_res(res), reply_to=msg)


def _app(drops: dict[int, str] | None = None, liar: int | None = None) -> ClientApp:
    """The SecAgg+ ClientApp; ``drops``: partition -> stage where it fails;
    ``liar``: a partition that claims weight 3 instead of the dictated one."""
    drops = drops or {}

    def drop_mod(msg: Message, ctx: Context, call_next: Any) -> Message:
        cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        part = int(ctx.node_config["partition-id"])
        if cfg is not None and drops.get(part) == cfg.get(Key.STAGE):
            raise RuntimeError(f"simulated dropout at {cfg.get(Key.STAGE)!r}")
        reply: Message = call_next(msg, ctx)
        return reply

    def liar_mod(msg: Message, ctx: Context, call_next: Any) -> Message:
        out: Message = call_next(msg, ctx)
        if int(ctx.node_config["partition-id"]) == liar:
            out.content.metric_records["fitres.num_examples"]["num_examples"] = 3
        return out

    app = ClientApp()
    app.train(mods=[drop_mod, secaggplus_mod, liar_mod])(
        secagg_train({"lora": fake_lora})
    )
    return app


class _SeeingGrid(InProcessGrid):
    """Records every reply the server's code receives."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[Message] = []

    def pull_messages(self, message_ids: Any) -> list[Message]:
        out = super().pull_messages(message_ids)
        self.seen.extend(out)
        return out


def _messages(grid: InProcessGrid) -> list[Message]:
    """One shared content for every node, as the drivers build them."""
    content = encode_lora_train_ins(LoraTrainIns(SPEC, CONFIG, GLOBAL))
    return [Message(content, node, MESSAGE_TRAIN_LORA) for node in grid.get_node_ids()]


def _label(node: int) -> str:
    return f"p{node - InProcessGrid.node_id(0)}"


def _weights(label: str) -> int:
    return 1 + int(label[1:])  # p0 -> 1 .. p4 -> 5


def _round(
    grid: InProcessGrid,
    weight_of: Callable[[str], int] | None = _weights,
    ledger: ByteLedger | None = None,
) -> SecureMean | None:
    exchange = secure_exchange(SETTINGS, weight_of)
    replies = exchange(
        grid,
        _messages(grid),
        30.0,
        server_round=1,
        label=_label,
        ledger=ledger if ledger is not None else ByteLedger(),
    )
    if not replies:
        return None
    assert [who for who, _ in replies] == [SECURE_MEAN_LABEL]
    return find_secure_mean(replies)


def _plain_mean(partitions: list[int]) -> tuple[np.ndarray, float]:
    """The plain weighted mean of ``partitions``' changes and the error bound
    ``n (2c/T) / sum_i (w_i / max_w)`` (max_w: the largest weight sampled)."""
    w = np.array([_weights(f"p{p}") for p in partitions], dtype=np.float64)
    x = np.stack([_flat(_delta(p)) for p in partitions])
    mean = (w[:, None] * x).sum(0) / w.sum()
    step = 2 * SETTINGS.clip / SETTINGS.quantization
    bound = len(partitions) * step / float((w / N).sum())
    return mean, bound


def test_secure_mean_equals_the_plain_weighted_mean(tmp_path: Path) -> None:
    """Breaks if SecAgg+ (or our flattening, weights or unflattening) changes
    the weighted mean beyond the quantization bound, or a stage's bytes are
    not in the ledger for every node both ways."""
    grid = InProcessGrid(_app(), num_nodes=N, run_dir=tmp_path)
    ledger = ByteLedger()
    result = _round(grid, ledger=ledger)
    assert result is not None
    assert result.survivors == tuple(f"p{p}" for p in range(N))
    assert result.weights == (1, 2, 3, 4, 5)
    plain, bound = _plain_mean(list(range(N)))
    err = float(np.max(np.abs(result.mean - plain)))
    assert err <= bound, (err, bound)
    assert err > 0  # quantized, not the plain values passed through
    check_secure_mean(result)  # total weight 15 read from the unmasked slot
    assert result.total_weight == pytest.approx(15.0, abs=N * result.weight_step)
    new = lora_update(GLOBAL, result)
    for name, t in new.items():
        start = 0 if name.startswith("a") else 12
        want = GLOBAL[name].double().numpy() + plain[start : start + t.numel()].reshape(
            t.shape
        )
        assert np.max(np.abs(t.double().numpy() - want)) <= bound + 1e-6
    # Clear metrics travel; the weighted loss uses the dictated weights.
    assert result.metrics["p2"]["train-loss"] == 3.0
    assert result.metrics["p2"]["num-examples"] == 12
    assert secure_train_loss(result) == pytest.approx(
        sum((1 + p) * (1.0 + p) for p in range(N)) / 15
    )
    channels = {e.channel for e in ledger}
    stages = {f"secagg.{s}" for s in Stage.all()}
    assert channels == stages
    for label in result.survivors:
        for stage in stages:
            for direction in ("up", "down"):
                assert any(
                    e.client == label
                    and e.channel == stage
                    and e.direction == direction
                    and e.nbytes > 0
                    for e in ledger
                ), (label, stage, direction)


def test_a_node_lost_at_collect_is_left_out(tmp_path: Path) -> None:
    """Breaks if a node lost after sharing its keys stays in the mean, or its
    neighbours' pairwise masks are not removed (the mean would be garbage)."""
    grid = InProcessGrid(_app({2: Stage.COLLECT_MASKED_VECTORS}), N, run_dir=tmp_path)
    result = _round(grid)
    assert result is not None
    assert result.survivors == ("p0", "p1", "p3", "p4")
    assert list(result.dropped) == ["p2"]
    assert "collect_masked_vectors" in result.dropped["p2"]
    assert "simulated dropout" in result.dropped["p2"]
    plain, bound = _plain_mean([0, 1, 3, 4])
    assert float(np.max(np.abs(result.mean - plain))) <= bound
    check_secure_mean(result)
    assert result.total_weight == pytest.approx(1 + 2 + 4 + 5, abs=1e-5)


def test_a_node_lost_at_share_keys_needs_the_workaround(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Breaks without ``_forget_early_dropouts``: in stock Flower 1.42 the
    lost node stays sampled, its neighbours hold no share of its key and the
    round halts (the second half checks exactly that)."""
    grid = InProcessGrid(_app({1: Stage.SHARE_KEYS}), N, run_dir=tmp_path)
    result = _round(grid)
    assert result is not None
    assert result.survivors == ("p0", "p2", "p3", "p4")
    plain, bound = _plain_mean([0, 2, 3, 4])
    assert float(np.max(np.abs(result.mean - plain))) <= bound

    monkeypatch.setattr(sa, "_forget_early_dropouts", lambda state: None)
    grid = InProcessGrid(_app({1: Stage.SHARE_KEYS}), N, run_dir=tmp_path)
    assert _round(grid) is None  # the protocol halted: no update this round


def test_the_server_never_holds_an_individual_update(tmp_path: Path) -> None:
    """Breaks if any reply reaching the server carries an ArrayRecord with
    data, or a masked vector resembles the node's quantized update."""
    grid = _SeeingGrid(_app(), num_nodes=N, run_dir=tmp_path)
    assert _round(grid) is not None
    assert len(grid.seen) == 4 * N  # four stages, every node answered
    masked = []
    for reply in grid.seen:
        assert not reply.has_error()
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
        cfg = reply.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in cfg:
            node = reply.metadata.src_node_id
            slots: Any = cfg[Key.MASKED_PARAMETERS]
            vec = bytes_to_ndarray(slots[1]).astype(np.float64)
            masked.append((node - InProcessGrid.node_id(0), vec))
    assert len(masked) == N
    modulus = float(SETTINGS.modulus)
    for part, vec in masked:
        w = _weights(f"p{part}") / N
        # What the node would send unmasked: its quantized weighted change.
        quantized = (w * _flat(_delta(part)) + SETTINGS.clip) * (
            SETTINGS.quantization / (2 * SETTINGS.clip)
        )
        assert np.median(np.abs(vec - quantized)) > modulus / 16
        assert 0.3 < vec.mean() / modulus < 0.7  # looks uniform mod 2^32


def test_a_claimed_weight_other_than_the_dictated_one_is_refused(
    tmp_path: Path,
) -> None:
    """Breaks if a node that reports another weight than the server dictated
    (here 3 for p0, dictated 1) gets its update into the global adapter."""
    grid = InProcessGrid(_app(liar=0), num_nodes=N, run_dir=tmp_path)
    result = _round(grid)
    assert result is not None
    assert result.total_weight == pytest.approx(17.0, abs=1e-4)  # 15 - 1 + 3
    with pytest.raises(SecureMeanError, match="total weight"):
        lora_update(GLOBAL, result)
    with pytest.raises(SecureMeanError, match="total weight"):
        seed_coefficients(result, num_seeds=result.mean.size, learning_rate=0.1)


def test_refusals_of_the_pure_mapping() -> None:
    """Breaks if a non-finite mean, a wrong length or an empty round passes,
    or FedKSeed's coefficients are not -lr * mean restricted to non-zeros."""
    ok = SecureMean(
        mean=np.array([0.0, 2.0, 0.0, -1.0]),
        total_weight=2.0,
        weight_step=1.0 / SETTINGS.quantization,
        survivors=("a", "b"),
        weights=(1, 1),
        metrics={},
    )
    idx, coef = seed_coefficients(ok, num_seeds=4, learning_rate=0.5)
    assert idx.dtype == torch.int32 and coef.dtype == torch.float32
    assert idx.tolist() == [1, 3] and coef.tolist() == [-1.0, 0.5]
    with pytest.raises(SecureMeanError, match="seeds"):
        seed_coefficients(ok, num_seeds=5, learning_rate=0.5)
    bad = SecureMean(**{**ok.__dict__, "mean": np.array([0.0, np.nan, 0.0, 1.0])})
    with pytest.raises(SecureMeanError, match="NaN"):
        check_secure_mean(bad)
    off = SecureMean(**{**ok.__dict__, "total_weight": 2.001})
    with pytest.raises(SecureMeanError, match="total weight"):
        check_secure_mean(off)
    with pytest.raises(SecureMeanError, match="layout needs"):
        lora_update(GLOBAL, ok)
    empty = SecureMean(**{**ok.__dict__, "survivors": (), "weights": ()})
    with pytest.raises(SecureMeanError, match="no node"):
        check_secure_mean(empty)


def test_an_inner_refusal_becomes_an_error(flower_identity: None) -> None:
    """Breaks if the SecAgg+ handler masks an update the method's handler
    refused (it must raise so that the node answers with an error)."""
    from flwr.app import Error

    def refuse(msg: Message, context: Context) -> Message:
        return Message(Error(code=4001, reason="bad spec"), reply_to=msg)

    content = put_secagg(
        encode_lora_train_ins(LoraTrainIns(SPEC, CONFIG, GLOBAL)),
        SecAggTask(action="lora", weight=1, clip=1.0),
    )
    msg = Message(content, 5, "train")
    context = Context(1, 5, {"partition-id": 0}, RecordDict(), {})
    with pytest.raises(SecAggInnerError, match="bad spec"):
        secagg_train({"lora": refuse})(msg, context)


class _SecureDriver:
    """A LoRA-shaped driver: configure sends the global adapter, apply takes
    the secure mean (what LoraFedAvg will do in 3 lines)."""

    method = "fake-secure-lora"
    strategy = UnlimitedBudget()

    def __init__(self) -> None:
        self.adapter = dict(GLOBAL)
        self.accepted: list[tuple[str, ...]] = []

    def configure(self, server_round: int, nodes: Any) -> list[Message]:
        return [
            Message(
                encode_lora_train_ins(LoraTrainIns(SPEC, CONFIG, self.adapter)),
                node,
                MESSAGE_TRAIN_LORA,
            )
            for node in sorted(nodes)
        ]

    def apply(self, server_round: int, replies: Any) -> RoundResult:
        secure = find_secure_mean(replies)
        assert secure is not None
        self.adapter = lora_update(self.adapter, secure)
        self.accepted.append(secure.survivors)
        return RoundResult(len(secure.survivors), 0, secure_train_loss(secure))

    def evaluate(self) -> EvalResult:
        return EvalResult(1.0, 0.5, "exact_match", 4)

    def checkpoint(
        self, folder: RunFolder, server_round: int, extra: dict[str, Any]
    ) -> None: ...

    def finish(self, folder: RunFolder) -> None: ...

    def close(self) -> None: ...

    def restore(self, folder: RunFolder) -> int:
        return 0


def test_run_rounds_with_the_secure_exchange(tmp_path: Path) -> None:
    """Breaks if the round loop's exchange seam does not carry a SecAgg+
    round end to end: two rounds, each moving the adapter by the mean change
    (equal weights), with every stage's bytes in the metrics rows."""
    grid = InProcessGrid(_app(), num_nodes=N, run_dir=tmp_path)
    nodes = NodeBook({n: _label(n) for n in grid.get_node_ids()})
    driver = _SecureDriver()
    ledger = ByteLedger()
    done = run_rounds(
        grid,
        driver,  # type: ignore[arg-type]
        nodes,
        rounds=2,
        folder=RunFolder(tmp_path / "run"),
        timeout_s=30.0,
        ledger=ledger,
        exchange=secure_exchange(SETTINGS),
    )
    assert done == 2
    assert driver.accepted == [tuple(f"p{p}" for p in range(N))] * 2
    plain = np.stack([_flat(_delta(p)) for p in range(N)]).mean(0)
    bound = N * 2 * SETTINGS.clip / SETTINGS.quantization  # equal weights
    moved = _flat(driver.adapter) - _flat(GLOBAL)
    assert np.max(np.abs(moved - 2 * plain)) <= 2 * bound + 1e-6
    up, down = ledger.round_totals(2)
    assert up > 0 and down > 0
    assert {e.channel for e in ledger if e.server_round == 2} == {
        f"secagg.{s}" for s in Stage.all()
    }


def test_a_fedkseed_reply_becomes_its_per_seed_sums(flower_identity: None) -> None:
    """Breaks if the SecAgg+ handler sends FedKSeed's per-step scalars other
    than as the K per-seed sums, loses the sync proof, or reports another
    weight than the dictated one."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import recorddict_to_fitres

    from protocols.messages import RoundSchedule
    from protocols.specs import ZOSpec
    from protocols.zo_messages import (
        ZoTrainIns,
        ZoTrainRes,
        encode_zo_train_ins,
        encode_zo_train_res,
    )

    spec = ZOSpec(model="tiny-llama", walk_fingerprint="w", generator="g", num_seeds=8)
    schedule = RoundSchedule(server_round=3, local_steps=4, batch_size=2, seed=1)
    indices = torch.tensor([1, 3, 3, 7], dtype=torch.int32)
    scalars = torch.tensor([0.5, -1.25, 2.0, 4.0], dtype=torch.float32)

    def fake_zo(msg: Message, context: Context) -> Message:
        res = ZoTrainRes(
            indices.numpy(), scalars.numpy(), 9, 2.5, 2, "h", skipped_steps=1
        )
        return Message(encode_zo_train_res(res), reply_to=msg)

    content = put_secagg(
        encode_zo_train_ins(ZoTrainIns(spec, schedule, 2, 2, "h", ())),
        SecAggTask(action="zo", weight=7, clip=16.0),
    )
    context = Context(1, 5, {"partition-id": 0}, RecordDict(), {})
    reply = secagg_train({"zo": fake_zo})(Message(content, 5, "train"), context)
    fitres = recorddict_to_fitres(reply.content, keep_input=True)
    (vector,) = parameters_to_ndarrays(fitres.parameters)
    assert vector.dtype == np.float32
    assert vector.tolist() == [0.0, 0.5, 0.0, 0.75, 0.0, 0.0, 0.0, 4.0]
    assert fitres.num_examples == 7
    assert fitres.metrics["synced-hash"] == "h"
    assert fitres.metrics["synced-round"] == 2
    assert fitres.metrics["num-examples"] == 9


def test_a_real_lora_round_under_secagg_matches_the_plain_round(
    tmp_path: Path,
) -> None:
    """The real ClientApp (client.app) and LoRA driver on tiny-llama, 5 nodes:
    the same round run plainly and under SecAgg+ (equal weights) gives the
    same new adapter within the quantization bound. Breaks if the SecAgg+
    ``train`` route, the LoRA delta layout, or the mapping back to the
    adapter's names is wrong anywhere (a wrong order moves values by far more
    than the bound)."""
    from client.app import build_client_app
    from protocols import TensorLayout, decode_lora_train_res
    from server.app import _eval_examples, build_driver
    from server.config import load_config
    from server.federation import discover_nodes, plain_exchange
    from simulation.prepare import prepare_run

    config = load_config(
        None,
        {
            "model.name": "tiny-llama",
            "run.rounds": 1,
            "run.seed": 3,
            "federation.clients": N,
            "train.local_steps": 1,
            "data.limit": 60,
            "data.eval_examples": 2,
            "eval.max_new_tokens": 2,
            "run.output_dir": str(tmp_path),
            "privacy.secagg": True,
        },
    )
    run_dir = prepare_run(config, tmp_path / "run")
    grid = InProcessGrid(build_client_app(), N, run_dir=run_dir)
    labels = discover_nodes(grid, expected=N, timeout_s=30.0, ledger=ByteLedger())
    nodes = NodeBook(labels)
    driver = build_driver(config, _eval_examples(RunFolder(run_dir)), run_dir)
    try:
        current = {k: t.clone() for k, t in driver.adapter.items()}  # type: ignore[attr-defined]
        layout = TensorLayout.of(current)
        plain = plain_exchange(
            grid,
            driver.configure(1, labels),
            30.0,
            server_round=1,
            label=nodes.label,
            ledger=ByteLedger(),
        )
        deltas = [
            _flat(decode_lora_train_res(m.content, expected=layout).adapter)
            - _flat(current)
            for _, m in plain
        ]
        assert len(deltas) == N
        exchange = secure_exchange(SecAggSettings.from_config(config.privacy))
        replies = exchange(
            grid,
            driver.configure(1, labels),
            30.0,
            server_round=1,
            label=nodes.label,
            ledger=ByteLedger(),
        )
    finally:
        driver.close()
    secure = find_secure_mean(replies)
    assert secure is not None and secure.survivors == tuple(sorted(labels.values()))
    new = lora_update(current, secure)
    plain_mean = np.mean(deltas, axis=0)
    assert np.max(np.abs(plain_mean)) > 1e-6  # training moved the adapter
    bound = N * 2 * config.privacy.secagg_clip / SETTINGS.quantization
    moved = _flat(new) - _flat(current)
    assert np.max(np.abs(moved - plain_mean)) <= bound + 1e-6
