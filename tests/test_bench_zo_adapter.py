"""Tests for ``bench.zo_adapter``: a quick run end to end, its plan and its verdicts.

The quick mode's built-in run (tiny-llama, FedKSeed over a rank-8 adapter,
two rounds) runs in process through the bench's own command line and writes
the JSON, markdown and plot; ``--resume`` then skips it. The verdict (does
held-out Rouge-L rise beyond the base model's interval?) is fed curves whose
answer changes, and must change with them; every planned run makes a valid
run config at both scales.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.harness import read_json
from bench.zo_adapter.__main__ import main, plan
from bench.zo_adapter.report import first_rise, render, verdict
from bench.zo_adapter.settings import (
    DATASETS,
    DEFAULT_PLAN,
    FULL,
    QUICK,
    SETTINGS,
    run_overrides,
)
from server.config import load_config


def test_quick_run_writes_its_curve_and_resume_skips_it(
    tmp_path: Path, one_thread: None
) -> None:
    args = ["--quick", "--data", "builtin", "--settings", "r8-lr1e-3"]
    args += ["--out-dir", str(tmp_path)]
    assert main(args) == 0
    results = read_json(tmp_path / "zo_adapter-quick.json")
    (run,) = results["runs"]
    res = run["result"]
    assert (run["dataset"], run["setting"]) == ("builtin", "r8-lr1e-3")
    assert res["status"] == "completed", res["status"]
    rounds = QUICK["builtin"].rounds
    assert [c[0] for c in res["curve"]] == list(range(rounds + 1))
    assert res["metric_name"] == "rouge_l"
    # Seeds and scalars only: a few bytes per step up, whatever the adapter.
    assert 0 < res["bytes_up"] < 4096
    md = (tmp_path / "zo_adapter-quick.md").read_text()
    assert "## built-in tasks" in md and "| r8-lr1e-3 | 8 | 0.01 | 0.001 |" in md
    assert "Natural Instructions" not in md  # not run
    assert (tmp_path / "zo_adapter-quick.png").stat().st_size > 0

    assert main([*args, "--resume"]) == 0
    again = read_json(tmp_path / "zo_adapter-quick.json")
    assert again["runs"][0]["result"]["seconds"] == res["seconds"]


def test_plan_is_the_default_sweep_or_every_chosen_pair() -> None:
    assert [(r["dataset"], r["setting"]) for r in plan(None, None)] == list(
        DEFAULT_PLAN
    )
    chosen = plan(["ni"], ["r2-lr1e-3", "r8-lr3e-4"])
    assert [(r["dataset"], r["setting"]) for r in chosen] == [
        ("ni", "r2-lr1e-3"),
        ("ni", "r8-lr3e-4"),
    ]
    assert len(plan(["builtin"], None)) == len(SETTINGS)


def _curve(*rows: tuple[float, float, float]) -> dict[str, Any]:
    """A result whose evaluations are (metric, low, high) per round."""
    return {"curve": [[i, 3.0, m, lo, hi] for i, (m, lo, hi) in enumerate(rows)]}


def test_verdict_needs_intervals_apart() -> None:
    base = (0.08, 0.06, 0.10)
    assert verdict(_curve(base, (0.09, 0.07, 0.11), (0.17, 0.12, 0.21))) == "rises"
    assert first_rise(_curve(base, (0.09, 0.07, 0.11), (0.17, 0.12, 0.21))) == 2
    assert verdict(_curve(base, (0.11, 0.08, 0.14))) == "flat"
    assert first_rise(_curve(base, (0.11, 0.08, 0.14))) is None
    assert verdict(_curve(base, (0.02, 0.01, 0.04))) == "falls"
    assert verdict(_curve(base)) == "-"
    assert verdict({"curve": []}) == "-"


def test_report_states_the_steps_and_the_verdict() -> None:
    results = {
        "stem": "zo_adapter",
        "started": "then",
        "scale": {name: vars(s) for name, s in FULL.items()},
        "settings": {name: vars(s) for name, s in SETTINGS.items()},
        "runs": [
            {
                "dataset": "builtin",
                "setting": "r2-lr1e-3",
                "seed": 0,
                "result": {
                    "status": "completed",
                    "rounds_done": 2,
                    "round_seconds": [55.0, 55.0],
                    **_curve((0.08, 0.06, 0.10), (0.12, 0.09, 0.15), (0.2, 0.15, 0.25)),
                },
            }
        ],
    }
    md = render(results)
    steps = FULL["builtin"].local_steps
    assert f"| r2-lr1e-3 | 2 | 0.01 | 0.001 | {2 * steps} |" in md
    assert f"| rises | {2 * steps} | {55.0 / steps:.2f} | completed |" in md
    assert "s/step incl. eval" in md
    assert "8.0 [6.0, 10.0]" in md and "20.0 [15.0, 25.0]" in md


@pytest.mark.parametrize("scale", [FULL, QUICK], ids=["full", "quick"])
def test_every_run_makes_a_valid_config(scale: dict[str, Any]) -> None:
    for dataset in DATASETS:
        for setting, values in SETTINGS.items():
            overrides = run_overrides(
                scale[dataset], dataset=dataset, setting=setting, seed=0
            )
            config = load_config(None, overrides)
            assert config.run.method == "fedkseed"
            assert config.zo.adapter_rank == values.rank
            assert config.zo.adapter_alpha / config.zo.adapter_rank == 2.0
            assert config.eval.every == 1
            assert config.federation.clients == 1
