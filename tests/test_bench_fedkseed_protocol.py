"""Tests for ``bench.fedkseed_protocol``: the protocol end to end, its presets, its verdict.

The quick preset's Natural Instructions runs (FedIT, FedKSeed, FedKSeed-Pro,
FedKSeed over an adapter; tiny-llama, 4 clients of which 2 train per round,
3 tasks held out) run in process through the bench's own command line and
write the JSON, markdown and plot: every run completes, no client's data
holds a held-out task and the evaluation holds only held-out tasks, every
score carries its interval, and FedKSeed's bytes per round are far below
FedIT's. The verdict is fed hand-made results whose intervals separate or
overlap, and must follow them; every preset makes valid run configs, and the
paper preset holds the paper's settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.fedkseed_protocol.__main__ import main, plan
from bench.fedkseed_protocol.report import compare, render, verdict
from bench.fedkseed_protocol.settings import (
    METHODS,
    PAPER,
    PRESETS,
    QUICK,
    run_overrides,
)
from bench.harness import read_json
from server.config import load_config


def test_quick_protocol_holds_out_tasks_scores_intervals_and_counts_bytes(
    tmp_path: Path, one_thread: None
) -> None:
    args = ["--preset", "quick", "--data", "ni", "--out-dir", str(tmp_path)]
    assert main(args) == 0
    results = read_json(tmp_path / "fedkseed_protocol-quick.json")
    runs = {r["method"]: r for r in results["runs"]}
    assert sorted(runs) == sorted(METHODS)
    scale = QUICK.data["ni"]
    for method, run in runs.items():
        res = run["result"]
        assert res["status"] == "completed", (method, res["status"])
        assert res["rounds_done"] == scale.rounds
        assert res["metric_name"] == "rouge_l_fedkseed"
        # eval.every = rounds: round 0 and the last round only
        assert [c[0] for c in res["curve"]] == [0, scale.rounds]
        assert res["metric_low"] is not None and res["metric_high"] is not None
        assert res["metric_low"] <= res["metric_last"] <= res["metric_high"]
        assert res["eval_examples"] == scale.eval_examples
        # a fraction of the clients per round
        assert res["clients_per_round"] == 2
        # held-out tasks: drawn, scored, never trained on
        assert res["heldout_groups"] is not None, "partitions.json records none"
        held = set(res["heldout_groups"])
        assert len(held) == scale.heldout_group_count
        assert res["eval_groups"] and set(res["eval_groups"]) <= held
        assert not held & set(res["train_groups"])
        assert res["overlap"] == []
        assert len(res["train_groups"]) >= scale.clients
    # one seed: every method is scored on the same held-out tasks
    assert len({tuple(r["result"]["eval_groups"]) for r in runs.values()}) == 1
    fedit = runs["fedit"]["result"]
    for method in ("fedkseed", "fedkseed-pro", "fedkseed-adapter"):
        zo = runs[method]["result"]
        zo_round = zo["round_bytes_down"] + zo["round_bytes_up"]
        assert 10 * zo_round < fedit["round_bytes_down"] + fedit["round_bytes_up"]
        assert 10 * zo["bytes_up"] < fedit["bytes_up"]
    md = (tmp_path / "fedkseed_protocol-quick.md").read_text()
    assert md.count("| yes |") == len(METHODS)
    assert "22.33 +- 1.72" in md and "30.91 +- 0.29" in md
    assert "- ni: FedKSeed - FedIT = " in md
    assert (tmp_path / "fedkseed_protocol-quick.png").stat().st_size > 0

    assert main([*args, "--resume"]) == 0
    again = read_json(tmp_path / "fedkseed_protocol-quick.json")
    assert [r["result"]["seconds"] for r in again["runs"]] == [
        r["result"]["seconds"] for r in results["runs"]
    ]


def test_plan_is_seed_major_and_honours_the_choice() -> None:
    runs = plan(["ni", "dolly"], ["fedkseed", "fedit"], 2)
    assert [(r["seed"], r["dataset"], r["method"]) for r in runs[:4]] == [
        (0, "ni", "fedit"),
        (0, "ni", "fedkseed"),
        (0, "dolly", "fedit"),
        (0, "dolly", "fedkseed"),
    ]
    assert len(runs) == 8 and [r["seed"] for r in runs] == sorted(
        r["seed"] for r in runs
    )


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_makes_valid_runs(name: str, tmp_path: Path) -> None:
    preset = PRESETS[name]
    for dataset in ("ni", "dolly"):
        for method in METHODS:
            overrides = run_overrides(preset, dataset=dataset, method=method, seed=1)
            config = load_config(None, {**overrides, "run.output_dir": str(tmp_path)})
            assert config.eval.metric == "rouge_l_fedkseed"
            assert config.federation.fraction < 1
            if method == "fedkseed-adapter":
                assert config.zo.adapter_rank > 0
            if dataset == "dolly":
                assert config.data.heldout_groups == ("summarization",)
            else:
                assert config.data.heldout_group_count > 0
                assert config.data.partitioning == "task"


def test_paper_preset_is_the_papers_setting() -> None:
    ni, dolly = PAPER.data["ni"], PAPER.data["dolly"]
    assert (PAPER.num_seeds, PAPER.local_steps, PAPER.batch_size) == (4096, 200, 1)
    assert (ni.rounds, dolly.rounds, dolly.clients) == (40, 60, 200)
    assert ni.fraction == dolly.fraction == 0.05
    assert (PAPER.max_length, PAPER.new_tokens) == (1024, 128)
    for method in ("fedkseed", "fedkseed-pro"):
        config = load_config(
            None, run_overrides(PAPER, dataset="ni", method=method, seed=0)
        )
        assert (config.zo.eps, config.zo.learning_rate, config.zo.include) == (
            5e-4,
            3e-7,
            (),
        )


def _run(
    method: str, seed: int, metric: float, half: float, kb: float
) -> dict[str, Any]:
    return {
        "dataset": "ni",
        "method": method,
        "seed": seed,
        "result": {
            "status": "completed",
            "metric_first": 0.05,
            "metric_last": metric,
            "metric_low": metric - half,
            "metric_high": metric + half,
            "eval_loss_first": 3.0,
            "eval_loss_last": 2.5,
            "bytes_down": kb * 500,
            "bytes_up": kb * 500,
            "round_bytes_down": kb * 2000,
            "round_bytes_up": kb * 2000,
            "clients_per_round": 4.0,
            "seconds": 10.0,
            "overlap": [],
        },
    }


def _results(fedkseed: list[float], half: float) -> dict[str, Any]:
    runs = [_run("fedit", s, 0.20, half, 3700.0) for s in range(len(fedkseed))]
    runs += [_run("fedkseed", s, m, half, 16.0) for s, m in enumerate(fedkseed)]
    return {"stem": "fedkseed_protocol-test", "seeds": len(fedkseed), "runs": runs}


def test_verdict_follows_the_intervals(tmp_path: Path) -> None:
    apart = _results([0.30, 0.31], half=0.02)
    (row,) = compare(apart)
    assert (row["beyond"], row["above"], row["seeds"]) == (True, 2, 2)
    assert row["bytes_ratio"] == pytest.approx(3700.0 / 16.0)
    assert "**differs beyond the intervals** (above FedIT on all 2" in verdict(apart)[0]
    md = render(apart, plot_dir=tmp_path)
    assert "differs beyond the intervals" in md
    assert (tmp_path / "fedkseed_protocol-test.png").exists()

    close = _results([0.30, 0.21], half=0.02)  # the second seed overlaps FedIT
    (row,) = compare(close)
    assert (row["beyond"], row["above"]) == (False, 1)
    assert (
        "does not differ beyond the intervals** (separated on 1 of 2"
        in (verdict(close)[0])
    )
    wide = _results([0.30, 0.31], half=0.06)
    assert compare(wide)[0]["beyond"] is False
