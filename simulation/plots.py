"""PNG charts of federated runs built from ``metrics.jsonl`` rows.

This module owns the figures: :func:`plot_run` (one run: metric with its
bootstrap 95% interval as error bars and eval loss per round, cumulative
communication per round) and :func:`plot_comparison` (several runs: metric
per round and per cumulative MB, with error bars). Rounds not evaluated
(``eval.every``) are left out of the metric and loss curves, which join the
evaluated rounds. It uses matplotlib's object-oriented API (:class:`~matplotlib.figure.Figure`
with an Agg canvas), so no global pyplot state or backend is touched, and
writes files atomically. Parsing and numeric helpers come from
:mod:`simulation.reports`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from protocols.durable import atomic_write
from simulation.reports import ReportError, cumulative_mb, metric_name

__all__ = ["plot_comparison", "plot_run"]

_FIGSIZE: tuple[float, float] = (10.0, 4.0)
_DPI: int = 120

Row = Mapping[str, Any]


def _value(row: Row, key: str, scale: float = 1.0) -> float:
    """Return ``row[key] * scale`` as a float, or NaN when missing/non-numeric."""
    value = row.get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value) * scale


def _rounds(rows: Sequence[Row]) -> list[float]:
    """Return the x positions (round numbers, NaN if missing) of ``rows``."""
    return [_value(row, "round") for row in rows]


def _round_axis(ax: Axes, rounds: Sequence[float]) -> None:
    """Label the x axis "Round" with integer ticks, widening a one-round range."""
    ax.set_xlabel("Round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    finite = [r for r in rounds if math.isfinite(r)]
    if finite and min(finite) == max(finite):
        ax.set_xlim(finite[0] - 0.5, finite[0] + 0.5)
        ax.set_xticks([finite[0]])


def _legend_below(ax: Axes, handles: Sequence[Any] | None = None) -> None:
    """Put the legend under ``ax`` (below the x label) so it never hides data."""
    kwargs: dict[str, Any] = {} if handles is None else {"handles": list(handles)}
    ax.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, -0.16),
        ncol=3,
        frameon=False,
        fontsize="small",
        **kwargs,
    )


def _new_figure() -> Figure:
    """Create a figure of the standard size attached to an Agg canvas."""
    fig = Figure(figsize=_FIGSIZE, dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save_atomic(fig: Figure, out_path: Path) -> Path:
    """Save ``fig`` as PNG to ``out_path`` atomically (:mod:`protocols.durable`).

    Parameters
    ----------
    fig : Figure
        The figure to save.
    out_path : Path
        Destination; its parent folder is created if needed.

    Returns
    -------
    Path
        ``out_path``.
    """
    out_path = Path(out_path)
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI))
    return out_path


def _evaluated(rows: Sequence[Row]) -> list[Row]:
    """The rows whose round was evaluated (a finite metric or eval loss)."""
    return [
        r
        for r in rows
        if math.isfinite(_value(r, "eval_metric"))
        or math.isfinite(_value(r, "eval_loss"))
    ]


def _metric_errors(rows: Sequence[Row]) -> list[list[float]] | None:
    """Error bar lengths (percent points, below and above) of the metric.

    Zero where a row has no interval; ``None`` when no row has one.
    """
    below: list[float] = []
    above: list[float] = []
    for r in rows:
        value = _value(r, "eval_metric", 100.0)
        low = _value(r, "eval_metric_low", 100.0)
        high = _value(r, "eval_metric_high", 100.0)
        known = all(math.isfinite(x) for x in (value, low, high))
        below.append(max(value - low, 0.0) if known else 0.0)
        above.append(max(high - value, 0.0) if known else 0.0)
    return [below, above] if any(below) or any(above) else None


def _metric_curve(
    ax: Axes, x: Sequence[float], rows: Sequence[Row], **style: Any
) -> Any:
    """Plot the metric (percent) at ``x`` with its interval as error bars.

    Returns the :class:`~matplotlib.container.ErrorbarContainer` (a legend
    handle; ``.lines[0]`` is the data line).
    """
    return ax.errorbar(
        x,
        [_value(r, "eval_metric", 100.0) for r in rows],
        yerr=_metric_errors(rows),
        marker="o",
        capsize=3,
        **style,
    )


def _draw_metric_panel(ax: Axes, rows: Sequence[Row], name: str) -> None:
    """Draw metric (percent, 95% error bars) and eval loss (twin axis, dashed).

    Only evaluated rounds are drawn; the x axis spans every round.
    """
    all_rounds = _rounds(rows)
    rows = _evaluated(rows)
    rounds = _rounds(rows)
    label = f"{name} (%)" if _metric_errors(rows) is None else f"{name} (%, 95% CI)"
    metric_line = _metric_curve(ax, rounds, rows, color="tab:blue", label=label)
    loss_ax = ax.twinx()
    (loss_line,) = loss_ax.plot(
        rounds,
        [_value(r, "eval_loss") for r in rows],
        marker="s",
        markersize=4,
        linestyle="--",
        color="tab:red",
        label="eval loss",
    )
    _round_axis(ax, all_rounds)
    ax.set_ylabel(f"{name} (%)")
    loss_ax.set_ylabel("Eval loss")
    ax.grid(True, alpha=0.3)
    ax.set_title("Evaluation")
    _legend_below(ax, [metric_line, loss_line])


def _draw_comm_panel(ax: Axes, rows: Sequence[Row]) -> None:
    """Draw cumulative upload, download and total communication per round."""
    rounds = _rounds(rows)
    totals = cumulative_mb(rows)
    ax.plot(rounds, [t[0] for t in totals], marker="^", label="up (to server)")
    ax.plot(rounds, [t[1] for t in totals], marker="v", label="down (to clients)")
    ax.plot(rounds, [t[2] for t in totals], marker="o", color="black", label="total")
    _round_axis(ax, rounds)
    ax.set_ylabel("Cumulative communication (MB)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title("Communication")
    _legend_below(ax)


def plot_run(rows: Sequence[Row], out_path: Path, title: str) -> Path:
    """Plot one run's evaluation and communication curves to a PNG.

    Parameters
    ----------
    rows : sequence of mapping
        Per-round rows as returned by :func:`simulation.reports.read_metrics`.
        Missing or ``null`` values leave gaps; a single row is fine.
    out_path : Path
        PNG file to write (atomically; parent folders are created).
    title : str
        Figure title.

    Returns
    -------
    Path
        ``out_path``.

    Raises
    ------
    ReportError
        If ``rows`` is empty.
    """
    if not rows:
        raise ReportError(f"no rows to plot for {out_path}")
    fig = _new_figure()
    left, right = fig.subplots(1, 2)
    _draw_metric_panel(left, rows, metric_name(rows))
    _draw_comm_panel(right, rows)
    fig.suptitle(title)
    fig.tight_layout()
    return _save_atomic(fig, out_path)


def _wide_spread(totals: Sequence[float], ratio: float = 100.0) -> bool:
    """Return whether positive ``totals`` span at least ``ratio`` (log axis)."""
    positive = [t for t in totals if t > 0]
    return len(positive) >= 2 and max(positive) / min(positive) >= ratio


def plot_comparison(
    runs: Mapping[str, Sequence[Row]], out_path: Path, title: str
) -> Path:
    """Plot several runs' metric per round and per cumulative MB to a PNG.

    Parameters
    ----------
    runs : mapping of str to sequence of mapping
        Run label (e.g. ``"lora"``) to that run's rows. Runs with no rows are
        skipped with a warning.
    out_path : Path
        PNG file to write (atomically; parent folders are created).
    title : str
        Figure title.

    Returns
    -------
    Path
        ``out_path``.

    Raises
    ------
    ReportError
        If no run has any rows.
    """
    for label, rows in runs.items():
        if not rows:
            warnings.warn(
                f"run {label!r} has no rows; left out of {out_path}", stacklevel=2
            )
    present = {label: rows for label, rows in runs.items() if rows}
    if not present:
        raise ReportError(f"no runs with rows to plot for {out_path}")
    names = {metric_name(rows) for rows in present.values()}
    ylabel = f"{names.pop()} (%)" if len(names) == 1 else "Eval metric (%)"
    fig = _new_figure()
    by_round, by_mb = fig.subplots(1, 2, sharey=True)
    for label, rows in present.items():
        mb = [t[2] for t in cumulative_mb(rows)]  # over every row, evaluated or not
        kept = [
            (row, total)
            for row, total in zip(rows, mb, strict=True)
            if math.isfinite(_value(row, "eval_metric"))
        ]
        shown = [row for row, _ in kept]
        curve = _metric_curve(by_round, _rounds(shown), shown, label=label)
        _metric_curve(
            by_mb,
            [total for _, total in kept],
            shown,
            label=label,
            color=curve.lines[0].get_color(),
        )
    _round_axis(by_round, [r for rows in present.values() for r in _rounds(rows)])
    by_mb.set_xlabel("Cumulative communication, up + down (MB)")
    if _wide_spread([cumulative_mb(rows)[-1][2] for rows in present.values()]):
        # Methods can differ by orders of magnitude (e.g. seeds vs adapters).
        by_mb.set_xscale("log", nonpositive="mask")
        by_mb.set_xlabel("Cumulative communication, up + down (MB, log scale)")
    by_round.set_ylabel(ylabel)
    by_round.set_title("Metric per round")
    by_mb.set_title("Metric per MB communicated")
    by_round.grid(True, alpha=0.3)
    by_mb.grid(True, alpha=0.3)
    _legend_below(by_mb)  # same runs and colours in both panels: one legend
    fig.suptitle(title)
    fig.tight_layout()
    return _save_atomic(fig, out_path)
