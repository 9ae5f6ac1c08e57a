"""``python -m bench.robustness``: attacks against each aggregator, DP utility, SecAgg cost.

Sections (``--only``, comma-separated):

``honest``
    Honest federations, plain FedAvg (``mean``) against the default bounded
    mean (``clipped_mean``), over three seeds: how much the default bounds
    cost an honest run, against the seed-to-seed spread.
``attacks``
    For LoRA and FedKSeed, every attack behaviour with 10% and 25% malicious
    clients, under each aggregator (mean, clipped mean, median, trimmed mean,
    Krum): the task metric and eval loss after equal rounds.
``dp``
    Central DP for LoRA and FedKSeed at several noise multipliers: utility
    against the epsilon the accountant reports.
``secagg``
    The same federation with and without SecAgg+ (equal weights, no clip on
    either, as SecAgg+ requires): bytes and seconds per round.

Each finished run is written to ``results/robustness.json`` at once, so an
interrupted benchmark continues where it stopped (``--resume``); ``--render``
only rewrites the markdown and the plot from the JSON.
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
    finish_runs,
    machine_info,
    quiet_environment,
    render_saved,
    resume_runs,
    run_pending,
    utc_stamp,
)
from bench.robustness.settings import FULL, NAME, QUICK, Scale, run_overrides

SECTIONS = ("honest", "attacks", "dp", "secagg")
HONEST_SEEDS = (0, 1, 2)


def plan(scale: Scale, sections: set[str]) -> list[dict[str, Any]]:
    """Every run of the chosen sections, each a dict of its labels.

    Ordered so that a partial run is already useful: the attacks at the
    largest share first (every aggregator, both methods), then the smaller
    share, then the honest seeds and the DP grid.
    """
    runs: list[dict[str, Any]] = []
    if "attacks" in sections:
        for fraction in (0.0, *sorted(scale.fractions, reverse=True)):
            behaviours = ("none",) if fraction == 0.0 else scale.behaviours
            for behaviour in behaviours:
                for method in scale.methods:
                    for aggregator in scale.aggregators:
                        runs.append(
                            {
                                "section": "attacks",
                                "method": method,
                                "aggregator": aggregator,
                                "behaviour": behaviour,
                                "fraction": fraction,
                            }
                        )
    if "honest" in sections:
        for method in scale.methods:
            for aggregator in ("mean", "clipped_mean"):
                for seed in HONEST_SEEDS:
                    runs.append(
                        {
                            "section": "honest",
                            "method": method,
                            "aggregator": aggregator,
                            "seed": seed,
                        }
                    )
    if "dp" in sections:
        for method in scale.methods:
            for sigma in scale.dp_sigmas:
                runs.append({"section": "dp", "method": method, "sigma": sigma})
    if "secagg" in sections:
        for method in scale.methods:
            for secure in (False, True):
                runs.append({"section": "secagg", "method": method, "secure": secure})
    return runs


def key(run: dict[str, Any]) -> str:
    """A run's identity in the results file."""
    return "/".join(f"{k}={run[k]}" for k in sorted(run) if k != "result")


def overrides_of(
    scale: Scale, run: dict[str, Any], done: list[dict[str, Any]]
) -> dict[str, Any]:
    """The config of a planned run (``done``: the runs finished so far)."""
    if run["section"] == "dp":
        return run_overrides(
            scale,
            method=run["method"],
            privacy={
                "mode": "central",
                "noise_multiplier": run["sigma"],
                "clip_norm": dp_clip(run["method"], done),
                "noise_seed": 7,
            },
        )
    if run["section"] == "secagg":
        out = run_overrides(scale, method=run["method"], aggregator="mean")
        out.update(
            {
                "federation.weighting": "equal",
                "federation.clip": "off",
                "privacy.secagg": run["secure"],
            }
        )
        if run["method"].startswith("fedkseed"):
            # SecAgg+ needs every per-seed sum within its clip (a power of 2).
            out.update({"zo.max_abs_grad": 1000.0, "privacy.secagg_clip": 1024.0})
        return out
    return run_overrides(
        scale,
        method=run["method"],
        aggregator=run["aggregator"],
        behaviour=run.get("behaviour", "none"),
        fraction=run.get("fraction", 0.0),
        seed=run.get("seed", 0),
    )


DP_CLIP_FALLBACK = {"lora": 0.05, "fedkseed": 50.0, "fedkseed-pro": 50.0}


def dp_clip(method: str, done: list[dict[str, Any]]) -> float:
    """The central DP clip norm C: an honest client's typical update size.

    Taken from the honest ``clipped_mean`` run of the attack section, whose
    first round clipped at ``clip_multiple`` (3) times the median size (LoRA:
    the adapter change's L2 norm; FedKSeed: the largest |g|, an upper bound
    of one step's per-seed sum); a fallback when that run is absent.
    """
    for r in done:
        if (r["section"], r["method"], r.get("aggregator"), r.get("behaviour")) == (
            "attacks",
            method,
            "clipped_mean",
            "none",
        ) and (r["result"].get("clip_bound") or [None])[0]:
            return float(r["result"]["clip_bound"][0]) / 3.0
    return DP_CLIP_FALLBACK[method]


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections; write the JSON after every run, then the report."""
    parser = benchmark_parser(
        f"python -m bench.{NAME}",
        "Defences against hostile clients, DP utility, on SmolLM2-135M (in process).",
        "examples:\n  python -m bench.robustness --only honest\n"
        "  python -m bench.robustness --resume\n"
        "  python -m bench.robustness --quick\n"
        "  python -m bench.robustness --render",
    )
    add_render_option(parser, NAME)
    parser.add_argument("--quick", action="store_true", help="tiny model, a few runs")
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections to run")
    add_resume_options(parser)
    args = parser.parse_args(argv)
    from bench.robustness.report import render

    if args.render:
        return render_saved(args.render, partial(render, plot_dir=args.render.parent))
    quiet_environment()
    sections = {s for s in args.only.split(",") if s}
    unknown = sections - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; known: {list(SECTIONS)}")
    scale = QUICK if args.quick else FULL
    stem = f"{NAME}-quick" if args.quick else NAME
    path = RESULTS_DIR / f"{stem}.json"
    results: dict[str, Any] = {
        "started": utc_stamp(),
        "machine": machine_info(),
        "stem": stem,
        "scale": {k: v for k, v in vars(scale).items() if k != "extra"},
        "runs": [],
    }
    if args.resume and path.exists():
        # A run an attack stopped (FederationError) is a result; other
        # failures (a crash, an interrupted run) are run again.
        resume_runs(
            results,
            path,
            lambda r: (
                r["result"]["status"] == "completed"
                or r["result"]["status"].startswith("FederationError")
            ),
        )
    from bench.robustness.runs import run_once

    def run_one(run: dict[str, Any], work: Path) -> dict[str, Any]:
        return run_once(overrides_of(scale, run, results["runs"]), work)

    run_pending(
        results,
        plan(scale, sections),
        key=key,
        run_one=run_one,
        stem=stem,
        out_dir=RESULTS_DIR,
        max_runs=args.max_runs,
        scratch_prefix="pollinate-robustness-",
    )
    return finish_runs(results, stem, render, RESULTS_DIR)


if __name__ == "__main__":
    sys.exit(main())
