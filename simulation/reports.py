"""Reading and tabulating per-round federated metrics (``metrics.jsonl``).

The run folder (:mod:`protocols.run_folder`) owns ``metrics.jsonl``'s format
and its reader (:func:`read_metrics`, re-exported here); this module owns
what reports make of it: the numeric summaries
derived from it (:func:`run_summary`, :func:`cumulative_mb`,
:func:`metric_name`), the ``rich`` tables shown to users
(:func:`summary_table`, :func:`compare_table`). Plotting lives in
:mod:`simulation.plots`, which builds on the helpers here.

Tables never cut a value: a cell too narrow for its value wraps it onto the
next line instead of ending it in ``…``. The ``pollinate`` command prints
them off a terminal (CI logs, ``| tee``) on a console wide enough for their
natural width, one line per row.

Each line of ``metrics.jsonl`` is one JSON object per round with at least
``round``, ``clients``, ``train_loss``, ``eval_loss``, ``eval_metric``,
``eval_metric_name``, ``bytes_up``, ``bytes_down`` and ``seconds``; an
evaluated row also has ``eval_metric_low``/``eval_metric_high`` (the metric's
bootstrap 95% interval), ``eval_examples`` and ``eval_s``, and a row not
evaluated (``eval.every``) has them all null. Unknown keys are ignored;
missing or ``null`` values are shown as ``"-"``. A metric with an interval
reads ``value% [low, high]``; :func:`interval_verdicts` says whether runs'
final metrics differ beyond their intervals.

Sizes are reported in decimal megabytes (1 MB = 1,000,000 bytes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from rich.table import Table

from protocols.run_folder import MetricsError, read_metrics

__all__ = [
    "MB",
    "ReportError",
    "compare_table",
    "cumulative_mb",
    "interval_verdicts",
    "metric_name",
    "read_metrics",
    "run_summary",
    "summary_table",
]

MB: float = 1_000_000.0
"""Bytes per (decimal) megabyte used in every table and plot."""

_MISSING = "-"

Row = Mapping[str, Any]


ReportError = MetricsError
"""Raised when a metrics file or its rows cannot be interpreted."""


def _num(value: Any) -> float | None:
    """Return ``value`` as a float, or ``None`` if it is missing or not numeric."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _bytes(row: Row, key: str) -> int:
    """Return a byte counter from ``row``, treating missing/invalid as 0."""
    value = _num(row.get(key))
    return 0 if value is None or not math.isfinite(value) else int(value)


def _fmt(value: Any, spec: str) -> str:
    """Format a number with ``spec``, or ``"-"`` if it is missing."""
    number = _num(value)
    return _MISSING if number is None else format(number, spec)


def _fmt_mb(value: Any, decimals: int = 2) -> str:
    """Format a size in MB with fixed decimals, or 3 significant digits if small.

    Fixed decimals are used while they keep at least two significant digits;
    seed-based methods send kilobytes per round and ``"0.00"`` would hide that.
    """
    number = _num(value)
    if number is None:
        return _MISSING
    if number == 0 or abs(number) >= 10 ** (1 - decimals) or not math.isfinite(number):
        return f"{number:.{decimals}f}"
    return f"{number:.3g}"


def _fmt_pct(value: Any) -> str:
    """Format a metric in [0, 1] as a percentage with one decimal."""
    number = _num(value)
    return _MISSING if number is None else f"{number * 100:.1f}%"


def _fmt_interval(value: Any, low: Any, high: Any) -> str:
    """A metric as ``"45.0% [40.0, 50.0]"`` (percent), or bare without an interval."""
    lo, hi = _num(low), _num(high)
    if _num(value) is None or lo is None or hi is None:
        return _fmt_pct(value)
    return f"{_fmt_pct(value)} [{lo * 100:.1f}, {hi * 100:.1f}]"


def metric_name(rows: Sequence[Row], default: str = "metric") -> str:
    """Return the evaluation metric's name used by a run.

    Parameters
    ----------
    rows : sequence of mapping
        Per-round rows as returned by :func:`read_metrics`.
    default : str, optional
        Name returned when no row carries ``eval_metric_name``.

    Returns
    -------
    str
        The distinct names found, in order of appearance, joined by ``"/"``
        (normally exactly one name), or ``default``.
    """
    names: list[str] = []
    for row in rows:
        name = row.get("eval_metric_name")
        if isinstance(name, str) and name and name not in names:
            names.append(name)
    return "/".join(names) if names else default


def cumulative_mb(rows: Sequence[Row]) -> list[tuple[float, float, float]]:
    """Return running communication totals after each row.

    Parameters
    ----------
    rows : sequence of mapping
        Per-round rows as returned by :func:`read_metrics`.

    Returns
    -------
    list of tuple of float
        For each row, ``(up_mb, down_mb, total_mb)`` summed over that row and
        all rows before it. Missing byte counts count as 0.
    """
    up = down = 0
    totals: list[tuple[float, float, float]] = []
    for row in rows:
        up += _bytes(row, "bytes_up")
        down += _bytes(row, "bytes_down")
        totals.append((up / MB, down / MB, (up + down) / MB))
    return totals


def _column(
    table: Table, header: str, justify: Literal["left", "right"] = "right"
) -> None:
    """Add a column whose values wrap, never end in ``…``, when space is short."""
    table.add_column(header, justify=justify, overflow="fold")


def summary_table(rows: Sequence[Row], title: str) -> Table:
    """Build a per-round table of a single run.

    Parameters
    ----------
    rows : sequence of mapping
        Per-round rows as returned by :func:`read_metrics`.
    title : str
        Table title.

    Returns
    -------
    rich.table.Table
        One row per round with columns: round, clients, train loss, eval loss,
        the metric (header = metric name, value in percent, followed by its
        bootstrap 95% interval ``[low, high]`` when the row has one), up MB,
        down MB, cumulative MB (up + down) and seconds; then, when any row has
        them, the seconds of the evaluation, the clients whose update was
        clipped and the cumulative epsilon of a differentially private run.
        Missing values (rounds not evaluated too) are ``"-"``.
    """
    table = Table(title=title)
    optional = [
        (key, header, spec)
        for key, header, spec in _OPTIONAL_COLUMNS
        if any(key in row for row in rows)
    ]
    for header in (
        "Round",
        "Clients",
        "Train loss",
        "Eval loss",
        metric_name(rows),
        "Up MB",
        "Down MB",
        "Cum. MB",
        "Seconds",
        *(header for _, header, _ in optional),
    ):
        _column(table, header)
    for row, (_, _, cum_total) in zip(rows, cumulative_mb(rows), strict=True):
        table.add_row(
            _fmt(row.get("round"), ".0f"),
            _fmt(row.get("clients"), ".0f"),
            _fmt(row.get("train_loss"), ".4f"),
            _fmt(row.get("eval_loss"), ".4f"),
            _fmt_interval(
                row.get("eval_metric"),
                row.get("eval_metric_low"),
                row.get("eval_metric_high"),
            ),
            _fmt_mb(_mb_or_none(row.get("bytes_up"))),
            _fmt_mb(_mb_or_none(row.get("bytes_down"))),
            _fmt_mb(cum_total),
            _fmt(row.get("seconds"), ".1f"),
            *(_fmt(row.get(key), spec) for key, _, spec in optional),
        )
    return table


_OPTIONAL_COLUMNS = (
    ("eval_s", "Eval s", ".1f"),
    ("clipped", "Clipped", ".0f"),
    ("epsilon", "Epsilon", ".3g"),
)
"""Row keys shown only by runs that have them: (key, header, format)."""


def _is_int(value: Any) -> bool:
    """Return whether ``value`` is an int (and not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _mb_or_none(value: Any) -> float | None:
    """Convert a byte count to MB, keeping ``None`` for missing values."""
    number = _num(value)
    return None if number is None else number / MB


def _finite(values: Sequence[Any]) -> list[float]:
    """Return the finite numeric values of ``values`` in order."""
    numbers = (_num(v) for v in values)
    return [n for n in numbers if n is not None and math.isfinite(n)]


def run_summary(rows: Sequence[Row]) -> dict[str, Any]:
    """Summarise a run's rows into headline numbers.

    Parameters
    ----------
    rows : sequence of mapping
        Per-round rows as returned by :func:`read_metrics`.

    Returns
    -------
    dict
        Keys: ``metric_name``; ``first_metric``, ``last_metric``,
        ``best_metric`` and ``best_round`` (first and last finite
        ``eval_metric`` in row order, its maximum and the round reaching it);
        ``last_metric_low``, ``last_metric_high`` (the interval of the last
        evaluated row, ``None`` when it has none) and ``last_metric_round``;
        ``first_eval_loss``, ``last_eval_loss``; ``bytes_up``, ``bytes_down``,
        ``total_bytes`` (sums over all rows); ``rounds`` (rows with
        ``round >= 1``, i.e. training rounds); ``client_rounds`` (sum of
        ``clients``); ``seconds`` (sum of ``seconds``). Values that cannot be
        computed (e.g. no metric reported) are ``None``; ``epsilon`` (the last
        cumulative epsilon of a differentially private run) is ``None`` for a
        run without DP.
    """
    metrics = _finite([row.get("eval_metric") for row in rows])
    evaluated = [row for row in rows if _finite([row.get("eval_metric")])]
    last_row = evaluated[-1] if evaluated else {}
    losses = _finite([row.get("eval_loss") for row in rows])
    best_metric = max(metrics) if metrics else None
    best_round = None
    if best_metric is not None:
        best_round = next(
            row.get("round")
            for row in rows
            if _num(row.get("eval_metric")) == best_metric
        )
    bytes_up = sum(_bytes(row, "bytes_up") for row in rows)
    bytes_down = sum(_bytes(row, "bytes_down") for row in rows)
    training_rounds = [r for r in rows if _is_int(r.get("round")) and r["round"] >= 1]
    epsilons = _finite([row.get("epsilon") for row in rows])
    return {
        "metric_name": metric_name(rows),
        "first_metric": metrics[0] if metrics else None,
        "last_metric": metrics[-1] if metrics else None,
        "last_metric_low": _num(last_row.get("eval_metric_low")),
        "last_metric_high": _num(last_row.get("eval_metric_high")),
        "last_metric_round": last_row.get("round"),
        "best_metric": best_metric,
        "best_round": best_round,
        "first_eval_loss": losses[0] if losses else None,
        "last_eval_loss": losses[-1] if losses else None,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "total_bytes": bytes_up + bytes_down,
        "rounds": len(training_rounds),
        "client_rounds": sum(_bytes(row, "clients") for row in rows),
        "seconds": sum(_finite([row.get("seconds") for row in rows])),
        "epsilon": epsilons[-1] if epsilons else None,
    }


def compare_table(
    runs: Mapping[str, Sequence[Row]], title: str = "Run comparison"
) -> Table:
    """Build a table comparing several runs, one row per run label.

    Parameters
    ----------
    runs : mapping of str to sequence of mapping
        Run label (e.g. ``"lora"``, ``"fedkseed"``) to that run's rows.
    title : str, optional
        Table title.

    Returns
    -------
    rich.table.Table
        Columns: run, metric name, final metric (percent, with its bootstrap
        95% interval when recorded), best metric
        (percent), final eval loss, rounds, total MB (up + down) and MB per
        client-round (total MB divided by the sum of ``clients``; ``"-"`` when
        no client replied), and the final epsilon when any run is
        differentially private. Missing values are ``"-"``.
    """
    table = Table(title=title)
    _column(table, "Run", justify="left")
    _column(table, "Metric", justify="left")
    summaries = {label: run_summary(rows) for label, rows in runs.items()}
    private = any(s["epsilon"] is not None for s in summaries.values())
    for header in (
        "Final",
        "Best",
        "Final eval loss",
        "Rounds",
        "Total MB",
        "MB / client-round",
        *(("Epsilon",) if private else ()),
    ):
        _column(table, header)
    for label, summary in summaries.items():
        total_mb = summary["total_bytes"] / MB
        client_rounds = summary["client_rounds"]
        per_client = total_mb / client_rounds if client_rounds > 0 else None
        table.add_row(
            label,
            summary["metric_name"],
            _fmt_interval(
                summary["last_metric"],
                summary["last_metric_low"],
                summary["last_metric_high"],
            ),
            _fmt_pct(summary["best_metric"]),
            _fmt(summary["last_eval_loss"], ".4f"),
            str(summary["rounds"]),
            _fmt_mb(total_mb),
            _fmt_mb(per_client, decimals=3),
            *((_fmt(summary["epsilon"], ".3g"),) if private else ()),
        )
    return table


def _final(label: str, summary: Mapping[str, Any]) -> str:
    """``"label 45.0% [40.0, 50.0]"``: a run's final metric for a verdict line."""
    value = _fmt_interval(
        summary["last_metric"], summary["last_metric_low"], summary["last_metric_high"]
    )
    return f"{label} {value}"


def _verdict(
    first: str, a: Mapping[str, Any], second: str, b: Mapping[str, Any]
) -> str:
    """One line on whether two run summaries' final metrics differ beyond intervals."""
    head = f"{first} vs {second}: "
    if a["last_metric"] is None or b["last_metric"] is None:
        return head + "no evaluated round in one of the runs: cannot tell"
    if a["metric_name"] != b["metric_name"]:
        names = f"{a['metric_name']} vs {b['metric_name']}"
        return head + f"different metrics ({names}): not comparable"
    values = f" ({_final(first, a)}, {_final(second, b)})"
    a_low, a_high = a["last_metric_low"], a["last_metric_high"]
    b_low, b_high = b["last_metric_low"], b["last_metric_high"]
    if None in (a_low, a_high, b_low, b_high):
        return head + "no interval recorded: cannot tell" + values
    if a_low > b_high:
        return head + f"{first} above {second} beyond both 95% intervals" + values
    if b_low > a_high:
        return head + f"{second} above {first} beyond both 95% intervals" + values
    return head + "intervals overlap: no clear difference" + values


def interval_verdicts(runs: Mapping[str, Sequence[Row]]) -> list[str]:
    """Say, for each pair of runs, whether their final task metrics differ.

    Uses each run's last evaluated row (:func:`run_summary`). Two runs differ
    when one's bootstrap 95% interval lies wholly above the other's (the
    intervals do not overlap); otherwise there is no clear difference.

    Parameters
    ----------
    runs : mapping of str to sequence of mapping
        Run label to that run's rows, in the order to compare them.

    Returns
    -------
    list of str
        One line per pair ``(A, B)``, A before B in ``runs``: ``"A vs B: A
        above B beyond both 95% intervals (...)"``, ``"A vs B: intervals
        overlap: no clear difference (...)"``, or why it cannot tell (no
        evaluated round, no interval recorded, different metrics).
    """
    summaries = {label: run_summary(rows) for label, rows in runs.items()}
    labels = list(summaries)
    return [
        _verdict(first, summaries[first], second, summaries[second])
        for i, first in enumerate(labels)
        for second in labels[i + 1 :]
    ]
