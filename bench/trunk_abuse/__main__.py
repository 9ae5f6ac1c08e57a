"""``python -m bench.trunk_abuse``: the trunk's memory under each abuse.

Writes ``results/trunk_abuse.json`` and ``results/trunk_abuse.md``;
``--render [JSON]`` only rewrites the markdown. Takes a few minutes on two
busy cores (the model loads once; the largest frames dominate).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

from bench.harness import (
    RESULTS_DIR,
    add_render_option,
    benchmark_parser,
    machine_info,
    merge_records,
    quiet_environment,
    read_json,
    write_results,
)
from bench.trunk_abuse.report import render

NAME = "trunk_abuse"


def main(argv: list[str] | None = None) -> int:
    """Run every scenario (or ``--only``); write the JSON and the table."""
    parser = benchmark_parser(
        f"python -m bench.{NAME}",
        "Memory of the SFPrompt trunk (SmolLM2-135M) under abuse, over gRPC.",
        "examples:\n  python -m bench.trunk_abuse\n"
        "  python -m bench.trunk_abuse --budget-mb 1536 --node-mb 512\n"
        "  python -m bench.trunk_abuse --render",
    )
    add_render_option(parser, NAME)
    parser.add_argument("--budget-mb", type=float, default=1536.0, help="MiB")
    parser.add_argument("--node-mb", type=float, default=512.0, help="MiB")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated scenarios; they replace theirs in an existing JSON",
    )
    args = parser.parse_args(argv)
    if args.render:
        results = read_json(args.render)
        table = render(results)
        args.render.with_suffix(".md").write_text(table)
        print(table)
        return 0
    quiet_environment()
    from bench.trunk_abuse.scenarios import (
        SCENARIOS,
        TOKENS,
        measured_per_token,
        run_scenario,
        start_trunk,
    )
    from server.trunk_sessions import TrunkLimits

    mib = 1 << 20
    limits = TrunkLimits(
        memory_budget_bytes=int(args.budget_mb * mib),
        node_memory_bytes=int(args.node_mb * mib),
    )
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    trunk = start_trunk(limits)
    try:
        spec = trunk.spec
        length = spec.num_prompts + TOKENS
        results: dict[str, Any] = {
            "benchmark": NAME,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "body_blocks": spec.num_blocks - spec.client_blocks,
            "limits": {
                "memory_budget_mib": args.budget_mb,
                "node_memory_mib": args.node_mb,
                "sessions_per_node": limits.sessions_per_node,
                "pending_timeout_s": limits.pending_timeout_s,
                "idle_timeout_s": limits.idle_timeout_s,
            },
            "cost_per_token_kib": trunk.service.cost.bytes(1, length) / length / 1024,
            "check_frame": [2, length],
            "measured_per_token_kib": measured_per_token(trunk, 2) / 1024,
            "scenarios": [],
        }
        old = RESULTS_DIR / f"{NAME}.json"
        if args.only and old.exists():
            results["scenarios"] = read_json(old)["scenarios"]
        for name in names:
            run = run_scenario(trunk, name)
            results["scenarios"] = merge_records(
                results["scenarios"], run, lambda r: r["name"]
            )
            print(run, flush=True)
        results["scenarios"].sort(key=lambda r: list(SCENARIOS).index(r["name"]))
        results["baseline_rss_mib"] = min(
            r["baseline_rss_mib"] for r in results["scenarios"]
        )
    finally:
        trunk.server.stop(None)
    results["machine"] = machine_info(("torch", "grpc"))
    table = render(results)
    write_results(NAME, results, table)
    print(table)
    return 0 if all(s["passed"] for s in results["scenarios"]) else 1


if __name__ == "__main__":
    sys.exit(main())
