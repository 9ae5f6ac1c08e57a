"""One protocol run: a real federation in this process, summarised.

The run itself is :func:`bench.harness.run_in_process` (the server's round
loop against an in-process grid that hands each real Flower message to
Pollinate's ClientApp); the numbers come from its run folder, read before
the scratch folder goes: the metrics rows, and which groups (NI tasks, Dolly
categories) the clients' data files and the held-out file hold, so the
results show that no client trained on a held-out group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.harness import read_json, run_in_process


def _mean(values: list[float] | None) -> float | None:
    return sum(values) / len(values) if values else None


def _groups(path: Path) -> list[str]:
    """The distinct groups of a run folder's data file (read by ``corpora``)."""
    from corpora import load_examples

    return sorted({e.group for e in load_examples(str(path))})


def data_groups(run_dir: Path) -> dict[str, Any]:
    """Which groups the clients train on and which the evaluation scores.

    Returns
    -------
    dict[str, Any]
        ``train_groups`` (over every client's data file), ``eval_groups``
        (the held-out file's), ``heldout_groups`` (what ``partitions.json``
        records as held out, ``None`` if it records nothing) and
        ``overlap`` (groups both trained on and scored: empty when the
        held-out split is sound).
    """
    from protocols.run_folder import RunFolder

    folder = RunFolder(run_dir)
    parts = read_json(folder.partitions)
    train: set[str] = set()
    for pid in range(len(parts.get("sizes") or [])):
        train.update(_groups(folder.client_data(pid)))
    scored = _groups(folder.eval_data)
    recorded = parts.get("heldout_groups")
    return {
        "train_groups": sorted(train),
        "eval_groups": scored,
        "heldout_groups": recorded,
        "overlap": sorted(train & set(scored)),
    }


def _last_evaluated(rows: list[dict[str, Any]]) -> dict[str, Any]:
    evaluated = [r for r in rows if r.get("eval_metric") is not None]
    return evaluated[-1] if evaluated else {}


def run_once(overrides: dict[str, Any], work: Path) -> dict[str, Any]:
    """Prepare and run one federation under ``work``; what the report needs.

    A run that raises is a result: ``status`` holds the error (one line),
    and whatever rounds it finished are still read.

    Returns
    -------
    dict[str, Any]
        ``status`` (``completed`` or the error), ``rounds_done``,
        ``metric_name``, ``metric_first`` / ``metric_last`` and
        ``metric_low`` / ``metric_high`` (the last evaluation's bootstrap 95%
        interval), ``eval_examples`` and ``eval_s`` (of the last evaluation),
        ``eval_loss_first`` / ``eval_loss_last``, ``curve`` (round, eval loss,
        metric, low, high per evaluated round), ``bytes_down`` / ``bytes_up``
        (mean per client and trained round), ``round_bytes_down`` /
        ``round_bytes_up`` (mean per trained round, all its clients),
        ``clients_per_round`` (mean), the groups of :func:`data_groups`,
        ``round_seconds`` and ``seconds`` (the whole run).
    """
    run = run_in_process({**overrides, "run.output_dir": str(work)})
    rows = run.get("metrics") or []
    trained = [r for r in rows if r["round"] >= 1 and r.get("clients")]
    last = _last_evaluated(rows)
    out: dict[str, Any] = {
        "status": run["error"] or "completed",
        "rounds_done": run.get("rounds_done", 0),
        "metric_name": run.get("metric_name"),
        "metric_first": run.get("metric_first"),
        "metric_last": last.get("eval_metric"),
        "metric_low": last.get("eval_metric_low"),
        "metric_high": last.get("eval_metric_high"),
        "eval_examples": last.get("eval_examples"),
        "eval_s": last.get("eval_s"),
        "eval_loss_first": run.get("eval_loss_first"),
        "eval_loss_last": last.get("eval_loss"),
        "curve": [
            [
                r.get("round"),
                r.get("eval_loss"),
                r.get("eval_metric"),
                r.get("eval_metric_low"),
                r.get("eval_metric_high"),
            ]
            for r in rows
            if r.get("eval_metric") is not None
        ],
        "bytes_down": _mean(run.get("bytes_down_per_client_round")),
        "bytes_up": _mean(run.get("bytes_up_per_client_round")),
        "round_bytes_down": _mean([r["bytes_down"] for r in trained]),
        "round_bytes_up": _mean([r["bytes_up"] for r in trained]),
        "clients_per_round": _mean([r["clients"] for r in trained]),
        "round_seconds": run.get("round_seconds"),
        "seconds": run["wall_s"],
    }
    if run.get("run_dir"):
        try:
            out.update(data_groups(Path(run["run_dir"])))
        except (OSError, ValueError) as exc:  # a partial folder is still a result
            out["groups_error"] = f"{type(exc).__name__}: {exc}"
    return out
