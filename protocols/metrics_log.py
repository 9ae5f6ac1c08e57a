"""``metrics.jsonl``: one JSON object per round, appended durably, read strictly.

The writer appends one fsync'ed line per round; a crash can tear only the
last line, which readers skip with a warning. Every other damage (a line that
is not UTF-8 JSON, not an object, without an integer ``round``, or with a
known field of the wrong type) is a :class:`MetricsError` naming the file and
line. :class:`protocols.run_folder.RunFolder` hands these out for its run.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from protocols.durable import append_line, atomic_write_text
from protocols.run_errors import MetricsError, one_line, wrong_type

__all__ = ["MetricsLog", "read_metrics"]

_NUMBER = (int, float)
# The types of the fields other code reads from a row (reports, progress bar).
_ROW_TYPES: dict[str, tuple[type, ...]] = {
    "clients": (int,),
    "rejected": (int,),
    "bytes_up": (int,),
    "bytes_down": (int,),
    "train_loss": (*_NUMBER, type(None)),
    "eval_loss": (*_NUMBER, type(None)),
    "eval_metric": (*_NUMBER, type(None)),
    "seconds": (*_NUMBER, type(None)),
    # Null on a round not evaluated (eval.every).
    "eval_metric_name": (str, type(None)),
    "eval_metric_low": (*_NUMBER, type(None)),
    "eval_metric_high": (*_NUMBER, type(None)),
    "eval_examples": (int, type(None)),
    "eval_s": (*_NUMBER, type(None)),
    "method": (str,),
}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` into a list of per-round dicts, in file order.

    Blank lines are skipped. A final line without its newline that is not
    valid JSON (the writer died mid-write) is ignored with a warning.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist; the message names the path.
    MetricsError
        If a line is not valid UTF-8 JSON, not an object, lacks an integer
        ``round`` or has a known field of the wrong type; the message names
        the file and the 1-based line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"metrics file not found: {path}") from None
    except OSError as exc:
        raise MetricsError(f"{path} is unreadable: {one_line(exc)}") from None
    lines = data.split(b"\n")
    # "a\n" splits into ["a", ""]; a last element with text is unterminated.
    unterminated_last = len(lines) - 1 if lines[-1].strip() else None
    rows: list[dict[str, Any]] = []
    for index, raw in enumerate(lines):
        if not raw.strip():
            continue
        lineno = index + 1
        try:
            row = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            if index == unterminated_last:
                warnings.warn(
                    f"{path}:{lineno}: ignoring truncated final line ({one_line(exc)})",
                    stacklevel=2,
                )
                break
            raise MetricsError(
                f"{path}:{lineno} is damaged: not valid JSON ({one_line(exc)})"
            ) from None
        if not isinstance(row, dict):
            raise MetricsError(
                f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
            )
        rnd = row.get("round")
        if not isinstance(rnd, int) or isinstance(rnd, bool):
            raise MetricsError(
                f"{path}:{lineno}: missing or non-integer 'round': {rnd!r}"
            )
        wrong = wrong_type(row, _ROW_TYPES)
        if wrong:
            raise MetricsError(f"{path}:{lineno} is damaged: {wrong}")
        rows.append(row)
    return rows


class MetricsLog:
    """Appends one JSON object per round to ``metrics.jsonl``, durably."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, server_round: int) -> None:
        """Drop rows past ``server_round`` (and a torn last line), atomically.

        Raises
        ------
        MetricsError
            If a line other than a torn last one is damaged: it is not
            silently dropped.
        """
        if not self.path.exists():
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a torn last line is expected here
            rows = read_metrics(self.path)
        kept = [json.dumps(r) for r in rows if r["round"] <= server_round]
        atomic_write_text(self.path, "".join(f"{k}\n" for k in kept))

    def append(self, row: Mapping[str, Any]) -> None:
        """Append ``row`` as one line and fsync it (NaN/Inf are refused)."""
        append_line(self.path, json.dumps(dict(row), allow_nan=False))
