"""``--rerun``: redo parts of the saved full result and re-render its report.

Section 5 runs (``lora``, ``fedkseed``, ``fedkseed-pro``) and/or ``step``
(section 2) and ``replay`` (section 4) are measured again; what they replace
is kept in the JSON (``remeasured.replaced`` / ``rerun.replaced``), and the
JSON is rewritten after each item so a killed rerun loses nothing.
"""

from __future__ import annotations

import argparse
import gc
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.fedkseed.replay import section_replay
from bench.fedkseed.report import render
from bench.fedkseed.settings import MODEL, SIM_RUNS
from bench.fedkseed.simulate import outcome, run_with_retry, sim_extra
from bench.fedkseed.step_time import section_step
from bench.harness import RESULTS_DIR, now, read_json, write_json

RERUN_ITEMS = (*SIM_RUNS, "step", "replay")


def _kept(old: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: old.get(k) for k in keys}


def _remeasure(
    results: dict[str, Any], names: list[str], args: argparse.Namespace, stamp: dict
) -> None:
    """Sections 2 and/or 4 again, on a freshly loaded model."""
    from models import load_causal_lm
    from protocols.seeds import ParamWalk

    loaded = load_causal_lm(MODEL, dtype="float32", device="cpu")
    params = ParamWalk.from_model(loaded.model).params(loaded.model)
    if "step" in names:
        old = results.get("step", {})
        results["step"] = section_step(
            loaded.model, loaded.tokenizer, params, args.steps
        )
        results["step"]["remeasured"] = {
            **stamp,
            "replaced": _kept(
                old,
                ("forward_ms_mean", "perturb_ms_mean", "step_ms_mean", "load_average"),
            ),
        }
    if "replay" in names:
        old = results.get("replay", {})
        results["replay"] = section_replay(params, args.replay_seeds, 2)
        results["replay"]["remeasured"] = {
            **stamp,
            "load_average_at_end": os.getloadavg(),
            "replaced": _kept(
                old,
                (
                    "replay_s_per_seed",
                    "floor_s_per_seed",
                    "torch_int_backend_cpu_values_per_s",
                ),
            ),
        }
    del loaded, params
    gc.collect()


def rerun(args: argparse.Namespace) -> int:
    """Redo the items of ``args.rerun`` in ``results/fedkseed.json``; re-render it.

    Section 5 runs keep their run folders under ``args.sim_root``, so a
    rerun that is killed is continued by the next one.

    Raises
    ------
    SystemExit
        If an item is not one of :data:`RERUN_ITEMS`.
    """
    path = RESULTS_DIR / "fedkseed.json"
    md = path.with_suffix(".md")
    results = read_json(path)
    names = [n for n in args.rerun.split(",") if n]
    for name in names:
        if name not in RERUN_ITEMS:
            raise SystemExit(
                f"--rerun: {name!r} is not one of {SIM_RUNS} or step, replay"
            )
    stamp = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "reason": args.rerun_reason,
        "load_average_at_start": os.getloadavg(),
    }
    results.setdefault("reruns", []).append({**stamp, "items": names})
    results.setdefault("first_pass_seconds", results.get("total_seconds", 0.0))

    def save(seconds: float) -> None:
        results["total_seconds"] = results.get("total_seconds", 0.0) + seconds
        write_json(path, results)

    if "step" in names or "replay" in names:
        t0 = now()
        _remeasure(results, names, args, stamp)
        save(now() - t0)
    task = results["task"]
    zo = task["settings"]["zo"]
    for name in [n for n in names if n in SIM_RUNS]:
        t0 = now()
        old = task["runs"].get(name, {})
        extra = sim_extra(
            name, zo["local_steps"], zo["batch_size"], zo["learning_rate"]
        )
        new = run_with_retry(name, extra, Path(args.sim_root), args.sim_timeout)
        new["rerun"] = {
            **stamp,
            "replaced": outcome(old, "metrics", "log_tail"),
        }
        task["runs"][name] = new
        task["rerun_seconds"] = task.get("rerun_seconds", 0.0) + (now() - t0)
        save(now() - t0)
        md.write_text(render(results))
    table = render(results)
    md.write_text(table)
    print(table)
    return 0
