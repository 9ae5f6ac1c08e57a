"""The markdown table of ``trunk_abuse.json`` (built from the JSON alone)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bench.harness import markdown_table

COLUMNS = (
    "scenario",
    "what the attacker did",
    "refused (code)",
    "peak RSS over baseline, MiB",
    "peak reserved, MiB",
    "after, MiB (RSS / reserved)",
    "device",
    "result",
)
ALIGN = "lllrrrll"


def render(results: Mapping[str, Any]) -> str:
    """One row per scenario, then the settings and the machine."""
    rows = []
    for s in results["scenarios"]:
        refused = ", ".join(f"{n} {code}" for code, n in s["refused"].items()) or "-"
        rows.append(
            dict(
                zip(
                    COLUMNS,
                    (
                        s["name"],
                        s["attack"],
                        refused,
                        f"{s['peak_rss_mib']:.0f}",
                        f"{s['peak_reserved_mib']:.0f}",
                        f"{s['after_rss_mib']:.0f} / {s['after_reserved_mib']:.0f}",
                        s["device"],
                        "pass" if s["passed"] else "FAIL",
                    ),
                    strict=True,
                )
            )
        )
    lim, m = results["limits"], results["machine"]
    lines = markdown_table(rows, COLUMNS, align=ALIGN, compact=True)
    lines += [
        "",
        f"SmolLM2-135M trunk ({results['body_blocks']} blocks, float32, CPU), "
        f"memory budget {lim['memory_budget_mib']:.0f} MiB, node share "
        f"{lim['node_memory_mib']:.0f} MiB, {lim['sessions_per_node']} sessions "
        f"per node; predicted activation memory "
        f"{results['cost_per_token_kib']:.0f} KiB per position (measured "
        f"{results['measured_per_token_kib']:.0f} KiB on batch "
        f"{results['check_frame'][0]} x {results['check_frame'][1]}). Baseline "
        f"RSS {results['baseline_rss_mib']:.0f} MiB (model, service, client). "
        "RSS is VmRSS sampled every 10 ms; 'after' is once the scenario ended "
        "(the trunk trims the heap with glibc malloc_trim when it frees a graph "
        "of 64 MiB or more; reserved is what its budget holds). "
        "Allowed: the budget plus the requests in flight (3 x 64 MiB for the "
        f"maximal frames, 3 x 40 MiB per label). {m['cpu_count']} CPUs ({m['cpu_model']}), torch {m['torch']}, "
        f"run {results['date']}.",
    ]
    return "\n".join(lines) + "\n"
