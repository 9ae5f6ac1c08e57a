"""The markdown table of every load run in the results file."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bench.harness import markdown_table

COLUMNS = (
    "store",
    "nodes",
    "arrays",
    "MiB per message each way",
    "rounds done",
    "s per round (median / max)",
    "ms per array and node",
    "peak RSS MiB: SuperLink / SuperNode",
    "load avg (start / end)",
    "result",
)
ALIGN = "lrrrrrrrrl"


def render(results: Mapping[str, Any]) -> str:
    """The markdown table of every run in ``results``, with notes on failures."""
    rows = []
    notes = []
    for run in results["runs"]:
        spr = run.get("seconds_per_round") or {}
        times = f"{spr['median']:.1f} / {spr['max']:.1f}" if spr else "-"
        per_array = (
            f"{1000 * spr['median'] / (run['arrays'] * run['nodes']):.0f}"
            if spr and run["passed"]
            else "-"
        )
        rss = run.get("peak_rss_mib", {})
        link = rss.get("superlink")
        node = max((v for k, v in rss.items() if k.startswith("node")), default=None)
        memory = f"{link or 0:.0f} / {node or 0:.0f}" if link else "-"
        load = (
            f"{run['load_average_at_start'][0]:.1f} / "
            f"{run['load_average_at_end'][0]:.1f}"
            if run.get("load_average_at_start") and run.get("load_average_at_end")
            else "-"
        )
        verdict = "pass" if run["passed"] else f"FAIL: {run.get('error') or '?'}"
        done = len(run.get("round_results", []))
        cells = (
            run["store"],
            run["nodes"],
            run["arrays"],
            f"{run['mib']:g}",
            f"{done}/{run['rounds']}",
            times,
            per_array,
            memory,
            load,
            verdict,
        )
        rows.append(dict(zip(COLUMNS, cells, strict=True)))
        if not run["passed"]:
            first = (run.get("log_errors") or ["no error in the logs"])[0]
            notes.append(
                f"- {run['store']}, {run['nodes']} nodes x {run['arrays']} arrays "
                f"x {run['mib']:g} MiB ({run.get('date', '?')}): Flower status "
                f"`{run.get('flower_status') or '?'}`; first log error: `{first}`"
            )
    m = results["machine"]
    lines = markdown_table(rows, COLUMNS, align=ALIGN, compact=True)
    lines += [
        "",
        f"{m['cpu_count']} CPUs ({m['cpu_model']}), flwr {m['flwr']}; payload "
        "distinct per node and round (no deduplication); a round is one "
        "`Grid.send_and_receive` (server pushes to the SuperLink, nodes pull, "
        "the ClientApp returns every array + 1 and a sha256 of what it got, "
        "nodes push, server pulls; the server polls every 3 s), checked bit "
        "for bit both ways. Peak RSS is the kernel's high-water mark (VmHWM).",
    ]
    if notes:
        lines += ["", "Failures:", "", *notes]
    return "\n".join(lines) + "\n"
