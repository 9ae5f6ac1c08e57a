"""Section 4: task metric after equal rounds, SFPrompt against LoRA FedAvg.

``pollinate simulate`` on Dolly (4 clients, Dirichlet 0.5): Rouge-L, eval
loss, bytes per client-round from ``metrics.jsonl`` and wall time; each run
has a timeout, and a run that stops early is reported with the rounds it
reached (the report adds an equal-round row).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import now, run_and_read, simulate_args
from bench.sfprompt.settings import (
    DOLLY_PATH,
    MODEL,
    SFP_LR,
    SIM_ALPHA,
    SIM_CLIENTS,
    SIM_LIMIT,
)


def sim_args(
    out_dir: Path, name: str, rounds: int, eval_examples: int, new_tokens: int
) -> list[str]:
    """The ``pollinate simulate`` arguments both section 4 runs share."""
    return simulate_args(
        name,
        out_dir,
        model=MODEL,
        dataset=DOLLY_PATH,
        clients=SIM_CLIENTS,
        partition="dirichlet",
        alpha=SIM_ALPHA,
        limit=SIM_LIMIT,
        rounds=rounds,
        eval_examples=eval_examples,
        new_tokens=new_tokens,
    )


def run_simulation(
    name: str, args: list[str], root: Path, timeout: float
) -> dict[str, Any]:
    """One ``pollinate simulate`` subprocess; its metrics and outcome.

    The run's log goes to ``root/<name>.log``; its outcome is read from the
    newest run folder under ``root/<name>`` (:func:`bench.harness.read_run`).
    """
    out_dir = root / name
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "pollinate"), *args]
    log_path = root / f"{name}.log"
    return run_and_read(cmd, out_dir, log_path, timeout, labels={"name": name})


def section_task(args: argparse.Namespace) -> dict[str, Any]:
    """Section 4: LoRA FedAvg and SFPrompt (and tail "norm" if asked) at equal rounds."""
    t_start = now()
    runs: dict[str, Any] = {}
    base = {
        "rounds": args.sim_rounds,
        "eval_examples": args.sim_eval,
        "new_tokens": args.sim_new_tokens,
    }
    steps = ["--local-steps", str(args.sim_local_steps), "--batch-size", "8"]
    plan = [
        ("lora", ["--method", "lora", *steps, "--lr", "2e-3"]),
        ("sfprompt", ["--method", "sfprompt", *steps, "--lr", str(SFP_LR)]),
    ]
    if args.sim_tail_norm:
        plan.append(
            (
                "sfprompt-norm",
                [
                    "--method",
                    "sfprompt",
                    *steps,
                    "--lr",
                    str(SFP_LR),
                    "--set",
                    'split.tail="norm"',
                ],
            )
        )
    with tempfile.TemporaryDirectory(prefix="sfprompt-bench-") as tmp:
        root = Path(tmp)
        for name, extra in plan:
            runs[name] = run_simulation(
                name,
                [*sim_args(root / name, name, **base), *extra],
                root,
                args.sim_timeout,
            )
    return {
        "settings": {
            "dataset": str(DOLLY_PATH),
            "clients": SIM_CLIENTS,
            "partition": "dirichlet",
            "alpha": SIM_ALPHA,
            "limit": SIM_LIMIT,
            "rounds": args.sim_rounds,
            "eval_examples": args.sim_eval,
            "eval_max_new_tokens": args.sim_new_tokens,
            "metric": "rouge_l",
            "local_steps": args.sim_local_steps,
            "batch_size": 8,
            "lora": "rank 8, q_proj+v_proj, AdamW lr 2e-3",
            "sfprompt": f"default [split] (8 prompts, 0 device blocks, gamma 0.5, 2 "
            f"local-loss steps), AdamW lr {SFP_LR}",
            "timeout_s_per_run": args.sim_timeout,
        },
        "runs": runs,
        "seconds": now() - t_start,
    }
