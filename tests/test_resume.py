"""Crash and resume: a killed server continues from its checkpoint to the same end.

The server is killed (``os._exit(137)``, like SIGKILL) right after round 2 is
recorded, by fault injection; ``pollinate resume`` then finishes the run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli.main import build_parser
from cli.main import main as cli_main
from cli.overrides import collect_overrides
from server.config import load_config
from simulation import launch, prepare_run, read_metrics

pytestmark = pytest.mark.integration

BASE = [
    "--model",
    "tiny-llama",
    "--rounds",
    "3",
    "--clients",
    "2",
    "--local-steps",
    "3",
    "--batch-size",
    "4",
    "--limit",
    "200",
    "--set",
    "data.eval_examples=8",
    "--set",
    "eval.max_new_tokens=2",
]
ZO = [
    "--method",
    "fedkseed",
    "--set",
    "zo.num_seeds=32",
    "--set",
    "zo.learning_rate=1e-3",
    "--set",
    "zo.eps=1e-3",
    "--local-steps",
    "6",
]


def _prepared(tmp_path: Path, *extra: str) -> Path:
    args = build_parser().parse_args(
        ["simulate", *BASE, *extra, "--output-dir", str(tmp_path)]
    )
    return prepare_run(load_config(None, collect_overrides(args)))


def _strip(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return [
        {k: v for k, v in r.items() if k not in ("seconds", "replay_seconds", "eval_s")}
        for r in rows
    ]


@pytest.mark.long
@pytest.mark.parametrize("method", ["lora", "fedkseed"])
def test_a_killed_run_resumes_to_the_uninterrupted_result(
    tmp_path: Path, method: str
) -> None:
    """After a kill at round 2 and a resume, metrics and the final model equal
    those of an uninterrupted run with the same seed (same model hash for
    FedKSeed, bit-identical adapter for LoRA); nothing recorded is lost.

    Breaks if the checkpoint misses state (seed history, adapter, ledger) or
    rounds are redone or skipped.
    """
    extra = ZO if method == "fedkseed" else []
    whole = _prepared(tmp_path / "whole", *extra)
    assert launch(whole, rounds=3).ok
    crashed = _prepared(tmp_path / "crash", *extra)
    result = launch(crashed, rounds=3, env={"POLLINATE_FAULT_AFTER_ROUND": "2"})
    assert not result.ok
    rows = read_metrics(crashed / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert json.loads((crashed / "checkpoint" / "state.json").read_text())["round"] == 2
    assert cli_main(["resume", str(crashed)]) == 0
    a = read_metrics(whole / "metrics.jsonl")
    b = read_metrics(crashed / "metrics.jsonl")
    if method == "fedkseed":
        # A restarted server resends the full history once: more bytes down.
        for r in (a, b):
            for row in r:
                row.pop("bytes_down")
    assert _strip(a) == _strip(b)
    if method == "lora":
        wa = load_file(whole / "checkpoint" / "adapter.safetensors")
        wb = load_file(crashed / "checkpoint" / "adapter.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    else:
        assert a[-1]["model_hash"] == b[-1]["model_hash"]


def test_resume_refuses_a_completed_run(tmp_path: Path) -> None:
    """A finished run is not resumed (exit status 2), and stays as it was."""
    run_dir = _prepared(tmp_path, "--rounds", "1")
    (run_dir / "status.json").write_text(
        json.dumps({"state": "completed", "rounds": 1})
    )
    (run_dir / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n')
    before = (run_dir / "metrics.jsonl").read_text()
    assert cli_main(["resume", str(run_dir)]) == 2
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_resume_refuses_a_run_without_a_checkpoint(tmp_path: Path) -> None:
    """A run that died before round 1 has nothing to resume from: exit 2."""
    run_dir = _prepared(tmp_path, "--rounds", "1")
    assert cli_main(["resume", str(run_dir)]) == 2
