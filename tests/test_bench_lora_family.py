"""Tests for ``bench.lora_family``: a quick run end to end, its plan, its derived advice.

The quick mode's two smallest runs (FedAvg and exact on Natural
Instructions, tiny-llama, two rounds) run in process through the bench's own
command line and write the JSON, markdown and plot; ``--resume`` then skips
them. The recommendation is fed hand-made results whose best configuration
changes, and must change with it; every configuration makes a valid run
config at both scales.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.harness import read_json
from bench.lora_family.__main__ import main, plan
from bench.lora_family.report import pick, recommend, render
from bench.lora_family.settings import CONFIGS, FULL, QUICK, run_overrides
from server.config import load_config


def test_quick_runs_write_rows_and_resume_skips_them(
    tmp_path: Path, one_thread: None
) -> None:
    args = ["--quick", "--only", "aggregation", "--data", "ni"]
    args += ["--configs", "fedavg,exact", "--out-dir", str(tmp_path)]
    assert main(args) == 0
    results = read_json(tmp_path / "lora_family-quick.json")
    runs = {r["config"]: r for r in results["runs"]}
    assert sorted(runs) == ["exact", "fedavg"]
    for run in runs.values():
        res = run["result"]
        assert (run["dataset"], run["seed"]) == ("ni", 0)
        assert res["status"] == "completed", res["status"]
        assert res["rounds_done"] == QUICK.rounds
        assert [c[0] for c in res["curve"]] == list(range(QUICK.rounds + 1))
        assert res["metric_name"] == "rouge_l"
        assert res["eval_loss_last"] < res["eval_loss_first"]
        assert res["bytes_down"] > 0 and res["bytes_up"] > 0
    # Round 2 of exact downloads the adapter plus the dense residual.
    assert (
        runs["exact"]["result"]["bytes_down"] > runs["fedavg"]["result"]["bytes_down"]
    )
    md = (tmp_path / "lora_family-quick.md").read_text()
    assert "(a) Aggregation at rank 8" in md
    assert "| `fedavg` | FedAvg of A and B | ni |" in md
    assert "| `exact` | exact (FedEx-LoRA) | ni |" in md
    assert "**Clients of one rank: start with" in md
    assert "(b) Clients of ranks" not in md  # not run
    assert (tmp_path / "lora_family-quick.png").stat().st_size > 0

    assert main([*args, "--resume"]) == 0
    again = read_json(tmp_path / "lora_family-quick.json")
    assert [r["result"]["seconds"] for r in again["runs"]] == [
        r["result"]["seconds"] for r in results["runs"]
    ]


def test_plan_runs_shared_fedavg_once_seed_major() -> None:
    runs = plan({"aggregation", "server_opt"}, ["dolly", "ni"], list(CONFIGS), 2)
    names = ["fedavg", "exact", "ffa", "fedadam", "fedyogi", "fedadagrad", "fedavgm"]
    assert [r["config"] for r in runs[: len(names)]] == names
    assert len(runs) == 2 * 2 * len(names)
    assert [r["seed"] for r in runs] == sorted(r["seed"] for r in runs)
    mixed = plan({"mixed_ranks"}, ["ni"], ["flexlora", "fedavg"], 1)
    assert [r["config"] for r in mixed] == ["flexlora"]


@pytest.mark.parametrize("scale", [FULL, QUICK], ids=["full", "quick"])
def test_every_configuration_is_a_valid_run(scale: Any, tmp_path: Path) -> None:
    for name in CONFIGS:
        for dataset in ("dolly", "ni"):
            overrides = run_overrides(scale, dataset=dataset, config=name, seed=0)
            config = load_config(None, {**overrides, "run.output_dir": str(tmp_path)})
            assert (
                config.lora.aggregation == CONFIGS[name].overrides["lora.aggregation"]
            )
    mixed = load_config(
        None, run_overrides(FULL, dataset="ni", config="flexlora", seed=0)
    )
    assert mixed.federation.client_lora_ranks() == (2, 4, 8, 16, 2, 4, 8, 16)
    assert mixed.lora.rank == 16


def _run(
    config: str, dataset: str, rouge: float, loss: float, mb: float
) -> dict[str, Any]:
    return {
        "config": config,
        "dataset": dataset,
        "seed": 0,
        "result": {
            "status": "completed",
            "metric_last": rouge,
            "eval_loss_first": 3.0,
            "eval_loss_last": loss,
            "bytes_down": mb * 1e6 / 2,
            "bytes_up": mb * 1e6 / 2,
            "seconds": 100.0,
        },
    }


def _results(numbers: dict[str, tuple[float, float, float]]) -> dict[str, Any]:
    """Both datasets, each config's (Rouge-L, loss, MB) on each; one failed run."""
    runs = [
        _run(name, dataset, *values)
        for name, values in numbers.items()
        for dataset in ("dolly", "ni")
    ]
    failed = _run("ffa", "dolly", 0.9, 0.1, 1.0)
    failed["result"].update(status="RuntimeError: boom", metric_last=None)
    return {"stem": "lora_family-test", "seeds": 1, "runs": [*runs, failed]}


def _start(lines: list[str], group: str) -> str:
    line = next(x for x in lines if group in x)
    return line.split("start with `")[1].split("`")[0]


def test_recommendation_is_derived_from_the_numbers(tmp_path: Path) -> None:
    numbers = {
        "fedavg": (0.20, 2.50, 1.8),
        "exact": (0.21, 2.45, 55.0),
        "fedadam": (0.30, 2.40, 1.8),
        "zero-pad": (0.18, 2.60, 2.0),
        "hetlora": (0.19, 2.55, 2.0),
        "flexlora": (0.25, 2.50, 2.0),
    }
    lines = recommend(_results(numbers))
    assert _start(lines, "one rank") == "fedadam"
    assert _start(lines, "mixed ranks") == "flexlora"
    assert "best Rouge-L" in lines[0]
    md = render(_results(numbers), plot_dir=tmp_path)
    assert "start with `fedadam`" in md
    assert "RuntimeError: boom" in md  # ffa's failure is shown; ffa never wins
    assert (tmp_path / "lora_family-test.png").exists()

    numbers["exact"] = (0.35, 2.45, 55.0)
    numbers["hetlora"] = (0.26, 2.55, 2.0)
    lines = recommend(_results(numbers))
    assert _start(lines, "one rank") == "exact"
    assert _start(lines, "mixed ranks") == "hetlora"
    assert "start with `exact`" in render(_results(numbers))


def test_ties_fall_to_loss_then_bytes() -> None:
    name, why = pick({"a": (0.300, 2.5, 1.0), "b": (0.298, 2.4, 9.0)})
    assert (name, "lowest eval loss" in why) == ("b", True)
    name, why = pick({"a": (0.300, 2.401, 9.0), "b": (0.298, 2.400, 1.0)})
    assert (name, "fewest bytes" in why) == ("b", True)
    name, why = pick({"a": (0.300, 2.4, 9.0), "b": (0.200, 2.0, 1.0)})
    assert (name, why) == ("a", "best Rouge-L")
