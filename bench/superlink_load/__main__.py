"""``python -m bench.superlink_load``: run the load test for the chosen stores.

Writes ``superlink_load.json`` (runs of other sizes already in the file are
kept; ``--fresh`` starts over) and ``superlink_load.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import (
    RESULTS_DIR,
    machine_info,
    merge_records,
    read_json,
    write_json,
)
from bench.superlink_load.deployment import STORES, LoadSpec, run_load
from bench.superlink_load.report import render

RESULT_NAME = "superlink_load"
NOTE = (
    "CPU shared with other work during the run; timings are this machine's at that time"
)


def run_key(run: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes two runs the same measurement (a new one replaces the old)."""
    return (run["store"], run["nodes"], run["arrays"], run["mib"], run["rounds"])


def main(argv: list[str] | None = None) -> int:
    """Run the load test for the chosen stores; write JSON and a table."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.superlink_load",
        description="Load test of a real SuperLink: large, many-array messages to "
        "real SuperNodes, checked bit for bit.",
        epilog="example: python -m bench.superlink_load --nodes 4 --arrays 1000 "
        "--mb 32 --rounds 3 --store both",
    )
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--arrays", type=int, default=1000)
    parser.add_argument("--mb", type=float, default=32.0, help="MiB per message")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", choices=[*STORES, "both"], default="both")
    parser.add_argument("--round-timeout", type=float, default=300.0, help="s")
    parser.add_argument(
        "--timeout", type=float, default=0.0, help="s per store (0: from rounds)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--work", type=Path, default=None, help="kept run folders")
    parser.add_argument("--fresh", action="store_true", help="drop earlier runs")
    args = parser.parse_args(argv)
    spec = LoadSpec(
        nodes=args.nodes,
        arrays=args.arrays,
        mib=args.mb,
        rounds=args.rounds,
        seed=args.seed,
        round_timeout_s=args.round_timeout,
    )
    timeout = args.timeout or spec.join_timeout_s + spec.rounds * (
        spec.round_timeout_s + 60.0
    )
    stores = list(STORES) if args.store == "both" else [args.store]
    out_json = args.out / f"{RESULT_NAME}.json"
    results: dict[str, Any] = {"benchmark": RESULT_NAME, "runs": []}
    if out_json.exists() and not args.fresh:
        results = read_json(out_json)
    results["machine"] = machine_info(("flwr", "numpy"), note=NOTE)
    with tempfile.TemporaryDirectory(prefix="superlink-load-") as tmp:
        root = args.work or Path(tmp)
        for store in stores:
            work = root / f"{store}-{spec.nodes}n-{spec.arrays}a-{spec.mib:g}m"
            date = datetime.now(UTC).isoformat(timespec="seconds")
            load = os.getloadavg()
            run = run_load(spec, store, work, timeout_s=timeout)
            run.update(
                date=date,
                load_average_at_start=load,
                load_average_at_end=os.getloadavg(),
            )
            results["runs"] = merge_records(results["runs"], run, run_key)
            write_json(out_json, results)
    results["runs"].sort(key=lambda r: (r["nodes"], r["mib"], r["arrays"], r["store"]))
    write_json(out_json, results)
    table = render(results)
    (args.out / f"{RESULT_NAME}.md").write_text(table)
    print(table)
    return (
        0 if all(r["passed"] for r in results["runs"] if r["store"] == "memory") else 1
    )


if __name__ == "__main__":
    sys.exit(main())
