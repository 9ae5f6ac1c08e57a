"""``python -m bench.edge``: the edge benchmark's command line.

Parses the flags, exports the bundle and runs the children of sections 2
and 3 while this process is still lean (no torch), then sections 1, 4 and 5,
and writes ``bench/results/<stem>.json``, ``.md`` and ``.png``. ``--child``
and ``--inproc-run`` are the entry points of its own child processes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.edge.children import CHILD_KINDS, child_main, run_child
from bench.edge.footprint import section_footprint
from bench.edge.memory import section_memory
from bench.edge.quality import section_quality
from bench.edge.replay import section_replay
from bench.edge.report import render
from bench.edge.settings import FULL, QUICK, Scale
from bench.edge.step_time import section_step
from bench.harness import (
    RESULTS_DIR,
    add_render_option,
    benchmark_parser,
    chosen_sections,
    finish_run,
    machine_info,
    now,
    quiet_environment,
    read_json,
    result_stem,
    run_mode,
    stamped_log,
)

NAME = "edge"
ALL_SECTIONS = {"1", "2", "3", "4", "5"}
PACKAGES = ("torch", "numpy", "numba", "onnxruntime", "tokenizers", "flwr")

EPILOG = """\
sections: 1 install footprint, 2 peak memory (edge vs ORT inference vs torch),
3 seconds per ZO step, 4 replay per round (full / subset / adapter),
5 quality at equal training wall-clock (see bench/README.md).

examples:
  python -m bench.edge --quick         # tiny-llama, every section, < 3 min
  python -m bench.edge --only 1,4      # results/edge-partial.*
  python -m bench.edge                 # everything on SmolLM2-135M
  python -m bench.edge --render        # results/edge.md and .png from the JSON
"""


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    parser = benchmark_parser(
        "python -m bench.edge",
        "Benchmark of the edge FedKSeed client (ONNX Runtime + NumPy) against "
        "the torch client and ORT inference.",
        EPILOG,
    )
    parser.add_argument("--quick", action="store_true", help="tiny-llama, tiny sizes")
    parser.add_argument("--only", default="", help="comma list of sections (1-5)")
    parser.add_argument("--repeats", type=int, help="timed ZO steps in section 3")
    parser.add_argument("--budget", type=float, help="section 5 training seconds")
    parser.add_argument(
        "--harness", choices=("pollinate", "inproc", "here"), help="section 5's runs"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="bundle and run folders (kept; default: temporary)",
    )
    add_render_option(parser, NAME)
    parser.add_argument("--child", choices=CHILD_KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--child-args", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--inproc-run", help=argparse.SUPPRESS)
    return parser


def _scale(args: argparse.Namespace) -> Scale:
    base = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    if args.repeats:
        changes["step_repeats"] = args.repeats
    if args.budget:
        changes["budget_s"] = args.budget
    if args.harness:
        changes["harness"] = args.harness
    return Scale(**{**base.__dict__, **changes})


def _guarded(results: dict[str, Any], key: str, fn: Any, *a: Any) -> None:
    """``results[key] = fn(*a)``; a failure is recorded as ``<key>_error``."""
    try:
        results[key] = fn(*a)
    except Exception as exc:  # keep the other sections
        results[f"{key}_error"] = f"{type(exc).__name__}: {exc}"


def run_sections(args: argparse.Namespace) -> int:
    """Measure the chosen sections; write and print the report."""
    started = now()
    log = stamped_log(started)
    sections = chosen_sections(args.quick, args.only, ALL_SECTIONS, ALL_SECTIONS)
    mode = run_mode(args.quick, sections, ALL_SECTIONS)
    scale = _scale(args)
    stem = result_stem(NAME, mode)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-edge-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "benchmark": NAME,
        "stem": stem,
        "quick": args.quick,
        "mode": mode,
        "sections": sorted(sections),
        "settings": {k: v for k, v in scale.__dict__.items() if k not in ("sim",)},
    }
    prepared = None
    try:
        if sections & {"1", "2", "3"}:  # children first, while no torch is imported
            _guarded(
                results,
                "export",
                run_child,
                "export",
                {
                    "out": str(work / "export"),
                    "model": scale.model,
                    "batch": scale.batch,
                    "tokens": scale.tokens,
                },
            )
            prepared = results.get("export")
            log(f"bundle exported: {prepared and prepared['bundle']}")
        if prepared and "2" in sections:
            _guarded(results, "memory", section_memory, prepared, scale.model)
            log("section 2 done")
        if prepared and "3" in sections:
            _guarded(
                results, "step", section_step, prepared, scale.model, scale.step_repeats
            )
            log("section 3 done")
        if "1" in sections:
            bundle = Path(prepared["bundle"]) if prepared else None
            _guarded(results, "footprint", section_footprint, bundle)
            log("section 1 done")
        results["machine"] = machine_info(PACKAGES)
        if "4" in sections:
            _guarded(results, "replay", section_replay, scale)
            log("section 4 done")
        if "5" in sections:
            _guarded(results, "quality", section_quality, scale, work / "sim")
            log("section 5 done")
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return finish_run(stem, results, lambda r: render(r, RESULTS_DIR), started, log)


def main(argv: list[str] | None = None) -> int:
    """Entry point: a child role, an in-process run, ``--render``, or a run."""
    args = build_parser().parse_args(argv)
    quiet_environment()
    if args.child:
        print(json.dumps(child_main(args.child, json.loads(args.child_args))))
        return 0
    if args.inproc_run:
        from bench.fedkseed.inproc import inproc_main

        return inproc_main(json.loads(args.inproc_run))
    if args.render:
        table = render(read_json(args.render), plot_dir=args.render.parent)
        args.render.with_suffix(".md").write_text(table)
        print(table)
        return 0
    return run_sections(args)


if __name__ == "__main__":
    sys.exit(main())
