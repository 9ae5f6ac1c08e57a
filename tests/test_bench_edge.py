"""Tests for ``bench.edge``: its report, its install sets and its run settings.

The benchmark itself (``python -m bench.edge --quick``, about 2 min here)
is not run: sections 1-4 alone take about a minute on this machine. These
tests render the report from a small hand-made results dict, measure the
cheap section (install footprint, from installed metadata) for real, and
check that every section 5 method's settings make a valid run config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.edge.footprint import closure, section_footprint
from bench.edge.quality import CALIBRATION_ROUNDS, cli_args, seconds_per_round
from bench.edge.report import render
from bench.edge.settings import FULL, METHODS, QUICK, method_overrides


def _steps(b1: float, b8: float) -> dict[str, Any]:
    return {
        "tokens_equal_torch_client": True,
        "batch_1": {"median_s": b1},
        "batch_8": {"median_s": b8},
        "forward": {"median_s": b8 / 3},
        "perturb": {"median_s": b8 / 10},
    }


def _run(losses: list[float], rouge: list[float]) -> dict[str, Any]:
    rows = [
        {"round": i, "eval_loss": x, "eval_metric": y, "seconds": 1.0}
        for i, (x, y) in enumerate(zip(losses, rouge, strict=True))
    ]
    return {
        "metrics": rows,
        "rounds_done": len(rows) - 1,
        "eval_loss_first": losses[0],
        "eval_loss_last": losses[-1],
        "metric_first": rouge[0],
        "metric_last": rouge[-1],
    }


def _results(edge_mib: float, bit_identical: bool) -> dict[str, Any]:
    """A small results dict shaped as ``bench.edge`` writes it."""
    walk = {
        "numel": 1000,
        "tensors": 2,
        "generated_values_per_round": 8000,
        "torch_s": 0.5,
        "numpy_numba_s": 0.4,
        "numpy_reference_s": 2.0,
        "numpy_numba_bit_identical": True,
        "numpy_reference_bit_identical": bit_identical,
        "paper_round_seconds": {
            "torch": 99.0,
            "numpy_numba": 80.0,
            "numpy_reference": 400.0,
        },
    }

    def dists(**mb: float) -> dict[str, Any]:
        return {n: {"version": "1", "mb": v} for n, v in mb.items()}

    mem = {
        k: {"peak_mib": v, "marks_mib": {"after_imports": 50.0}, "loss_w0": 3.25}
        for k, v in (("ort", 600.0), ("edge", edge_mib), ("torch", 1500.0))
    }
    return {
        "mode": "full",
        "stem": "edge-test",
        "settings": {"model": "smollm2-135m", "batch": 8, "tokens": 128},
        "machine": {"cpu_affinity": 2, "load_average_at_start": [1.0, 1.0, 1.0]},
        "footprint": {
            "sets": {
                "edge": {
                    "requirements": ["flwr"],
                    "dists": dists(flwr=20.0, onnxruntime=80.0),
                    "missing": [],
                    "mb": 100.0,
                },
                "ort": {
                    "requirements": ["onnxruntime"],
                    "dists": dists(onnxruntime=80.0),
                    "missing": [],
                    "mb": 80.0,
                },
                "torch": {
                    "requirements": ["torch"],
                    "dists": dists(torch=900.0),
                    "missing": [],
                    "mb": 900.0,
                },
            },
            "bundle_mb": {"model.onnx": 1.0, "w0.safetensors": 538.0},
        },
        "memory": {
            **mem,
            "ratio_edge_over_ort": edge_mib / 600.0,
            "ratio_torch_over_edge": 1500.0 / edge_mib,
            "aim": 1.2,
        },
        "step": {
            "repeats": 5,
            "edge": _steps(0.9, 4.0),
            "edge_numba": _steps(0.5, 3.0),
            "torch": _steps(1.0, 3.5),
        },
        "replay": {
            "seeds": 8,
            "paper_round_distinct_seeds": 1583.0,
            "walks": {
                "full": {**walk, "include": []},
                "subset": {
                    **walk,
                    "include": ["model.layers.2[89].*"],
                    "name": "last two",
                },
                "adapter": {**walk, "rank": 8, "alpha": 16.0, "targets": ["q_proj"]},
            },
        },
        "quality": {
            "settings": {
                "budget_s": 600.0,
                "max_rounds": 40,
                "clients": 4,
                "partition": "task",
                "limit": 1200,
                "eval_examples": 32,
                "new_tokens": 32,
                "harness": "pollinate",
            },
            "runs": {
                "lora": {
                    "overrides": {"run.method": "lora"},
                    "train_seconds_per_round": 100.0,
                    "train_seconds_used": 600.0,
                    "run": _run([3.0, 2.5], [0.1, 0.2]),
                },
                "fedkseed-adapter": {
                    "overrides": {"run.method": "fedkseed", "zo.adapter_rank": 8},
                    "error": "calibration round did not finish",
                },
            },
        },
        "total_seconds": 12.0,
    }


def test_report_judges_the_memory_aim_and_flags_replay_drift(tmp_path: Path) -> None:
    """The report is built from the JSON alone: it states the edge / ORT
    ratio against the 1.2x aim, marks a replay that is not bit-identical,
    keeps a failed method as a row, and writes the plot.

    Breaks if a section's rows disappear, the aim is judged the wrong way,
    or a drifting replay reads as identical.
    """
    good = render(_results(edge_mib=660.0, bit_identical=True), plot_dir=tmp_path)
    assert "**1.10x** (meets the aim)" in good
    assert "NOT bit-identical" not in good
    assert "bit-identical to torch: yes" in good
    assert "3.000 -> **2.500** / 0.100 -> **0.200**" in good
    assert "no result: calibration round did not finish" in good
    assert "**600 s of training per method**" in good
    assert "![" in good and (tmp_path / "edge-test.png").stat().st_size > 10_000
    bad = render(_results(edge_mib=900.0, bit_identical=False))
    assert "**1.50x** (misses the aim)" in bad
    assert "NOT bit-identical" in bad and "bit-identical to torch: NO" in bad
    for section in ("1 footprint", "2 memory", "3 step time", "4 replay", "5 quality"):
        assert f"| {section} |" in bad


def test_install_sets_follow_requirement_metadata() -> None:
    """Section 1 on the installed environment: the edge set has no torch,
    Ray or numba and holds ORT inference's set; the torch client's set has
    all three; sizes add up. ``flwr`` pulls Ray only with ``[simulation]``.

    Breaks if extras or markers are ignored in the closure, or a set is
    sized from the wrong distributions.
    """
    assert "ray" not in closure(["flwr"])[0]
    assert "ray" in closure(["flwr[simulation]"])[0]
    sets = section_footprint()["sets"]
    edge, ort, torch = (set(sets[k]["dists"]) for k in ("edge", "ort", "torch"))
    assert {"flwr", "onnxruntime", "numpy", "tokenizers", "safetensors"} <= edge
    assert not {"torch", "ray", "numba", "transformers"} & edge
    assert ort <= edge and {"torch", "ray", "numba"} <= torch
    assert not any(r.startswith("pytest") for r in sets["edge"]["requirements"])
    for s in sets.values():
        assert s["mb"] == pytest.approx(sum(d["mb"] for d in s["dists"].values()))
        assert s["missing"] == []
    assert sets["ort"]["mb"] < sets["edge"]["mb"] < sets["torch"]["mb"]


@pytest.mark.parametrize("scale", [FULL, QUICK], ids=["full", "quick"])
def test_every_method_makes_a_valid_run_config(scale: Any, tmp_path: Path) -> None:
    """Section 5's command lines parse back into valid configs: the subset
    run perturbs the scale's globs, the adapter run has the scale's rank,
    and the calibration run's evaluation is cut down.

    Breaks if a setting names a key the config does not have, or the
    placeholders of :data:`METHODS` are not filled in.
    """
    from bench.fedkseed.inproc import overrides_from_cli
    from server.config import load_config

    for name in METHODS:
        config = load_config(
            None, overrides_from_cli(cli_args(name, tmp_path, scale, 3))
        )
        assert config.run.rounds == 3 and config.model.name == scale.model
        assert config.data.eval_examples == scale.sim["eval_examples"]
        if name == "fedkseed-subset":
            assert config.zo.include == scale.subset
        if name == "fedkseed-adapter":
            assert config.zo.adapter_rank == scale.adapter_rank
        assert method_overrides(name, scale)["run.method"] == config.run.method
        cal = load_config(
            None,
            overrides_from_cli(cli_args(name, tmp_path, scale, 2, calibration=True)),
        )
        assert cal.data.eval_examples == 1 and cal.eval.max_new_tokens == 1


def test_seconds_per_round_is_the_last_calibration_round() -> None:
    """The budget's divisor is the warm calibration round, None when the
    calibration stopped early."""
    rows = [{"round": i, "seconds": 10.0 + i} for i in range(CALIBRATION_ROUNDS + 1)]
    assert seconds_per_round({"metrics": rows}) == 10.0 + CALIBRATION_ROUNDS
    assert seconds_per_round({"metrics": rows[:-1]}) is None
    assert seconds_per_round({}) is None
