"""``python -m bench.zo_adapter``: FedKSeed over a LoRA adapter, tuned until held-out Rouge-L rises.

Runs (:mod:`bench.zo_adapter.settings`): by default
:data:`~bench.zo_adapter.settings.DEFAULT_PLAN` (three settings on the
built-in tasks, two on Natural Instructions); ``--data`` and ``--settings``
choose others (every chosen setting on every chosen dataset). Each finished run is written to ``results/zo_adapter.json``
at once; ``--resume`` keeps the completed ones. ``--render`` only rewrites
the markdown and plot.
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
from bench.zo_adapter.settings import (
    DATASETS,
    DEFAULT_PLAN,
    FULL,
    NAME,
    QUICK,
    SETTINGS,
    run_overrides,
)


def plan(
    datasets: list[str] | None, settings: list[str] | None
) -> list[dict[str, Any]]:
    """The runs: :data:`DEFAULT_PLAN`, or every chosen setting on every chosen dataset."""
    if datasets is None and settings is None:
        pairs = list(DEFAULT_PLAN)
    else:
        pairs = [
            (d, s) for d in (datasets or list(DATASETS)) for s in (settings or SETTINGS)
        ]
    return [{"dataset": d, "setting": s, "seed": 0} for d, s in pairs]


def key(run: dict[str, Any]) -> str:
    """A run's identity in the results file."""
    return f"{run['dataset']}/{run['setting']}/seed={run['seed']}"


def _list(text: str | None, known: list[str], what: str) -> list[str] | None:
    """``None`` when the option is absent, else its names (at least one)."""
    if text is None:
        return None
    chosen = chosen_names(text, known, what)
    if not chosen:
        raise SystemExit(f"no {what} in {text!r}; known: {known}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    """Run the planned runs; write the JSON after every run, then the report."""
    parser = benchmark_parser(
        f"python -m bench.{NAME}",
        "FedKSeed over a LoRA adapter on SmolLM2-135M: held-out Rouge-L against "
        "MeZO steps for several (rank, eps, learning rate) settings (in process).",
        "examples:\n  python -m bench.zo_adapter              # < 2 h, 2 idle cores\n"
        "  python -m bench.zo_adapter --resume     # continue an interrupted run\n"
        "  python -m bench.zo_adapter --data ni --settings r2-lr1e-3\n"
        "  python -m bench.zo_adapter --quick      # tiny-llama, < 1 min\n"
        "  python -m bench.zo_adapter --render",
    )
    add_render_option(parser, NAME)
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes")
    parser.add_argument("--data", help=f"datasets: {','.join(DATASETS)}")
    parser.add_argument("--settings", help=f"settings: {','.join(SETTINGS)}")
    add_resume_options(parser)
    parser.add_argument(
        "--out-dir", type=Path, default=RESULTS_DIR, help="where results go"
    )
    args = parser.parse_args(argv)
    from bench.zo_adapter.report import render

    if args.render:
        return render_saved(args.render, partial(render, plot_dir=args.render.parent))
    quiet_environment()
    datasets = _list(args.data, list(DATASETS), "datasets")
    settings = _list(args.settings, list(SETTINGS), "settings")
    scale = QUICK if args.quick else FULL
    if args.quick:
        import torch

        torch.set_num_threads(1)  # tiny-llama gains nothing from threads
    stem = f"{NAME}-quick" if args.quick else NAME
    path = args.out_dir / f"{stem}.json"
    results: dict[str, Any] = {
        "started": utc_stamp(),
        "machine": machine_info(),
        "stem": stem,
        "scale": {name: vars(s) for name, s in scale.items()},
        "settings": {name: vars(s) for name, s in SETTINGS.items()},
        "runs": [],
    }
    if args.resume and path.exists():
        old = resume_runs(results, path, lambda r: r["result"]["status"] == "completed")
        if old.get("scale") != results["scale"]:
            parser.error(f"{path} was run at another scale; move it or drop --resume")
    from bench.fedkseed_protocol.runs import run_once

    def run_one(run: dict[str, Any], work: Path) -> dict[str, Any]:
        overrides = run_overrides(
            scale[run["dataset"]],
            dataset=run["dataset"],
            setting=run["setting"],
            seed=run["seed"],
        )
        return run_once(overrides, work)

    run_pending(
        results,
        plan(datasets, settings),
        key=key,
        run_one=run_one,
        stem=stem,
        out_dir=args.out_dir,
        max_runs=args.max_runs,
        scratch_prefix="pollinate-zo-adapter-",
        metric_label="Rouge-L",
    )
    return finish_runs(results, stem, render, args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
