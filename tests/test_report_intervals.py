"""Intervals, rounds not evaluated and evaluation seconds in tables and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure

from simulation.plots import _draw_metric_panel, plot_comparison, plot_run
from simulation.reports import (
    compare_table,
    interval_verdicts,
    run_summary,
    summary_table,
)


def _rows() -> list[dict[str, Any]]:
    """Rounds 0..4 evaluated every 2 rounds plus the last (0, 2, 4)."""
    rows: list[dict[str, Any]] = []
    for r in range(5):
        evaluated = r % 2 == 0
        metric = (r + 1) / 8  # exact in binary: 0.125, 0.375, 0.625
        rows.append(
            {
                "round": r,
                "clients": 0 if r == 0 else 2,
                "train_loss": None if r == 0 else 1.0,
                "eval_loss": 2.0 - 0.1 * r if evaluated else None,
                "eval_metric": metric if evaluated else None,
                "eval_metric_name": "rouge_l" if evaluated else None,
                "eval_metric_low": metric - 0.05 if evaluated else None,
                "eval_metric_high": metric + 0.1 if evaluated else None,
                "eval_examples": 300 if evaluated else None,
                "eval_s": 2.5 * (r + 1) if evaluated else None,
                "bytes_up": 1000 * r,
                "bytes_down": 2000 * r,
                "seconds": 3.0 * (r + 1),
                "method": "lora",
            }
        )
    return rows


def _cells(table: Any, header: str) -> list[str]:
    headers = [str(c.header) for c in table.columns]
    return [str(c) for c in table.columns[headers.index(header)]._cells]


def test_summary_table_shows_intervals_nulls_and_eval_seconds() -> None:
    """Evaluated rounds read 'value% [low, high]', the others '-', and the
    evaluation's seconds get their own column. Breaks if the interval is
    dropped or misplaced, or a null row is shown as 0."""
    table = summary_table(_rows(), title="run")
    assert _cells(table, "rouge_l") == [
        "12.5% [7.5, 22.5]",
        "-",
        "37.5% [32.5, 47.5]",
        "-",
        "62.5% [57.5, 72.5]",
    ]
    assert _cells(table, "Eval s") == ["2.5", "-", "7.5", "-", "12.5"]
    assert _cells(table, "Eval loss")[1] == "-"
    plain = [{k: v for k, v in row.items() if k != "eval_s"} for row in _rows()]
    assert "Eval s" not in [str(c.header) for c in summary_table(plain, "t").columns]


def test_run_summary_and_compare_use_the_last_evaluated_row() -> None:
    """A run whose last row is not evaluated reports the last evaluated one."""
    rows = _rows()[:4]  # ends on round 3, not evaluated
    summary = run_summary(rows)
    assert summary["last_metric"] == 0.375 and summary["last_metric_round"] == 2
    assert summary["last_metric_low"] == pytest.approx(0.325)
    assert summary["last_metric_high"] == pytest.approx(0.475)
    table = compare_table({"lora": rows})
    assert _cells(table, "Final") == ["37.5% [32.5, 47.5]"]


def test_interval_verdicts_per_pair() -> None:
    """One line per pair, in order; disjoint intervals name the higher run,
    overlapping ones say no clear difference, other metrics are refused."""
    low = _rows()[:3]  # last evaluated: round 2, 0.375 [0.325, 0.475]
    high = _rows()  # round 4, 0.625 [0.575, 0.725]
    other = [dict(r, eval_metric_name="exact_match") for r in _rows()]
    lines = interval_verdicts({"low": low, "high": high, "same": high, "em": other})
    assert len(lines) == 6
    assert lines[0].startswith("low vs high: high above low beyond both 95% intervals")
    assert lines[3].startswith("high vs same: intervals overlap: no clear difference")
    assert "different metrics (rouge_l vs exact_match): not comparable" in lines[2]


def test_metric_panel_draws_error_bars_on_evaluated_rounds_only() -> None:
    """The metric curve has points at rounds 0, 2, 4 only, with error bars
    from low to high (percent). Breaks if unevaluated rounds are plotted, the
    bars are missing, or they span the wrong values."""
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    _draw_metric_panel(ax, _rows(), "rouge_l")
    (container,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert container.has_yerr
    data_line, _caps, (bars,) = container.lines
    assert list(data_line.get_xdata()) == [0.0, 2.0, 4.0]
    assert np.allclose(data_line.get_ydata(), [12.5, 37.5, 62.5])
    spans = [seg[:, 1] for seg in bars.get_segments()]
    assert np.allclose(spans, [[7.5, 22.5], [32.5, 47.5], [57.5, 72.5]])
    assert ax.get_xlim()[1] >= 4.0


def test_plots_with_skipped_rounds_write_pngs(tmp_path: Path) -> None:
    """plot_run and plot_comparison accept rows with null eval fields."""
    out = plot_run(_rows(), tmp_path / "run.png", title="every 2")
    other = [dict(r, eval_metric_low=None, eval_metric_high=None) for r in _rows()]
    cmp = plot_comparison({"a": _rows(), "b": other}, tmp_path / "c.png", title="t")
    for path in (out, cmp):
        image = matplotlib.image.imread(path)
        assert image.shape[0] >= 300 and image.std() > 0.01
