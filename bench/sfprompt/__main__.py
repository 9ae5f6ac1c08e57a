"""``python -m bench.sfprompt``: the SFPrompt benchmark's command line.

Parses the flags, runs the chosen sections in the order memory needs
(section 3's children first, from a lean parent), and writes
``bench/results/<stem>.json`` and ``.md``. ``--child`` is the entry point
of its own measuring child processes.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from datetime import UTC, datetime
from typing import Any

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
from bench.sfprompt.compute import section_compute
from bench.sfprompt.memory import (
    child_device,
    child_full,
    child_trunk,
    emit,
    section_memory,
)
from bench.sfprompt.report import render
from bench.sfprompt.settings import (
    MODEL,
    SIM_EVAL,
    SIM_LOCAL_STEPS,
    SIM_NEW_TOKENS,
    SIM_ROUNDS,
    STEP_BATCH,
    STEP_TOKENS,
    split_defaults,
)
from bench.sfprompt.task_metric import section_task
from bench.sfprompt.wire_bytes import section_bytes

ALL_SECTIONS = {"1", "2", "3", "4"}
PACKAGES = ("torch", "numpy", "transformers", "flwr", "grpc")

EPILOG = """\
sections: 1 bytes per client-round, 2 device compute, 3 device memory,
4 task metric vs LoRA (see bench/README.md).

examples:
  python -m bench.sfprompt --quick            # sections 1-3 shortened; < 3 min
  python -m bench.sfprompt --only 1,3         # results/sfprompt-partial.*
  python -m bench.sfprompt                    # everything, ~45 min on 2 busy cores
  python -m bench.sfprompt --only 4 --sim-local-steps 10 --sim-eval 32 \\
      --sim-new-tokens 32 --sim-timeout 3600  # section 4 as first requested
  python -m bench.sfprompt --render           # results/sfprompt.md from its JSON
"""


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    parser = benchmark_parser(
        "python -m bench.sfprompt",
        "Benchmark of SFPrompt (split learning with soft prompts) on SmolLM2-135M.",
        EPILOG,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="sections 1 (short activation step), 2 (1 step), 3 (1 step)",
    )
    parser.add_argument("--steps", type=int, default=2, help="timed steps in section 2")
    parser.add_argument(
        "--act-steps", type=int, default=3, help="gRPC split steps, section 1"
    )
    parser.add_argument(
        "--mem-steps", type=int, default=3, help="steps per memory child"
    )
    parser.add_argument("--sim-rounds", type=int, default=SIM_ROUNDS)
    parser.add_argument("--sim-local-steps", type=int, default=SIM_LOCAL_STEPS)
    parser.add_argument("--sim-eval", type=int, default=SIM_EVAL)
    parser.add_argument("--sim-new-tokens", type=int, default=SIM_NEW_TOKENS)
    parser.add_argument(
        "--sim-tail-norm",
        action="store_true",
        help="also run SFPrompt with tail=norm in section 4",
    )
    parser.add_argument(
        "--sim-timeout", type=float, default=900.0, help="s per simulation"
    )
    parser.add_argument(
        "--only", default="", help="comma list of sections to run (1-4)"
    )
    add_render_option(parser, "sfprompt")
    parser.add_argument(
        "--child", choices=("trunk", "device", "full"), help=argparse.SUPPRESS
    )
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tail", default="norm+head", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="steps", help=argparse.SUPPRESS)
    return parser


def run_sections(args: argparse.Namespace) -> int:
    """Measure the chosen sections; write and print the report."""
    started = now()
    load_at_start = os.getloadavg()
    date_at_start = datetime.now(UTC).isoformat(timespec="seconds")
    warmup = 1
    act_steps, act_batch, act_tokens = args.act_steps, STEP_BATCH, STEP_TOKENS
    sections = chosen_sections(args.quick, args.only, ALL_SECTIONS, {"1", "2", "3"})
    if args.quick:
        args.steps, args.mem_steps, warmup = 1, 1, 0
        act_steps, act_batch = 1, 2
    mode = run_mode(args.quick, sections, ALL_SECTIONS)
    stem = result_stem("sfprompt", mode)
    log = stamped_log(started)
    results: dict[str, Any] = {
        "benchmark": "sfprompt",
        "quick": args.quick,
        "mode": mode,
        "stem": stem,
        "sections": sorted(sections),
        "args": {
            k: v for k, v in vars(args).items() if k not in ("child", "port", "mode")
        },
        "split_defaults": split_defaults(),
    }
    if "3" in sections:  # first, while this process is still lean (no model yet)
        try:
            results["memory"] = section_memory(
                args.mem_steps, with_round=not args.quick, with_norm=not args.quick
            )
        except Exception as exc:  # keep the other sections
            results["memory_error"] = f"{type(exc).__name__}: {exc}"
        log("section 3 done")
    results["machine"] = machine_info(PACKAGES)
    results["machine"]["load_average_at_start"] = load_at_start
    results["machine"]["date"] = date_at_start

    from models import load_causal_lm

    if sections & {"1", "2"}:
        loaded = load_causal_lm(MODEL, dtype="float32", device="cpu")
        model, tokenizer = loaded.model, loaded.tokenizer
        log(f"model loaded: {sum(q.numel() for q in model.parameters()):,} params")
        if "1" in sections:
            results["bytes"] = section_bytes(
                model, tokenizer, act_steps, act_batch, act_tokens
            )
            log("section 1 done")
        if "2" in sections:
            tails = ("norm+head",) if args.quick else ("norm+head", "norm")
            results["compute"] = section_compute(
                model, tokenizer, warmup, args.steps, tails, 8 if args.quick else 32
            )
            log("section 2 done")
        del model, loaded
        gc.collect()
    if "4" in sections:
        try:
            results["task"] = section_task(args)
        except Exception as exc:  # keep sections 1-3 even if a run breaks
            results["task_error"] = f"{type(exc).__name__}: {exc}"
        log("section 4 done")
    return finish_run(stem, results, render, started, log)


def main(argv: list[str] | None = None) -> int:
    """Entry point: dispatch to a child role, ``--render`` or a run."""
    args = build_parser().parse_args(argv)
    quiet_environment()
    if args.render:
        return render_saved(args.render, render)
    if args.child == "trunk":
        child_trunk(args.tail)
        return 0
    if args.child == "device":
        emit(child_device(args.port, args.steps, args.tail, args.mode))
        return 0
    if args.child == "full":
        emit(child_full(args.steps))
        return 0
    return run_sections(args)


if __name__ == "__main__":
    sys.exit(main())
