"""The command line of a sectioned benchmark (``python -m bench.<name>``).

What the benchmarks share around their sections or runs: the parser's frame,
its ``--render`` flag (and ``--resume`` / ``--max-runs`` where every run is
saved as it finishes), the choice of sections and the results
stem it leads to, the timestamped log, and writing (or re-rendering) the
report.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from bench.harness.measure import now
from bench.harness.paths import RESULTS_DIR
from bench.harness.results import read_json, write_results

Render = Callable[[Any], str]
"""A benchmark's report: the markdown of a results dict."""


def benchmark_parser(
    prog: str, description: str, epilog: str
) -> argparse.ArgumentParser:
    """A parser for ``prog`` whose ``epilog`` keeps its line breaks."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_render_option(parser: argparse.ArgumentParser, benchmark: str) -> None:
    """``--render [JSON]``: only rewrite the markdown beside a results JSON.

    Without a value it is ``results/<benchmark>.json``.
    """
    parser.add_argument(
        "--render",
        nargs="?",
        const=RESULTS_DIR / f"{benchmark}.json",
        type=Path,
        metavar="JSON",
        help="only rewrite the markdown beside a results JSON "
        f"(default results/{benchmark}.json)",
    )


def add_resume_options(parser: argparse.ArgumentParser) -> None:
    """``--resume`` and ``--max-runs N``, of a benchmark that saves every run.

    ``--resume`` keeps the finished runs of the results JSON (the benchmark
    says which count as finished); ``--max-runs`` stops after ``N`` new runs
    (``0``: no limit).
    """
    parser.add_argument(
        "--resume", action="store_true", help="keep finished runs of the results JSON"
    )
    parser.add_argument("--max-runs", type=int, default=0, help="stop after N new runs")


def quiet_environment() -> None:
    """Offline Hugging Face hub, no Flower telemetry (unless already set)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def chosen_sections(
    quick: bool,
    only: str,
    all_sections: Collection[str],
    quick_sections: Collection[str],
) -> set[str]:
    """The sections to run: ``quick_sections``, the ``--only`` list, or all."""
    if quick:
        return set(quick_sections)
    if only:
        return set(only.split(","))
    return set(all_sections)


def chosen_names(text: str, known: Collection[str], what: str) -> list[str]:
    """The comma-separated names of ``text``, in order; SystemExit naming unknown ones."""
    chosen = [x for x in text.split(",") if x]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; known: {list(known)}")
    return chosen


def run_mode(quick: bool, sections: set[str], all_sections: Collection[str]) -> str:
    """``"quick"``, ``"full"`` (every section) or ``"partial"``."""
    if quick:
        return "quick"
    return "full" if sections == set(all_sections) else "partial"


def result_stem(benchmark: str, mode: str | None) -> str:
    """``<benchmark>`` for a full run, ``<benchmark>-quick`` or ``-partial`` else.

    A ``mode`` that is neither ``"quick"`` nor ``"full"`` (``None`` included)
    is a partial run.
    """
    return {"quick": f"{benchmark}-quick", "full": benchmark}.get(
        mode, f"{benchmark}-partial"
    )


def stamped_log(started: float) -> Callable[[str], None]:
    """A ``log(msg)`` that prints ``msg`` after the seconds since ``started``."""

    def log(msg: str) -> None:
        print(f"[{now() - started:7.1f} s] {msg}", flush=True)

    return log


def finish_run(
    stem: str,
    results: dict[str, Any],
    render: Render,
    started: float,
    log: Callable[[str], None],
) -> int:
    """Stamp the end of a run, write ``<stem>.json`` and ``.md``, print the report.

    Records ``machine.load_average_at_end`` and ``total_seconds`` (since
    ``started``) in ``results`` first.

    Returns
    -------
    int
        0, the command's exit status.
    """
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["total_seconds"] = now() - started
    table = render(results)
    write_results(stem, results, table)
    print(table)
    log(f"wrote {RESULTS_DIR / stem}.json/.md")
    return 0


def render_saved(path: Path, render: Render) -> int:
    """Rewrite the markdown beside the results JSON ``path``; print it.

    Returns
    -------
    int
        0, the command's exit status.
    """
    table = render(read_json(path))
    path.with_suffix(".md").write_text(table)
    print(table)
    return 0
