"""Per-client LoRA ranks: spec, wire, hello, client handler, config, simulation.

The global rank ``LoraSpec.rank`` is r_max; ``client_ranks`` lists the ranks
clients may train. A node says its rank at hello (node config ``lora-rank``),
the server refuses a rank the spec does not allow, an instruction names the
rank the node trains (its adapter has that rank), and the client builds its
model at that rank with the same alpha. Tiny models only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
from flwr.app import Context, Message, RecordDict

import models
from client.app import build_client_app
from client.node import NodeConfigError, NodeSettings
from corpora import generate_tasks, write_jsonl
from protocols import (
    MESSAGE_HELLO,
    MESSAGE_TRAIN_LORA,
    ByteLedger,
    LocalTrainConfig,
    LoraSpec,
    LoraTrainIns,
    NodeHello,
    ProtocolError,
    decode_hello,
    decode_lora_train_ins,
    decode_lora_train_res,
    encode_hello,
    encode_lora_train_ins,
)
from protocols.messages import ERROR_BAD_INSTRUCTION
from protocols.run_folder import RunFolder, RunFolderError
from protocols.specs import LORA_AGGREGATIONS, lora_rank_problem
from server.config import (
    ConfigError,
    LoraSection,
    load_config,
    simulated_lora_ranks,
)
from server.discovery import hello_rank
from server.federation import FederationError, discover_nodes
from simulation.inprocess import InProcessGrid
from simulation.prepare import prepare_run
from strategies.lora_factors import client_adapter, effective_delta
from strategies.lora_rules import RULES

MIXED = LoraSpec(
    model="tiny-llama", max_length=64, client_ranks=(4, 8), aggregation="hetlora"
)
CONFIG = LocalTrainConfig(
    server_round=1,
    local_steps=2,
    batch_size=4,
    learning_rate=1e-3,
    weight_decay=0.0,
    seed=0,
)
_APP = build_client_app()


def _fake_adapter(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return {
        "m.q_proj.lora_A.weight": torch.randn(rank, 6, generator=g),
        "m.q_proj.lora_B.weight": torch.randn(5, rank, generator=g),
    }


# -- spec -------------------------------------------------------------------------


def test_default_spec_keeps_its_old_record_and_fingerprint() -> None:
    """At their defaults the late fields are not on the wire and do not move
    the fingerprint: these are the values the spec had before them."""
    spec = LoraSpec(model="m")
    assert spec.fingerprint() == "ef84af179c46916c"
    record = spec.to_config_record()
    assert "client_ranks" not in record and "aggregation" not in record
    assert LoraSpec.from_config_record(record) == spec
    assert spec.allowed_ranks() == (8,)


def test_rank_fields_travel_and_change_the_fingerprint() -> None:
    record = MIXED.to_config_record()
    assert list(record["client_ranks"]) == [4, 8]
    assert record["aggregation"] == "hetlora"
    assert LoraSpec.from_config_record(record) == MIXED
    assert (
        MIXED.fingerprint() != LoraSpec(model="tiny-llama", max_length=64).fingerprint()
    )
    assert MIXED.allowed_ranks() == (4, 8)


def test_aggregation_names_are_the_rules() -> None:
    """protocols cannot import strategies: its copy of the names must match."""
    assert LORA_AGGREGATIONS == RULES
    annotation = LoraSection.model_fields["aggregation"].annotation
    assert get_args(annotation) == RULES


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"client_ranks": (8, 4), "aggregation": "hetlora"}, "sorted and distinct"),
        ({"client_ranks": (4, 4), "aggregation": "hetlora"}, "sorted and distinct"),
        ({"client_ranks": (4, 16), "aggregation": "hetlora"}, "[16] must each be in"),
        ({"client_ranks": (0,), "aggregation": "flexlora"}, "[0] must each be in"),
        ({"client_ranks": (4, 8)}, "mixed ranks need 'hetlora' or 'flexlora'"),
        ({"client_ranks": (4,), "aggregation": "ffa"}, "'ffa' needs every client"),
        ({"aggregation": "mean"}, "is not one of"),
    ],
)
def test_bad_rank_settings_are_refused(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ProtocolError) as info:
        LoraSpec(model="m", **kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_same_rank_rules_accept_the_global_rank_alone() -> None:
    for rule in ("fedavg", "exact", "ffa"):
        assert lora_rank_problem(8, (), rule) is None
        assert lora_rank_problem(8, (8,), rule) is None


def test_at_rank_keeps_alpha_and_so_the_update() -> None:
    """A rank-4 client's spec has the same alpha; the truncated global adapter
    it starts from has the same (alpha / r) B A on its kept components."""
    spec4 = MIXED.at_rank(4)
    assert (spec4.rank, spec4.alpha, spec4.client_ranks) == (4, MIXED.alpha, ())
    with pytest.raises(ProtocolError, match=r"rank 2 is not one of .*\[4, 8\]"):
        MIXED.at_rank(2)
    a8 = torch.zeros(8, 6)
    a8[:4] = torch.randn(4, 6)  # components 4..7 are zero: truncation loses nothing
    b8 = torch.randn(5, 8)
    full = {"m.q.lora_A.weight": a8, "m.q.lora_B.weight": b8}
    small = client_adapter(full, 8, 4)
    d8 = effective_delta(full, 8, MIXED.alpha)["m.q"]
    d4 = effective_delta(small, 4, spec4.alpha)["m.q"]
    torch.testing.assert_close(d4, d8)
    by_hand = (
        (spec4.alpha / 4) * small["m.q.lora_B.weight"] @ small["m.q.lora_A.weight"]
    )
    torch.testing.assert_close(by_hand, (MIXED.alpha / 8) * b8 @ a8)


# -- train.lora on the wire --------------------------------------------------------


def test_client_rank_round_trips_and_is_absent_at_the_global_rank() -> None:
    ins = LoraTrainIns(MIXED, CONFIG, _fake_adapter(4), client_rank=4)
    content = encode_lora_train_ins(ins)
    assert "lora-rank" in content
    back = decode_lora_train_ins(content)
    assert back.client_rank == 4
    assert back.adapter["m.q_proj.lora_A.weight"].shape == (4, 6)
    same = encode_lora_train_ins(LoraTrainIns(MIXED, CONFIG, _fake_adapter(8)))
    assert set(same) == {"spec", "train", "adapter"}  # as before per-client ranks
    assert decode_lora_train_ins(same).client_rank == 8


def test_a_rank_the_spec_does_not_allow_is_refused() -> None:
    content = encode_lora_train_ins(
        LoraTrainIns(MIXED, CONFIG, _fake_adapter(4), client_rank=4)
    )
    content["lora-rank"]["rank"] = 3
    with pytest.raises(
        ProtocolError, match=r"3 is not one of .*allowed ranks \[4, 8\]"
    ):
        decode_lora_train_ins(content)
    with pytest.raises(ProtocolError):
        LoraTrainIns(MIXED, CONFIG, _fake_adapter(2), client_rank=2)


@pytest.mark.parametrize("wrong", ["m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"])
def test_an_adapter_of_another_rank_is_refused_naming_the_tensor(wrong: str) -> None:
    adapter = _fake_adapter(4)
    adapter[wrong] = _fake_adapter(8)[wrong]
    content = encode_lora_train_ins(LoraTrainIns(MIXED, CONFIG, adapter, client_rank=4))
    with pytest.raises(ProtocolError) as info:
        decode_lora_train_ins(content)
    assert wrong in str(info.value) and "not rank 4" in str(info.value)


# -- hello ---------------------------------------------------------------------------


def test_hello_rank_round_trips_and_is_absent_when_unset() -> None:
    content = encode_hello(NodeHello("site-a", 3, lora_rank=4))
    assert decode_hello(content).lora_rank == 4
    plain = encode_hello(NodeHello("site-a", 3))
    assert "lora-rank" not in plain["hello"]
    assert decode_hello(plain).lora_rank is None


@pytest.mark.parametrize("rank", [0, -2, 4097])
def test_hello_rank_out_of_bounds_is_refused(rank: int) -> None:
    content = encode_hello(NodeHello("site-a", 3, lora_rank=4))
    content["hello"]["lora-rank"] = rank
    with pytest.raises(ProtocolError, match="'lora-rank' must be in 1..4096"):
        decode_hello(content)


def test_server_assigns_ranks_and_refuses_one_it_does_not_allow() -> None:
    assert hello_rank(NodeHello("a", 1, lora_rank=4), MIXED) == 4
    assert hello_rank(NodeHello("b", 1), MIXED) == 8  # no rank said: the global one
    with pytest.raises(FederationError) as info:
        hello_rank(NodeHello("c", 1, lora_rank=2), MIXED)
    assert str(info.value) == (
        "label 'c' reports LoRA rank 2, not one of the run's ranks [4, 8] "
        "(pollinate client join --lora-rank N)"
    )
    only4 = LoraSpec(model="m", client_ranks=(4,), aggregation="hetlora")
    with pytest.raises(FederationError, match="'d' reports no rank, so LoRA rank 8"):
        hello_rank(NodeHello("d", 1), only4)


def test_discovery_keeps_each_label_rank_and_refuses_a_bad_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, flower_identity: None
) -> None:
    """Three nodes through the real ClientApp: alice says 4, bob 2 (refused,
    logged on one line naming label, rank and the allowed ranks), carol
    nothing (the global rank 8)."""
    data = tmp_path / "d.jsonl"
    write_jsonl(generate_tasks(4, seed=0), data)
    grid = InProcessGrid(_APP, 3)
    ids = [InProcessGrid.node_id(n) for n in range(3)]
    for node, label, rank in zip(
        ids, ["alice", "bob", "carol"], [4, 2, None], strict=True
    ):
        cfg: dict[str, Any] = {"data-path": str(data), "label": label}
        if rank is not None:
            cfg["lora-rank"] = rank
        grid.context(node).node_config = cfg
    ranks: dict[str, int] = {}
    with caplog.at_level(logging.WARNING):
        labels = discover_nodes(
            grid,
            expected=2,
            timeout_s=30.0,
            ledger=ByteLedger(),
            lora=MIXED,
            ranks=ranks,
        )
    assert sorted(labels.values()) == ["alice", "carol"]
    assert ranks == {"alice": 4, "carol": 8}
    assert [r.getMessage() for r in caplog.records if "left out" in r.getMessage()] == [
        f"node {ids[1]} left out: label 'bob' reports LoRA rank 2, not one of "
        "the run's ranks [4, 8] (pollinate client join --lora-rank N)"
    ]


# -- the client trains its own rank ----------------------------------------------------


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("node") / "client.jsonl"
    write_jsonl(generate_tasks(12, seed=3), path)
    return path


@pytest.fixture(scope="module")
def global8() -> dict[str, torch.Tensor]:
    loaded = models.load_causal_lm("tiny-llama")
    return models.adapter_tensors(models.attach_lora(loaded.model, MIXED, init_seed=1))


def _context(node_config: dict[str, Any]) -> Context:
    return Context(
        run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={}
    )


def _train_msg(adapter: dict[str, torch.Tensor], rank: int) -> Message:
    content = encode_lora_train_ins(
        LoraTrainIns(MIXED, CONFIG, adapter, client_rank=rank)
    )
    return Message(content, dst_node_id=5, message_type=MESSAGE_TRAIN_LORA)


def test_a_node_trains_the_rank_it_is_told(
    flower_identity: None, data_file: Path, global8: dict[str, torch.Tensor]
) -> None:
    """Spec rank 8, node rank 4: the reply is a trained rank-4 adapter (every
    A has 4 rows, every B 4 columns, with the rank-4 model's layout); the same
    process then trains rank 8 for a node without a rank."""
    start = client_adapter(global8, 8, 4)
    reply = _APP(
        _train_msg(start, 4), _context({"data-path": str(data_file), "lora-rank": 4})
    )
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    loaded = models.load_causal_lm("tiny-llama")
    layout4 = models.adapter_layout(models.attach_lora(loaded.model, MIXED.at_rank(4)))
    res = decode_lora_train_res(reply.content, expected=layout4)
    for name, tensor in res.adapter.items():
        assert tensor.shape[0 if ".lora_A." in name else 1] == 4
    assert any(not torch.equal(res.adapter[k], start[k]) for k in start)
    reply8 = _APP(_train_msg(global8, 8), _context({"data-path": str(data_file)}))
    assert not reply8.has_error(), reply8.error.reason if reply8.has_error() else ""
    loaded = models.load_causal_lm("tiny-llama")
    layout8 = models.adapter_layout(models.attach_lora(loaded.model, MIXED))
    decode_lora_train_res(reply8.content, expected=layout8)


def test_a_node_refuses_another_rank_than_its_own(
    flower_identity: None, data_file: Path, global8: dict[str, torch.Tensor]
) -> None:
    reply = _APP(
        _train_msg(client_adapter(global8, 8, 4), 4),
        _context({"data-path": str(data_file), "lora-rank": 8}),
    )
    assert reply.has_error() and reply.error.code == ERROR_BAD_INSTRUCTION
    assert reply.error.reason.endswith(
        "the instruction says LoRA rank 4, but this node trains rank 8 "
        "(node config 'lora-rank')"
    )


def test_a_node_reports_its_rank_at_hello(
    flower_identity: None, data_file: Path
) -> None:
    msg = Message(RecordDict(), dst_node_id=5, message_type=MESSAGE_HELLO)
    reply = _APP(msg, _context({"data-path": str(data_file), "lora-rank": 4}))
    assert decode_hello(reply.content).lora_rank == 4


@pytest.mark.parametrize("value", [0, "four", 4.5, 5000])
def test_node_config_lora_rank_is_checked(data_file: Path, value: object) -> None:
    with pytest.raises(NodeConfigError, match="node config 'lora-rank' is"):
        NodeSettings.from_context(
            _context({"data-path": str(data_file), "lora-rank": value})
        )


# -- config and simulation ------------------------------------------------------------


def _config(tmp_path: Path, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "model.name": "tiny-llama",
        "run.rounds": 1,
        "federation.clients": 5,
        "data.limit": 60,
        "data.eval_examples": 4,
        "run.output_dir": str(tmp_path),
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, values)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"lora__client_ranks": [2, 8]}, "mixed ranks need 'hetlora' or 'flexlora'"),
        (
            {"lora__client_ranks": [2, 16], "lora__aggregation": "hetlora"},
            "must each be in 1..lora.rank",
        ),
        (
            {
                "lora__client_ranks": [2, 8],
                "lora__aggregation": "hetlora",
                "federation__lora_ranks": [2, 4],
            },
            "federation.lora_ranks [4] are not allowed",
        ),
        ({"federation__lora_ranks": [4]}, "federation.lora_ranks [4] are not allowed"),
        ({"federation__lora_ranks": [8] * 6}, "6 ranks for 5 clients"),
        (
            {"run__method": "fedkseed", "federation__lora_ranks": [8]},
            "per-client ranks are for lora",
        ),
        ({"lora__aggregation": "mean"}, "aggregation"),
    ],
)
def test_config_refuses_ranks_that_cannot_work(
    tmp_path: Path, overrides: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, **overrides)
    assert needle in str(info.value)


def test_simulated_ranks_cycle_over_clients(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        lora__client_ranks=[2, 4, 8],
        lora__aggregation="flexlora",
        federation__lora_ranks=[2, 4],
    )
    assert simulated_lora_ranks(config) == (2, 4, 2, 4, 2)
    assert simulated_lora_ranks(_config(tmp_path)) == ()
    lacking = _config(tmp_path, lora__client_ranks=[2, 4], lora__aggregation="hetlora")
    with pytest.raises(ConfigError, match="give federation.lora_ranks"):
        simulated_lora_ranks(lacking)


def test_simulation_gives_node_k_the_kth_rank(
    tmp_path: Path, flower_identity: None
) -> None:
    """prepare_run records the ranks; each simulated node (partition k) reads
    its own, and the server learns them at hello through the real ClientApp."""
    config = _config(
        tmp_path,
        lora__client_ranks=[2, 4, 8],
        lora__aggregation="hetlora",
        federation__lora_ranks=[2, 4, 8, 4, 2],
    )
    run_dir = prepare_run(config, tmp_path / "run")
    assert json.loads(RunFolder(run_dir).partitions.read_text())["lora_ranks"] == [
        2,
        4,
        8,
        4,
        2,
    ]
    for k, want in enumerate([2, 4, 8, 4, 2]):
        ctx = Context(
            run_id=1,
            node_id=k,
            node_config={"partition-id": k, "num-partitions": 5},
            state=RecordDict(),
            run_config={"run-dir": str(run_dir)},
        )
        assert NodeSettings.from_context(ctx).lora_rank == want
    spec = LoraSpec(model="tiny-llama", client_ranks=(2, 4, 8), aggregation="hetlora")
    ranks: dict[str, int] = {}
    grid = InProcessGrid(_APP, 5, run_dir=run_dir)
    discover_nodes(
        grid, expected=5, timeout_s=30.0, ledger=ByteLedger(), lora=spec, ranks=ranks
    )
    assert ranks == {"p0000": 2, "p0001": 4, "p0002": 8, "p0003": 4, "p0004": 2}


def test_a_damaged_rank_list_is_refused(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.write_partitions({"sizes": [3, 3], "lora_ranks": [4]})
    with pytest.raises(RunFolderError, match="lora_ranks"):
        folder.lora_rank(0)
    folder.write_partitions({"sizes": [3, 3]})
    assert folder.lora_rank(1) is None


# -- deployment: pollinate client join --lora-rank ---------------------------------


def test_join_passes_its_rank_as_node_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--lora-rank 4`` reaches the SuperNode's node config as the int 4
    (as Flower parses it), which NodeSettings reads; a bad value is refused."""
    from flwr.common.config import parse_config_args

    import client.daemon
    from cli.main import main

    seen: list[client.daemon.JoinSettings] = []
    monkeypatch.setattr(client.daemon, "run_daemon", lambda s, **_: seen.append(s) or 0)
    data = tmp_path / "d.jsonl"
    write_jsonl(generate_tasks(4, seed=0), data)
    argv = ["client", "join", "--server", "127.0.0.1:1", "--data", str(data)]
    assert main([*argv, "--insecure", "--lora-rank", "4"]) == 0
    (settings,) = seen
    cmd = client.daemon.supernode_command(settings)
    node_config = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    assert node_config["lora-rank"] == 4
    assert NodeSettings.from_context(_context(node_config)).lora_rank == 4
    with pytest.raises(SystemExit):
        main([*argv, "--insecure", "--lora-rank", "0"])
    assert "--lora-rank: must be an int in 1..4096" in capsys.readouterr().err
