"""``python -m bench.fedkseed``: the FedKSeed benchmark's command line.

Parses the flags, runs the chosen sections in the order memory needs
(section 3's children first, from a lean parent), and writes
``bench/results/<stem>.json`` and ``.md``. ``--child`` and ``--inproc-run``
are the entry points of its own child processes.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.fedkseed.inproc import inproc_main
from bench.fedkseed.memory import CHILD_KINDS, child_memory, section_memory
from bench.fedkseed.replay import section_replay
from bench.fedkseed.report import render
from bench.fedkseed.rerun import rerun
from bench.fedkseed.settings import MODEL
from bench.fedkseed.step_time import section_step
from bench.fedkseed.task_metric import section_task
from bench.fedkseed.wire_bytes import section_bytes
from bench.harness import (
    add_render_option,
    benchmark_parser,
    chosen_sections,
    finish_run,
    machine_info,
    now,
    quiet_environment,
    render_saved,
    result_stem,
    run_mode,
    stamped_log,
)

ALL_SECTIONS = {"1", "2", "3", "4", "5"}

EPILOG = """\
sections: 1 bytes per client-round, 2 step time, 3 peak memory, 4 server
replay, 5 task metric vs LoRA (see bench/README.md).

examples:
  python -m bench.fedkseed --quick            # sections 1, 2, 4; < 3 min
  python -m bench.fedkseed --only 1,4         # results/fedkseed-partial.*
  python -m bench.fedkseed                    # everything, ~40 min on 2 idle cores
  python -m bench.fedkseed --rerun fedkseed,step --rerun-reason "busy machine"
  python -m bench.fedkseed --render           # results/fedkseed.md from its JSON
"""


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    parser = benchmark_parser(
        "python -m bench.fedkseed",
        "Benchmark of FedKSeed / FedKSeed-Pro on SmolLM2-135M: "
        "bytes, time, memory, quality.",
        EPILOG,
    )
    parser.add_argument(
        "--quick", action="store_true", help="sections 1, 2 (1 step), 4 (D=2)"
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="timed ZO steps in section 2"
    )
    parser.add_argument("--replay-seeds", type=int, default=64, help="D in section 4")
    parser.add_argument(
        "--zo-steps", type=int, default=50, help="section 5 local steps"
    )
    parser.add_argument(
        "--zo-batch", type=int, default=2, help="section 5 ZO batch size"
    )
    parser.add_argument(
        "--probe-steps", type=int, default=20, help="section 5 lr-probe steps"
    )
    parser.add_argument(
        "--sim-timeout", type=float, default=1200.0, help="s per simulation"
    )
    parser.add_argument(
        "--only", default="", help="comma list of sections to run (1-5)"
    )
    parser.add_argument(
        "--rerun",
        default="",
        help="redo section 5 runs (lora, fedkseed, fedkseed-pro) and/or step, "
        "replay of results/fedkseed.json",
    )
    parser.add_argument("--rerun-reason", default="", help="recorded with --rerun")
    parser.add_argument(
        "--sim-root",
        default=str(Path(tempfile.gettempdir()) / "fedkseed-sim-runs"),
        help="run folders of --rerun (kept, so a killed rerun is continued)",
    )
    add_render_option(parser, "fedkseed")
    parser.add_argument("--child", choices=CHILD_KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--spec-json", help=argparse.SUPPRESS)
    parser.add_argument("--inproc-run", help=argparse.SUPPRESS)
    return parser


def run_sections(args: argparse.Namespace) -> int:
    """Measure the chosen sections; write and print the report."""
    started = now()
    sections = chosen_sections(args.quick, args.only, ALL_SECTIONS, {"1", "2", "4"})
    if args.quick:
        args.steps, args.replay_seeds = 1, 2
    mode = run_mode(args.quick, sections, ALL_SECTIONS)
    log = stamped_log(started)
    memory = None
    if "3" in sections:  # first, while this process is still lean (no torch yet)
        memory = section_memory()
        log("section 3 done")
    results: dict[str, Any] = {
        "benchmark": "fedkseed",
        "quick": args.quick,
        "mode": mode,
        "sections": sorted(sections),
        "machine": machine_info(),
        "args": {
            k: v for k, v in vars(args).items() if k not in ("child", "spec_json")
        },
    }
    if memory is not None:
        results["memory"] = memory

    from models import load_causal_lm
    from protocols import state_hash
    from protocols.seeds import ParamWalk

    loaded = load_causal_lm(MODEL, dtype="float32", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    walk = ParamWalk.from_model(model)
    params = walk.params(model)
    w0_hash = state_hash(params)
    log(f"model loaded: {walk.numel:,} perturbable values in {len(params)} tensors")
    if "1" in sections:
        results["bytes"] = section_bytes(walk, w0_hash)
        log("section 1 done")
    if "2" in sections:
        results["step"] = section_step(model, tokenizer, params, args.steps)
        log("section 2 done")
    if "4" in sections:
        results["replay"] = section_replay(
            params, args.replay_seeds, 1 if args.quick else 2
        )
        log("section 4 done")
    del model, params, loaded
    gc.collect()
    if "5" in sections:
        try:
            results["task"] = section_task(args)
        except Exception as exc:  # keep sections 1-4 even if a run breaks
            results["task_error"] = f"{type(exc).__name__}: {exc}"
        log("section 5 done")
    return finish_run(result_stem("fedkseed", mode), results, render, started, log)


def main(argv: list[str] | None = None) -> int:
    """Entry point: dispatch to a child role, ``--rerun``, ``--render`` or a run."""
    args = build_parser().parse_args(argv)
    quiet_environment()
    if args.child:
        print(json.dumps(child_memory(args.child, args.spec_json)))
        return 0
    if args.inproc_run:
        return inproc_main(json.loads(args.inproc_run))
    if args.rerun:
        return rerun(args)
    if args.render:
        return render_saved(args.render, render)
    return run_sections(args)


if __name__ == "__main__":
    sys.exit(main())
