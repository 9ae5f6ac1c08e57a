"""Tests for ``simulation.reports`` (metrics.jsonl parsing, tables) and ``simulation.plots``."""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
from rich.console import Console

from cli.console import report_console
from simulation.plots import plot_comparison, plot_run
from simulation.reports import (
    ReportError,
    compare_table,
    cumulative_mb,
    read_metrics,
    run_summary,
    summary_table,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rows(metric_name: str = "exact_match", scale: float = 1.0) -> list[dict[str, Any]]:
    """Return a 4-row run: round 0 baseline plus three training rounds."""
    return [
        {
            "round": 0,
            "clients": 0,
            "train_loss": None,
            "eval_loss": 2.5,
            "eval_metric": 0.10,
            "eval_metric_name": metric_name,
            "bytes_up": 0,
            "bytes_down": 0,
            "seconds": 1.5,
        },
        {
            "round": 1,
            "clients": 2,
            "train_loss": 2.0,
            "eval_loss": 2.0,
            "eval_metric": 0.30,
            "eval_metric_name": metric_name,
            "bytes_up": int(1_000_000 * scale),
            "bytes_down": int(2_000_000 * scale),
            "seconds": 10.0,
            "method": "lora",
        },
        {
            "round": 2,
            "clients": 2,
            "train_loss": 1.5,
            "eval_loss": 1.8,
            "eval_metric": 0.55,
            "eval_metric_name": metric_name,
            "bytes_up": int(1_000_000 * scale),
            "bytes_down": int(2_000_000 * scale),
            "seconds": 9.0,
        },
        {
            "round": 3,
            "clients": 1,
            "train_loss": 1.2,
            "eval_loss": 1.9,
            "eval_metric": 0.50,
            "eval_metric_name": metric_name,
            "bytes_up": int(500_000 * scale),
            "bytes_down": int(1_000_000 * scale),
            "seconds": 5.5,
        },
    ]


def _write(path: Path, rows: list[dict[str, Any]], tail: str = "") -> Path:
    """Write ``rows`` as JSON lines to ``path``, followed by raw ``tail``."""
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + tail, encoding="utf-8"
    )
    return path


def _assert_png(path: Path) -> None:
    """Assert ``path`` is a readable PNG of at least 800x300 pixels."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= 300 and image.shape[1] >= 800
    assert image.std() > 0.01, "image is blank (a single colour)"


def test_read_metrics_round_trips(tmp_path: Path) -> None:
    """Breaks if parsing loses rows, reorders them, or mangles values (null, extra keys)."""
    rows = _rows()
    path = _write(tmp_path / "metrics.jsonl", rows)
    assert read_metrics(path) == rows


def test_read_metrics_skips_blank_lines(tmp_path: Path) -> None:
    """Breaks if an empty line between rows is treated as a corrupt line."""
    rows = _rows()
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert read_metrics(path) == rows[:2]


def test_truncated_last_line_is_ignored_with_warning(tmp_path: Path) -> None:
    """Breaks if a crash mid-write (partial final line) makes the whole run unreadable."""
    rows = _rows()
    path = _write(
        tmp_path / "metrics.jsonl", rows, tail='{"round": 4, "clients": 2, "eval_lo'
    )
    with pytest.warns(UserWarning, match="truncated"):
        assert read_metrics(path) == rows


def test_corrupt_middle_line_raises_naming_line(tmp_path: Path) -> None:
    """Breaks if corruption inside the file is silently skipped or the message lacks file:line."""
    rows = _rows()
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, '{"round": 2, "clients":')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError, match=r"metrics\.jsonl:3\b"):
        read_metrics(path)


def test_complete_but_corrupt_last_line_raises(tmp_path: Path) -> None:
    """Breaks if a newline-terminated bad final line (not a truncation) is silently dropped."""
    path = _write(tmp_path / "metrics.jsonl", _rows(), tail="not json\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ReportError, match=r":5\b"):
            read_metrics(path)


def test_non_object_line_raises(tmp_path: Path) -> None:
    """Breaks if a JSON value that is not a row object (e.g. a list) is accepted."""
    path = _write(tmp_path / "metrics.jsonl", _rows()[:1], tail="[1, 2]\n")
    with pytest.raises(ReportError, match=r":2\b"):
        read_metrics(path)


def test_missing_file_error_names_path(tmp_path: Path) -> None:
    """Breaks if a missing metrics file gives an error that does not say which file."""
    path = tmp_path / "nope" / "metrics.jsonl"
    with pytest.raises(FileNotFoundError, match="nope"):
        read_metrics(path)


def test_cumulative_mb() -> None:
    """Breaks if the running communication totals are not summed across rounds."""
    totals = cumulative_mb(_rows())
    expected = [(0, 0, 0), (1, 2, 3), (2, 4, 6), (2.5, 5, 7.5)]
    assert len(totals) == len(expected)
    for got, want in zip(totals, expected, strict=True):
        assert got == pytest.approx(want)


def test_run_summary_numbers() -> None:
    """Breaks if first/last/best metric, byte totals, rounds or seconds are computed wrongly."""
    summary = run_summary(_rows())
    assert summary["first_metric"] == pytest.approx(0.10)
    assert summary["last_metric"] == pytest.approx(0.50)
    assert summary["best_metric"] == pytest.approx(0.55)
    assert summary["best_round"] == 2
    assert summary["first_eval_loss"] == pytest.approx(2.5)
    assert summary["last_eval_loss"] == pytest.approx(1.9)
    assert summary["bytes_up"] == 2_500_000
    assert summary["bytes_down"] == 5_000_000
    assert summary["total_bytes"] == 7_500_000
    assert summary["rounds"] == 3
    assert summary["client_rounds"] == 5
    assert summary["seconds"] == pytest.approx(26.0)
    assert summary["metric_name"] == "exact_match"


def test_run_summary_empty() -> None:
    """Breaks if summarising a run with no rows crashes instead of reporting None/0."""
    summary = run_summary([])
    assert summary["best_metric"] is None and summary["total_bytes"] == 0
    assert summary["rounds"] == 0


def _cells(table: Any, column: int) -> list[str]:
    """Return the rendered cells of one column of a rich table."""
    return [str(c) for c in table.columns[column]._cells]


def test_summary_table_rows_and_cells() -> None:
    """Breaks if the table drops rounds, mislabels the metric, or misformats values."""
    table = summary_table(_rows("rouge_l"), title="run")
    assert table.row_count == 4
    headers = [str(c.header) for c in table.columns]
    assert "rouge_l" in headers
    assert _cells(table, headers.index("rouge_l")) == [
        "10.0%",
        "30.0%",
        "55.0%",
        "50.0%",
    ]
    assert _cells(table, headers.index("Train loss"))[0] == "-"
    assert _cells(table, headers.index("Cum. MB")) == ["0.00", "3.00", "6.00", "7.50"]


def test_compare_table_one_row_per_run() -> None:
    """Breaks if runs are merged/dropped or MB per client-round is computed wrongly."""
    table = compare_table({"lora": _rows(), "fedkseed": _rows(scale=0)})
    assert table.row_count == 2
    headers = [str(c.header) for c in table.columns]
    assert _cells(table, 0) == ["lora", "fedkseed"]
    assert _cells(table, headers.index("Final")) == ["50.0%", "50.0%"]
    assert _cells(table, headers.index("Total MB")) == ["7.50", "0.00"]
    assert _cells(table, headers.index("MB / client-round")) == ["1.500", "0.000"]


def test_compare_table_keeps_tiny_sizes_visible() -> None:
    """Breaks if kilobyte-scale traffic (seed-based methods) is rounded away to "0.00"."""
    table = compare_table({"fedkseed": _rows(scale=0.001)})
    headers = [str(c.header) for c in table.columns]
    assert _cells(table, headers.index("Total MB")) == ["0.0075"]
    assert _cells(table, headers.index("MB / client-round")) == ["0.0015"]


def _wide_rows() -> list[dict[str, Any]]:
    """Two rounds of long numbers: wider than 80 columns once tabulated."""
    return [
        {
            "round": r,
            "clients": 1000 + r,
            "train_loss": 123456.789012,
            "eval_loss": 0.5,
            "eval_metric": 0.56789,
            "eval_metric_name": "exact_match",
            "bytes_up": 123456789012,
            "bytes_down": 98765432109,
            "seconds": 123456.7,
        }
        for r in (1, 2)
    ]


def test_tables_off_a_terminal_print_every_header_and_digit() -> None:
    """Off a terminal (CI log, ``| tee``) each table row prints whole on one line.

    Breaks if the CLI's report console falls back to rich's 80 columns off a
    terminal, which cut cells to 'Clien…' and '12345…'.
    """
    stream = io.StringIO()
    console = report_console(file=stream)
    assert not console.is_terminal
    label = "lora: pollinate-20261125-124107-a-long-run-folder-name"
    console.print(summary_table(_wide_rows(), title="lora on smollm2-135m"))
    console.print(compare_table({label: _wide_rows()}, title="Pollinate runs"))
    text = stream.getvalue()
    assert "…" not in text
    lines = text.splitlines()
    header = ["Round", "Clients", "Train loss", "Eval loss", "exact_match", "Up MB"]
    header += ["Down MB", "Cum. MB", "Seconds"]
    row = ["2", "1002", "123456.7890", "0.5000", "56.8%", "123456.79", "98765.43"]
    row += ["444444.44", "123456.7"]
    compared = [label, "exact_match", "56.8%", "56.8%", "0.5000", "444444.44"]
    compared += ["221.889"]  # 444444.44 MB over 1001 + 1002 client-rounds
    for cells in (header, row, compared):
        # All cells of the row on one line, in order.
        assert any(re.search(r".*?".join(map(re.escape, cells)), ln) for ln in lines)


def test_tables_on_a_narrow_console_wrap_instead_of_cutting() -> None:
    """A console narrower than the table wraps long values; none ends in '…'.

    Breaks if the table columns go back to rich's default overflow, which
    replaces the end of a value that does not fit by an ellipsis.
    """
    stream = io.StringIO()
    Console(file=stream, width=60).print(summary_table(_wide_rows(), title="run"))
    assert "…" not in stream.getvalue()


def test_plot_run_writes_png(tmp_path: Path) -> None:
    """Breaks if plot_run writes no file, a non-PNG, a tiny/blank image, or leaves temp files."""
    out = plot_run(_rows(), tmp_path / "sub" / "run.png", title="LoRA run")
    assert out == tmp_path / "sub" / "run.png"
    _assert_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["run.png"]


def test_plot_run_single_round(tmp_path: Path) -> None:
    """Breaks if a run with only the round-0 evaluation (train_loss None) cannot be plotted."""
    out = plot_run(_rows()[:1], tmp_path / "single.png", title="baseline only")
    _assert_png(out)


def test_plot_run_empty_raises(tmp_path: Path) -> None:
    """Breaks if an empty run silently writes an empty chart instead of raising."""
    with pytest.raises(ReportError):
        plot_run([], tmp_path / "empty.png", title="empty")
    assert not (tmp_path / "empty.png").exists()


def test_plot_comparison_writes_png(tmp_path: Path) -> None:
    """Breaks if plot_comparison writes no file or an unreadable/too small PNG."""
    runs = {
        "lora": _rows(),
        "fedkseed": _rows(scale=0.001)[:3],
        "sfprompt": _rows()[:1],
    }
    out = plot_comparison(runs, tmp_path / "compare.png", title="methods")
    _assert_png(out)


def test_plot_comparison_skips_empty_run(tmp_path: Path) -> None:
    """Breaks if an empty run crashes the comparison instead of being skipped with a warning."""
    with pytest.warns(UserWarning, match="no rows"):
        out = plot_comparison({"lora": _rows(), "empty": []}, tmp_path / "c.png", "t")
    _assert_png(out)


def test_private_runs_show_epsilon_and_clipped_columns() -> None:
    """Rows with ``epsilon``/``clipped`` add those columns to the per-round
    table and the final epsilon to the summary and the comparison table; a
    run without them keeps the plain columns."""
    rows = _rows()
    private = [dict(r, epsilon=0.5 * i, clipped=i % 2) for i, r in enumerate(rows)]
    headers = [c.header for c in summary_table(private, "t").columns]
    assert headers[-2:] == ["Clipped", "Epsilon"]
    assert "Epsilon" not in [c.header for c in summary_table(rows, "t").columns]
    assert run_summary(private)["epsilon"] == pytest.approx(0.5 * (len(rows) - 1))
    assert run_summary(rows)["epsilon"] is None
    table = compare_table({"dp": private, "plain": rows})
    assert table.columns[-1].header == "Epsilon"
    assert list(table.columns[-1].cells) == [f"{0.5 * (len(rows) - 1):.3g}", "-"]
