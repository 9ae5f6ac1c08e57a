"""Mixed LoRA ranks in whole runs: HetLoRA and FlexLoRA over ranks 2, 4 and 8.

Tiny-llama in process (:mod:`tests.lora_runs`), three clients of ranks 2, 4
and 8 (``federation.lora_ranks``) under a global rank of 8. Each client gets
the global adapter truncated to its own rank (``client_adapter``) and replies
at that rank; the server keeps the canonical rank-8 adapter; held-out loss
falls over three rounds; a run stopped before round 3 and resumed ends
bit-identical; ``merged`` export is base + (alpha/8) B A of the final adapter
and no residual is written (only ``exact`` has one).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from server.export import adapter_note, export_run
from server.lora_driver import RESIDUAL_FILE
from strategies.lora_factors import client_adapter
from tests.lora_runs import (
    Recorded,
    checkpoint,
    equal,
    lora_config,
    module_prefixes,
    run,
)

RANKS = (2, 4, 8)
RULES = ("hetlora", "flexlora")
R_MAX, ALPHA = 8, 16.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Recorded]:
    """Each rule whole, and stopped when round 3 is sent, then resumed."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("mixed")
    out = {}
    for rule in RULES:
        config = lora_config(
            tmp,
            rule,
            len(RANKS),
            {
                "lora.rank": R_MAX,
                "lora.alpha": ALPHA,
                "lora.client_ranks": list(RANKS),
                "lora.aggregation": rule,
                "federation.lora_ranks": list(RANKS),
            },
        )
        out[rule] = run(config)
        out[f"{rule}-resumed"] = run(config, stop_at=3)
    return out


@pytest.mark.parametrize("rule", RULES)
def test_each_client_gets_and_returns_an_adapter_of_its_own_rank(
    runs: dict[str, Recorded], rule: str
) -> None:
    """Breaks if a client is sent the rank-8 adapter (or another client's
    rank), or the server's adapter is not kept at rank 8: every round, the
    three ranks are used once each, node k's instruction is the previous
    global adapter truncated to its rank, and its reply has that rank."""
    rec = runs[rule]
    for t, rnd in enumerate(rec.rounds, start=1):
        glob = rec.evaluated[t - 1][0]
        assert sorted(ins.client_rank for ins in rnd.ins.values()) == list(RANKS)
        for node, ins in rnd.ins.items():
            r = ins.client_rank
            assert equal(ins.adapter, client_adapter(glob, R_MAX, r))
            assert ins.residual == {}
            for name, tensor in rnd.res[node].adapter.items():
                assert tensor.shape[0 if ".lora_A." in name else 1] == r, name
        for name, tensor in rec.evaluated[t][0].items():
            assert tensor.shape[0 if ".lora_A." in name else 1] == R_MAX, name
    ranks_by_node = {n: i.client_rank for n, i in rec.rounds[0].ins.items()}
    assert all(
        {n: i.client_rank for n, i in rnd.ins.items()} == ranks_by_node
        for rnd in rec.rounds
    )


@pytest.mark.parametrize("rule", RULES)
def test_held_out_loss_falls(runs: dict[str, Recorded], rule: str) -> None:
    rows = runs[rule].folder.read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[3]["eval_loss"] < rows[0]["eval_loss"]


@pytest.mark.parametrize("rule", RULES)
def test_a_stopped_run_resumes_bit_identically(
    runs: dict[str, Recorded], rule: str
) -> None:
    """Breaks if the resumed round 3 starts from anything but the checkpoint
    of round 2 (rank bookkeeping, the canonical adapter) or runs elsewise."""
    whole, resumed = runs[rule].folder, runs[f"{rule}-resumed"].folder
    assert resumed.read_status().state == "completed"
    assert equal(checkpoint(whole), checkpoint(resumed))
    assert "extra_tensors" not in whole.checkpoint_record()  # no residual
    rows = [
        [
            {k: v for k, v in r.items() if k not in ("seconds", "eval_s")}
            for r in f.read_metrics()
        ]
        for f in (whole, resumed)
    ]
    assert rows[0] == rows[1]
    # the resumed round 3 was sent the same adapters as the uninterrupted one
    a, b = runs[rule].rounds[2].ins, runs[f"{rule}-resumed"].rounds[2].ins
    assert a.keys() == b.keys() and all(equal(a[n].adapter, b[n].adapter) for n in a)


def test_merged_export_has_no_residual_and_is_base_plus_adapter(
    runs: dict[str, Recorded], tmp_path: Path
) -> None:
    rec = runs["flexlora"]
    adapter, residual, bases = rec.evaluated[-1]
    assert residual == {}
    merged = export_run(rec.folder.path, tmp_path / "merged", "merged")
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(merged.glob("*.safetensors")):
        weights.update(load_file(f))
    for p in module_prefixes(adapter):
        a = adapter[f"{p}.lora_A.weight"].float()
        b = adapter[f"{p}.lora_B.weight"].float()
        name = p.removeprefix("base_model.model.") + ".weight"
        want = bases[p] + (ALPHA / R_MAX) * (b @ a)
        torch.testing.assert_close(weights[name], want, rtol=1e-6, atol=1e-6)
    out = export_run(rec.folder.path, tmp_path / "adapter", "adapter")
    assert not (out / RESIDUAL_FILE).exists() and adapter_note(out) is None
