"""``pollinate compare``: runs of different methods in one table and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main


def _run(
    folder: Path,
    method: str,
    metric: list[float | None],
    mb: float,
    half_width: float | None = None,
) -> Path:
    """A run folder whose metrics.jsonl has one row per metric value; a None
    value is a round not evaluated; ``half_width`` adds intervals."""
    folder.mkdir(parents=True)
    rows = [
        {
            "round": r,
            "clients": 0 if r == 0 else 2,
            "train_loss": None if r == 0 else 1.0,
            "eval_loss": None if m is None else 2.0 - r * 0.1,
            "eval_metric": m,
            "eval_metric_name": None if m is None else "rouge_l",
            "eval_metric_low": None
            if m is None or half_width is None
            else m - half_width,
            "eval_metric_high": None
            if m is None or half_width is None
            else m + half_width,
            "eval_examples": None if m is None else 200,
            "eval_s": None if m is None else 0.5,
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


def test_compare_says_whether_final_metrics_differ_beyond_intervals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each pair of runs gets one line judged on its last evaluated rows: B's
    interval [0.35, 0.45] lies above A's [0.15, 0.25] (A's last row, round 3,
    is not evaluated: round 2 counts), C's [0.38, 0.42] overlaps B's. Breaks
    if the verdict uses an unevaluated row, the wrong side, or no intervals."""
    monkeypatch.setenv("COLUMNS", "300")
    a = _run(tmp_path / "a", "lora", [0.1, 0.15, 0.2, None], 1.0, half_width=0.05)
    b = _run(tmp_path / "b", "fedkseed", [0.1, 0.3, 0.4], 0.01, half_width=0.05)
    c = _run(tmp_path / "c", "fedkseedpro", [0.1, 0.2, 0.4], 0.01, half_width=0.02)
    out = tmp_path / "cmp.png"
    assert main(["compare", str(a), str(b), str(c), "--out", str(out)]) == 0
    lines = capsys.readouterr().err.splitlines()
    ab = [ln for ln in lines if ln.startswith("lora: a vs fedkseed: b: ")]
    bc = [ln for ln in lines if ln.startswith("fedkseed: b vs fedkseedpro: c: ")]
    ac = [ln for ln in lines if ln.startswith("lora: a vs fedkseedpro: c: ")]
    assert len(ab) == len(bc) == len(ac) == 1, lines
    assert "fedkseed: b above lora: a beyond both 95% intervals" in ab[0]
    assert "20.0% [15.0, 25.0]" in ab[0] and "40.0% [35.0, 45.0]" in ab[0]
    assert "intervals overlap: no clear difference" in bc[0]
    assert "fedkseedpro: c above lora: a beyond both 95% intervals" in ac[0]
    assert "40.0% [35.0, 45.0]" in "\n".join(lines)  # the table's Final cell


def test_compare_without_intervals_cannot_tell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs recorded before intervals existed are not declared different."""
    monkeypatch.setenv("COLUMNS", "300")
    a = _run(tmp_path / "a", "lora", [0.1, 0.9], 1.0)
    b = _run(tmp_path / "b", "fedkseed", [0.1, 0.2], 0.01)
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "c.png")]) == 0
    text = capsys.readouterr().err
    assert "lora: a vs fedkseed: b: no interval recorded: cannot tell" in text
    assert "beyond" not in text
