"""Results files (JSON and markdown) and markdown tables built from row dicts."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.harness.paths import RESULTS_DIR


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (non-JSON values as ``str``); return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str))
    return path


def read_json(path: Path) -> Any:
    """The JSON value in ``path``."""
    return json.loads(Path(path).read_text())


def write_results(
    stem: str,
    results: Mapping[str, Any],
    table: str | None = None,
    *,
    out_dir: Path = RESULTS_DIR,
) -> Path:
    """Write ``<stem>.json`` (and ``<stem>.md`` when ``table`` is given).

    Returns
    -------
    Path
        The JSON file.
    """
    path = write_json(out_dir / f"{stem}.json", results)
    if table is not None:
        (out_dir / f"{stem}.md").write_text(table)
    return path


def merge_records(
    existing: Iterable[Mapping[str, Any]],
    new: Mapping[str, Any],
    key: Callable[[Mapping[str, Any]], Any],
) -> list[Any]:
    """``existing`` without the records that share ``key`` with ``new``, then ``new``.

    How a benchmark that keeps runs of several sizes in one results file
    replaces the run it just measured again.
    """
    k = key(new)
    return [r for r in existing if key(r) != k] + [new]


REPORT_COLUMNS = ("section", "quantity", "value", "how measured")
"""The columns of a sectioned benchmark's report table (one row per quantity)."""


def report_row(section: str, quantity: str, value: str, how: str) -> dict[str, str]:
    """One row of a report table, keyed by :data:`REPORT_COLUMNS`."""
    return dict(zip(REPORT_COLUMNS, (section, quantity, value, how), strict=True))


def markdown_table(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    align: str = "",
    compact: bool = False,
) -> list[str]:
    """The lines of a markdown table built from row dicts.

    Parameters
    ----------
    rows : Iterable[Mapping[str, Any]]
        One dict per row, keyed by column title; values are formatted with
        ``str`` (a missing key is an empty cell).
    columns : Sequence[str]
        Column titles, in order.
    align : str
        One letter per column, ``"l"`` or ``"r"`` (default all left).
    compact : bool
        Separator row without spaces (``|---|---:|``) instead of
        ``| --- | ---: |``.

    Returns
    -------
    list[str]
        Header, separator and one line per row, without newlines.
    """
    marks = [
        "---:" if (align[i : i + 1] == "r") else "---" for i in range(len(columns))
    ]
    if compact:
        sep = "|" + "|".join(marks) + "|"
    else:
        sep = "| " + " | ".join(marks) + " |"
    lines = ["| " + " | ".join(columns) + " |", sep]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return lines
