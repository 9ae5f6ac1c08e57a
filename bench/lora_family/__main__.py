"""``python -m bench.lora_family``: federated LoRA rules, mixed ranks, server optimizers.

Comparisons (``--only``, comma-separated; :mod:`bench.lora_family.settings`
says what each runs and at what scale):

``aggregation``
    FedAvg vs exact (FedEx-LoRA) vs FFA-LoRA, every client at rank 8.
``mixed_ranks``
    Clients of ranks 2, 4, 8, 16: naive zero-padded averaging vs HetLoRA vs
    FlexLoRA.
``server_opt``
    FedAdam, FedYogi, FedAdagrad, FedAvgM against plain FedAvg.

Each on Dolly-15K and Natural Instructions (``--data``), ``--seeds N`` seeds
each; Rouge-L, eval loss and bytes per client-round after equal rounds, and
a recommendation the report derives from them. Each finished run is written
to ``results/lora_family.json`` at once; ``--resume`` keeps its completed
runs and does the rest (a failed run is recorded with its error and run
again by ``--resume``). ``--render`` only rewrites the markdown and plot.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any

from bench.harness import (
    RESULTS_DIR,
    add_render_option,
    add_resume_options,
    benchmark_parser,
    chosen_names,
    finish_runs,
    machine_info,
    quiet_environment,
    render_saved,
    resume_runs,
    run_pending,
    utc_stamp,
)
from bench.lora_family.settings import (
    CONFIGS,
    DATASETS,
    FULL,
    NAME,
    QUICK,
    SECTIONS,
    Scale,
    configs_of,
    run_overrides,
)


def plan(
    sections: set[str], datasets: list[str], configs: list[str], seeds: int
) -> list[dict[str, Any]]:
    """Every run to do, each a dict of its labels: seed-major, then dataset.

    Seed 0 of every configuration on every dataset comes first, so a partial
    benchmark already compares everything once.
    """
    names = [n for n in configs_of(sections) if n in configs]
    return [
        {"dataset": d, "config": n, "seed": s}
        for s in range(seeds)
        for d in datasets
        for n in names
    ]


def key(run: dict[str, Any]) -> str:
    """A run's identity in the results file."""
    return f"{run['dataset']}/{run['config']}/seed={run['seed']}"


def main(argv: list[str] | None = None) -> int:
    """Run the planned runs; write the JSON after every run, then the report."""
    parser = benchmark_parser(
        f"python -m bench.{NAME}",
        "Federated LoRA aggregation rules, mixed ranks and server optimizers "
        "on SmolLM2-135M (in process).",
        "examples:\n  python -m bench.lora_family            # ~70-80 min, 2 idle cores\n"
        "  python -m bench.lora_family --resume   # continue an interrupted run\n"
        "  python -m bench.lora_family --only mixed_ranks --data ni\n"
        "  python -m bench.lora_family --quick    # tiny-llama, ~1 min\n"
        "  python -m bench.lora_family --render",
    )
    add_render_option(parser, NAME)
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comparisons: {','.join(SECTIONS)}"
    )
    parser.add_argument(
        "--data", default=",".join(DATASETS), help=f"datasets: {','.join(DATASETS)}"
    )
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="configurations (of the chosen comparisons) to run",
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 of each run")
    add_resume_options(parser)
    parser.add_argument(
        "--out-dir", type=Path, default=RESULTS_DIR, help="where results go"
    )
    args = parser.parse_args(argv)
    from bench.lora_family.report import config_table, render

    if args.render:
        return render_saved(args.render, partial(render, plot_dir=args.render.parent))
    quiet_environment()
    sections = set(chosen_names(args.only, SECTIONS, "comparisons"))
    datasets = chosen_names(args.data, tuple(DATASETS), "datasets")
    configs = chosen_names(args.configs, tuple(CONFIGS), "configurations")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    scale: Scale = QUICK if args.quick else FULL
    if args.quick:
        import torch

        # tiny-llama gains nothing from threads; one avoids spin-waits on a busy CPU
        torch.set_num_threads(1)
    stem = f"{NAME}-quick" if args.quick else NAME
    path = args.out_dir / f"{stem}.json"
    results: dict[str, Any] = {
        "started": utc_stamp(),
        "machine": machine_info(),
        "stem": stem,
        "scale": vars(scale),
        "seeds": args.seeds,
        "configs": config_table(),
        "runs": [],
    }
    if args.resume and path.exists():
        old = resume_runs(results, path, lambda r: r["result"]["status"] == "completed")
        if old.get("scale") != results["scale"]:
            parser.error(f"{path} was run at another scale; move it or drop --resume")
        results["seeds"] = max(args.seeds, int(old.get("seeds", 1)))
    from bench.lora_family.runs import run_once

    def run_one(run: dict[str, Any], work: Path) -> dict[str, Any]:
        overrides = run_overrides(
            scale, dataset=run["dataset"], config=run["config"], seed=run["seed"]
        )
        return run_once(overrides, work)

    run_pending(
        results,
        plan(sections, datasets, configs, args.seeds),
        key=key,
        run_one=run_one,
        stem=stem,
        out_dir=args.out_dir,
        max_runs=args.max_runs,
        scratch_prefix="pollinate-lora-family-",
        metric_label="Rouge-L",
    )
    return finish_runs(results, stem, render, args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
