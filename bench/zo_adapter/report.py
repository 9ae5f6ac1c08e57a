"""The adapter-mode tuning benchmark's report: a table per dataset and a plot, from the JSON.

A run *rises* when its last evaluation's Rouge-L 95% interval lies wholly
above the base model's (round 0): the held-out examples being the same, an
interval apart is a change the evaluation's own noise does not explain.
Everything here reads the results dict alone (``--render`` rebuilds a saved
result).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.harness import markdown_table, save_figure
from bench.zo_adapter.settings import DATASET_NAMES


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _interval(low: float | None, high: float | None) -> str:
    return "-" if low is None or high is None else f"[{_pct(low)}, {_pct(high)}]"


def steps_per_round(run: dict[str, Any], results: dict[str, Any]) -> int:
    """Local steps per round of ``run`` (its dataset's scale)."""
    return int(results["scale"][run["dataset"]]["local_steps"])


def verdict(result: dict[str, Any]) -> str:
    """``rises``, ``falls``, ``flat`` (intervals overlap) or ``-`` (no curve)."""
    curve = result.get("curve") or []
    if len(curve) < 2 or None in (*curve[0][3:5], *curve[-1][3:5]):
        return "-"
    first, last = curve[0], curve[-1]
    if last[3] > first[4]:
        return "rises"
    if last[4] < first[3]:
        return "falls"
    return "flat"


def first_rise(result: dict[str, Any]) -> int | None:
    """The first evaluated round whose interval lies above round 0's, if any."""
    curve = result.get("curve") or []
    if not curve or curve[0][4] is None:
        return None
    for row in curve[1:]:
        if row[3] is not None and row[3] > curve[0][4]:
            return int(row[0])
    return None


def rows(results: dict[str, Any], dataset: str) -> list[dict[str, Any]]:
    """The table rows of ``dataset``: one per run."""
    out = []
    for run in results.get("runs", []):
        if run["dataset"] != dataset or "result" not in run:
            continue
        res, setting = run["result"], results["settings"][run["setting"]]
        steps = steps_per_round(run, results)
        curve = res.get("curve") or []
        first, last = (curve[0], curve[-1]) if curve else ([None] * 5, [None] * 5)
        rise = first_rise(res)
        out.append(
            {
                "setting": run["setting"],
                "rank": setting["rank"],
                "eps": f"{setting['eps']:g}",
                "lr": f"{setting['learning_rate']:g}",
                "steps": steps * int(res.get("rounds_done") or 0),
                "loss first -> last": (
                    "-"
                    if first[1] is None or last[1] is None
                    else f"{first[1]:.3f} -> {last[1]:.3f}"
                ),
                "Rouge-L % base [95%]": f"{_pct(first[2])} {_interval(*first[3:5])}",
                "Rouge-L % last [95%]": f"{_pct(last[2])} {_interval(*last[3:5])}",
                "verdict": verdict(res),
                "first step above base": "-" if rise is None else rise * steps,
                "s/step incl. eval": (
                    "-"
                    if not res.get("round_seconds")
                    else f"{sum(res['round_seconds']) / len(res['round_seconds']) / steps:.2f}"
                ),
                "status": res["status"],
            }
        )
    return out


def plot(results: dict[str, Any], plot_dir: Path) -> str | None:
    """Held-out Rouge-L against steps, one panel per dataset, 95% bands."""
    datasets = [d for d in DATASET_NAMES if rows(results, d)]
    if not datasets:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4))
    for ax, dataset in zip(list(getattr(axes, "flat", [axes])), datasets, strict=True):
        for run in results["runs"]:
            if run["dataset"] != dataset or "result" not in run:
                continue
            curve = run["result"].get("curve") or []
            if not curve:
                continue
            steps = steps_per_round(run, results)
            x = [row[0] * steps for row in curve]
            y = [100 * row[2] for row in curve]
            (line,) = ax.plot(x, y, marker="o", label=run["setting"])
            if all(row[3] is not None and row[4] is not None for row in curve):
                ax.fill_between(
                    x,
                    [100 * row[3] for row in curve],
                    [100 * row[4] for row in curve],
                    color=line.get_color(),
                    alpha=0.15,
                )
        ax.set_title(DATASET_NAMES[dataset], fontsize=10)
        ax.set_xlabel("MeZO steps (one client, batch 8)")
        ax.set_ylabel("held-out Rouge-L % (95% band)")
        ax.legend(fontsize=8)
    fig.suptitle("FedKSeed over a LoRA adapter on SmolLM2-135M: held-out Rouge-L")
    return save_figure(fig, plot_dir, results["stem"])


def render(results: dict[str, Any], plot_dir: Path | None = None) -> str:
    """The markdown report (and the plot beside the JSON when ``plot_dir``)."""
    lines = [
        "# FedKSeed over a LoRA adapter: held-out Rouge-L against steps",
        "",
        f"Model {results['scale']['builtin']['model']}; one client, so a round's "
        "steps are sequential MeZO steps; Rouge-L on the run's held-out examples "
        "after every round, round 0 being the base model. *rises*: the last "
        "interval lies above the base model's. Started "
        f"{results.get('started')}, finished {results.get('finished', '-')}.",
        "",
    ]
    for dataset, name in DATASET_NAMES.items():
        table = rows(results, dataset)
        if not table:
            continue
        scale = results["scale"][dataset]
        lines += [
            f"## {name}",
            "",
            f"{scale['eval_examples']} held-out examples, {scale['new_tokens']} new "
            f"tokens, {scale['max_length']} tokens per example, batch "
            f"{scale['batch_size']}.",
            "",
            *markdown_table(table, list(table[0])),
            "",
        ]
    if plot_dir is not None:
        saved = plot(results, plot_dir)
        if saved is not None:
            lines += [f"![held-out Rouge-L]({saved})", ""]
    return "\n".join(lines)
