"""``python -m bench.fedkseed_protocol``: FedKSeed's Table 2 protocol, one command.

FedIT (LoRA FedAvg), FedKSeed, FedKSeed-Pro and FedKSeed over an adapter on
Natural Instructions (one task per client, held-out tasks) and Dolly-15K
(Dirichlet 0.5, summarization held out), a fraction of the clients per
round; Rouge-L (``rouge`` package) with its bootstrap 95% interval on the
held-out groups, bytes per round, several seeds. :mod:`.settings` holds the
presets: ``cpu`` (default, about two hours on two cores, and what it cuts),
``paper`` (the paper's settings, for a GPU machine) and ``quick``
(tiny-llama). Each finished run is written to
``results/fedkseed_protocol[-<preset>].json`` at once; ``--resume`` keeps
its completed runs and does the rest. ``--render`` only rewrites the
markdown and plot.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from bench.fedkseed_protocol.settings import (
    DATASETS,
    METHOD_LABELS,
    METHODS,
    NAME,
    PRESETS,
    PUBLISHED,
    run_overrides,
)
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


def plan(datasets: list[str], methods: list[str], seeds: int) -> list[dict[str, Any]]:
    """Every run to do, seed-major, then dataset, then method.

    Seed 0 of every method on every dataset comes first, so a partial run
    already compares everything once.
    """
    return [
        {"dataset": d, "method": m, "seed": s}
        for s in range(seeds)
        for d in datasets
        for m in METHODS
        if m in methods
    ]


def key(run: dict[str, Any]) -> str:
    """A run's identity in the results file."""
    return f"{run['dataset']}/{run['method']}/seed={run['seed']}"


def stem_of(preset: str) -> str:
    """The results file's stem: ``fedkseed_protocol`` for ``cpu``, else suffixed."""
    return NAME if preset == "cpu" else f"{NAME}-{preset}"


def main(argv: list[str] | None = None) -> int:
    """Run the planned runs; write the JSON after every run, then the report."""
    parser = benchmark_parser(
        f"python -m bench.{NAME}",
        "FedKSeed's Table 2 protocol (FedIT, FedKSeed, FedKSeed-Pro, FedKSeed "
        "over an adapter on Natural Instructions and Dolly-15K, held-out tasks) "
        "in process.",
        "examples:\n  python -m bench.fedkseed_protocol              # cpu preset, ~2 h\n"
        "  python -m bench.fedkseed_protocol --resume     # continue it\n"
        "  python -m bench.fedkseed_protocol --preset paper --seeds 3   # GPU\n"
        "  python -m bench.fedkseed_protocol --data ni --configs fedit,fedkseed\n"
        "  python -m bench.fedkseed_protocol --preset quick   # tiny-llama, ~1 min\n"
        "  python -m bench.fedkseed_protocol --render",
    )
    add_render_option(parser, NAME)
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="settings (default cpu)",
    )
    parser.add_argument(
        "--configs",
        "--only",
        default=",".join(METHODS),
        help=f"methods: {','.join(METHODS)}",
    )
    parser.add_argument(
        "--data", default=",".join(DATASETS), help=f"datasets: {','.join(DATASETS)}"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=0,
        help="seeds 0..N-1 of each run (0: the preset's)",
    )
    add_resume_options(parser)
    parser.add_argument(
        "--out-dir", type=Path, default=RESULTS_DIR, help="where results go"
    )
    args = parser.parse_args(argv)
    from bench.fedkseed_protocol.report import render

    if args.render:
        return render_saved(args.render, partial(render, plot_dir=args.render.parent))
    quiet_environment()
    methods = chosen_names(args.configs, METHODS, "methods")
    datasets = chosen_names(args.data, tuple(DATASETS), "datasets")
    if args.seeds < 0:
        parser.error("--seeds must be at least 1 (0: the preset's)")
    preset = PRESETS[args.preset]
    seeds = args.seeds or preset.seeds
    if preset.name == "quick":
        import torch

        # tiny-llama gains nothing from threads; one avoids spin-waits on a busy CPU
        torch.set_num_threads(1)
    stem = stem_of(preset.name)
    path = args.out_dir / f"{stem}.json"
    results: dict[str, Any] = {
        "started": utc_stamp(),
        "machine": machine_info(),
        "stem": stem,
        "preset": json.loads(json.dumps(asdict(preset))),  # as the JSON reads back
        "seeds": seeds,
        "method_labels": METHOD_LABELS,
        "published": PUBLISHED,
        "runs": [],
    }
    if args.resume and path.exists():
        old = resume_runs(results, path, lambda r: r["result"]["status"] == "completed")
        if old.get("preset") != results["preset"]:
            parser.error(
                f"{path} was run with other settings; move it or drop --resume"
            )
        results["seeds"] = max(seeds, int(old.get("seeds", 1)))
    from bench.fedkseed_protocol.runs import run_once

    def run_one(run: dict[str, Any], work: Path) -> dict[str, Any]:
        overrides = run_overrides(
            preset, dataset=run["dataset"], method=run["method"], seed=run["seed"]
        )
        return {"overrides": overrides, **run_once(overrides, work)}

    run_pending(
        results,
        plan(datasets, methods, seeds),
        key=key,
        run_one=run_one,
        stem=stem,
        out_dir=args.out_dir,
        max_runs=args.max_runs,
        scratch_prefix="pollinate-fedkseed-protocol-",
        metric_label="Rouge-L",
    )
    return finish_runs(results, stem, render, args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
