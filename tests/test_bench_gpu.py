"""The GPU check's script on the CPU: smoke scale, refusal without CUDA, the report.

``bench/gpu_check.sh`` runs on a GPU machine only now and then; these tests
keep it runnable in between: every section of ``python -m bench.gpu`` runs at
its tiny CPU scale and writes finite figures, the command and the shell
script refuse in one line when no CUDA device is visible, and the report
built from a GPU run's part files says which step is missing and why.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.gpu import GPU, SECTIONS, SMOKE
from bench.gpu.__main__ import main
from bench.gpu.replay import budget_share

REPO = Path(__file__).resolve().parents[1]


def _numbers(obj: Any) -> list[float]:
    """Every int or float inside a JSON value (bools excluded)."""
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int | float):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return []


def test_cpu_smoke_writes_every_section_with_finite_figures(tmp_path: Path) -> None:
    """``--cpu-smoke``: replay, eval and lora each give finite, positive timings.

    Breaks if a section raises (it is then recorded as an error, without
    runs), times nothing, or writes NaN; or if the extrapolation of a replay
    cut short by its budget is not linear in seeds.
    """
    assert main(["--cpu-smoke", "--out-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["mode"] == "cpu-smoke"
    assert results["machine"]["torch"] == torch.__version__
    assert "cuda_version" in results["machine"]
    for name in SECTIONS:
        section = results[name]
        assert section.get("runs"), f"{name}: {section.get('status')}"
        for run in section["runs"]:
            assert run["device"] == "cpu"
            assert run["seconds"] > 0 and run["rate"] > 0, (name, run["what"])
        assert all(math.isfinite(x) for x in _numbers(section)), name

    replay = results["replay"]["runs"][0]
    assert replay["what"].startswith("protocols.seeds.apply_seed_sum_")
    assert replay["extrapolated"]
    assert (replay["seeds_replayed"], replay["tensors_replayed"]) == (1, 1)
    assert replay["seconds"] == pytest.approx(
        replay["measured_s"] * SMOKE.replay.seeds * SMOKE.replay.tensors
    )
    assert replay["target_s"] == 12.0

    ev = results["eval"]["runs"]
    assert [r["examples"] for r in ev] == [SMOKE.eval.examples, SMOKE.eval.cpu_examples]
    assert all(0.0 <= r["metric"] <= 1.0 and r["loss"] > 0 for r in ev)

    rules = [r["what"].split("'")[1] for r in results["lora"]["runs"]]
    assert rules == ["fedavg", "flexlora", "fedavg", "flexlora"]
    flex = results["lora"]["runs"][1]
    assert flex["extrapolated"] and flex["layers_measured"] == 1

    md = (tmp_path / "gpu_check.md").read_text()
    assert "# GPU check (cpu-smoke)" in md
    for name in SECTIONS:
        assert f"| {name} |" in md


def test_replay_budget_shares_seeds_then_tensors() -> None:
    """The whole round when it fits; else fewer seeds; else one seed, fewer tensors."""
    scale = dataclasses.replace(GPU.replay, tensors=28, seeds=1000, budget_s=45.0)
    assert budget_share(scale, 1e-6) == (1000, 28)  # 28 ms a round
    assert budget_share(scale, 0.05) == (32, 28)  # 1.4 s a seed
    assert budget_share(scale, 10.0) == (1, 4)  # 280 s a seed
    assert budget_share(scale, 100.0) == (1, 1)


def test_command_refuses_without_cuda_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Without ``--cpu-smoke`` and without CUDA: exit 2, one line, nothing written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in ([], ["--section", "replay", "--parts", str(tmp_path)]):
        assert main([*argv, "--out-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no CUDA device is visible" in err
    assert list(tmp_path.iterdir()) == []


def test_shell_script_refuses_without_cuda_in_one_line() -> None:
    """``bash bench/gpu_check.sh`` with no visible GPU: exit 2, one line on stderr."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1
    assert "no CUDA device is visible" in out.stderr


def test_report_from_parts_names_the_missing_steps(tmp_path: Path) -> None:
    """A GPU run's parts: a timed-out and a failed step are reported, not dropped."""
    parts, out = tmp_path / "parts", tmp_path / "out"
    parts.mkdir()
    run = {
        "what": "protocols.seeds.apply_seed_sum_ (FedKSeed server replay)",
        "device": "cuda:0",
        "scale": "1,000 seeds",
        "seconds": 30.0,
        "rate": 33.3,
        "rate_unit": "seeds/s",
        "target_s": 12.0,
        "meets_target": False,
        "extrapolated": True,
        "seeds_replayed": 100,
        "measured_s": 3.0,
    }
    (parts / "replay.json").write_text(json.dumps({"target": "t", "runs": [run]}))
    (parts / "eval.rc").write_text("124\n")
    (parts / "lora.rc").write_text("1\n")
    (parts / "tests.log").write_text("....\n7 passed, 1250 deselected in 20.1s\n")
    (parts / "tests.rc").write_text("0\n")
    argv = ["--section", "report", "--parts", str(parts), "--out-dir", str(out)]
    assert main(argv) == 1
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["mode"] == "gpu"
    assert results["replay"]["runs"] == [run]
    assert "ran past its time limit" in results["eval"]["status"]
    assert "exited with 1" in results["lora"]["status"]
    assert results["tests"]["passed"] is True
    assert results["tests"]["summary"] == "7 passed, 1250 deselected in 20.1s"
    md = (out / "gpu_check.md").read_text()
    assert "< 12 s: no" in md and "100 seeds in 3.00 s" in md
    assert "- eval: missing" in md
