"""``pollinate compare``: runs of different methods in one table and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main


def _run(folder: Path, method: str, metric: list[float], mb: float) -> Path:
    folder.mkdir(parents=True)
    rows = [
        {
            "round": r,
            "clients": 0 if r == 0 else 2,
            "train_loss": None if r == 0 else 1.0,
            "eval_loss": 2.0 - r * 0.1,
            "eval_metric": m,
            "eval_metric_name": "rouge_l",
            "bytes_up": 0 if r == 0 else int(mb * 1e6),
            "bytes_down": 0 if r == 0 else int(mb * 1e6),
            "seconds": 1.0,
            "method": method,
        }
        for r, m in enumerate(metric)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_compare_prints_every_run_and_writes_the_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both methods appear in the table and a PNG is written.

    Breaks if a run is dropped or the plot is not produced.
    """
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: no truncated labels
    a = _run(tmp_path / "a", "lora", [0.1, 0.3, 0.4], 7.0)
    b = _run(tmp_path / "b", "fedkseed", [0.1, 0.12, 0.15], 0.004)
    out = tmp_path / "cmp.png"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    text = capsys.readouterr().err
    assert "lora" in text and "fedkseed" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_a_folder_without_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder that is not a run gives exit status 2 and names the folder."""
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert main(["compare", str(empty)]) == 2
    assert "nothing" in capsys.readouterr().err
