"""The robustness benchmark's report: markdown tables and a plot, from the JSON alone."""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import markdown_table, save_figure


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _loss(value: Any) -> str:
    if value is None:
        return "NaN/-"
    return f"{value:.3g}" if abs(value) >= 1e4 else f"{value:.3f}"


def _cell(result: dict[str, Any]) -> str:
    """``metric% (loss)``; a run the attack stopped: the round it failed in."""
    if result["status"] != "completed":
        found = re.search(r"round (\d+): no usable update", result["status"])
        if found:
            return f"wrecked: round {found.group(1)} failed"
        return "failed: " + result["status"].split(":")[0]
    return f"{_pct(result['metric_last'])} ({_loss(result['eval_loss_last'])})"


def _runs(results: dict[str, Any], section: str) -> list[dict[str, Any]]:
    return [r for r in results.get("runs", []) if r["section"] == section]


def _honest(results: dict[str, Any]) -> list[str]:
    runs = _runs(results, "honest")
    if not runs:
        return []
    rows = []
    for method in sorted({r["method"] for r in runs}):
        for aggregator in ("mean", "clipped_mean"):
            mine = [
                r["result"]
                for r in runs
                if r["method"] == method
                and r["aggregator"] == aggregator
                and r["result"]["status"] == "completed"
            ]
            metrics = [m["metric_last"] for m in mine if m["metric_last"] is not None]
            losses = [
                m["eval_loss_last"] for m in mine if m["eval_loss_last"] is not None
            ]
            rows.append(
                {
                    "method": method,
                    "aggregation": aggregator,
                    "seeds": len(mine),
                    "Rouge-L % (mean +- sd)": _spread(metrics, 100),
                    "eval loss (mean +- sd)": _spread(losses, 1),
                    "clients clipped per round": _mean(
                        [c for m in mine for c in m["clipped"] if c is not None]
                    ),
                }
            )
    return [
        "## Honest federations: plain FedAvg against the default bounds",
        "",
        *markdown_table(rows, list(rows[0]), align="llrrrr"),
        "",
    ]


def _spread(values: Sequence[float], scale: float) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{scale * values[0]:.3f}"
    return f"{scale * statistics.mean(values):.3f} +- {scale * statistics.stdev(values):.3f}"


def _mean(values: Sequence[float]) -> str:
    return f"{statistics.mean(values):.2f}" if values else "-"


def _attacks(results: dict[str, Any]) -> list[str]:
    runs = _runs(results, "attacks")
    if not runs:
        return []
    out = [
        "## Attacks: final Rouge-L % (eval loss) after equal rounds",
        "",
        "Rows: attack and malicious clients; columns: aggregator "
        "(`mean` = plain FedAvg, no bounds; `clipped_mean` = Pollinate's default). "
        "`wrecked: round N failed`: the attack made every client's next "
        "training loss NaN, so no update was usable and the run stopped "
        "(its last checkpoint is the round before). Krum is told "
        "`federation.byzantine` = round(share x clients) with Python's rounding "
        "(2 at 25%: one fewer than the 3 attackers; 1 at 10%).",
        "",
    ]
    aggregators = list(dict.fromkeys(r["aggregator"] for r in runs))
    for method in list(dict.fromkeys(r["method"] for r in runs)):
        first = next(
            (
                r["result"]
                for r in runs
                if r["method"] == method and r["result"]["eval_loss_first"] is not None
            ),
            None,
        )
        before = (
            []
            if first is None
            else [
                f"Before training (round 0): Rouge-L {_pct(first['metric_first'])}%, "
                f"eval loss {_loss(first['eval_loss_first'])}.",
                "",
            ]
        )
        table: dict[tuple[str, float], dict[str, str]] = {}
        for r in runs:
            if r["method"] != method:
                continue
            row = table.setdefault(
                (r["behaviour"], r["fraction"]),
                {"attack": r["behaviour"], "malicious": _share(r["fraction"], results)},
            )
            row[r["aggregator"]] = _cell(r["result"])
        out += [
            f"### {method}",
            "",
            *before,
            *markdown_table(
                list(table.values()),
                ["attack", "malicious", *aggregators],
                align="lr" + "r" * len(aggregators),
            ),
            "",
        ]
    return out


def _share(fraction: float, results: dict[str, Any]) -> str:
    """``k of n (p%)``: the malicious clients, counted as simulation.attacks does."""
    n = int(results.get("scale", {}).get("clients", 0))
    k = int(fraction * n + 0.5)
    return f"{k} of {n} ({100 * fraction:.0f}%)" if n else f"{100 * fraction:.0f}%"


def _dp(results: dict[str, Any]) -> list[str]:
    runs = _runs(results, "dp")
    if not runs:
        return []
    rows = [
        {
            "method": r["method"],
            "noise multiplier": r["sigma"],
            "epsilon": "-"
            if r["result"]["epsilon"] is None
            else f"{r['result']['epsilon']:.3g}",
            "Rouge-L %": _pct(r["result"]["metric_last"]),
            "eval loss": _loss(r["result"]["eval_loss_last"]),
            "status": r["result"]["status"],
        }
        for r in runs
    ]
    return [
        "## Central DP: utility against epsilon",
        "",
        *markdown_table(rows, list(rows[0]), align="lrrrrl"),
        "",
    ]


def _secagg(results: dict[str, Any]) -> list[str]:
    runs = _runs(results, "secagg")
    if not runs:
        return []
    rows = []
    for r in runs:
        res = r["result"]
        seconds = [x for x in res.get("round_seconds", []) if x is not None]
        rows.append(
            {
                "method": r["method"],
                "aggregation": "SecAgg+" if r["secure"] else "plain FedAvg",
                "MB per round (up + down)": "-"
                if res["bytes_per_round"] is None
                else f"{res['bytes_per_round'] / 1e6:.3f}",
                "s per round": f"{statistics.mean(seconds):.1f}" if seconds else "-",
                "Rouge-L %": _pct(res["metric_last"]),
                "eval loss": _loss(res["eval_loss_last"]),
                "status": res["status"],
            }
        )
    return [
        "## SecAgg+ against plain FedAvg (equal weights, no clip on either)",
        "",
        *markdown_table(rows, list(rows[0]), align="llrrrrl"),
        "",
    ]


def _plot(results: dict[str, Any], plot_dir: Path) -> str | None:
    """``robustness.png``: eval loss per attack and aggregator, and utility vs epsilon."""
    runs = _runs(results, "attacks")
    dp = _runs(results, "dp")
    if not runs and not dp:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in runs + dp))
    panels = len(methods) + (1 if dp else 0)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    axes = list(axes[0])
    for ax, method in zip(axes, methods, strict=False):
        mine = [r for r in runs if r["method"] == method]
        scenarios = list(dict.fromkeys((r["behaviour"], r["fraction"]) for r in mine))
        aggregators = list(dict.fromkeys(r["aggregator"] for r in mine))
        width = 0.8 / max(1, len(aggregators))
        for j, agg in enumerate(aggregators):
            ys = []
            for s in scenarios:
                res = next(
                    (
                        r["result"]
                        for r in mine
                        if (r["behaviour"], r["fraction"]) == s
                        and r["aggregator"] == agg
                    ),
                    None,
                )
                if res is None:  # not run (yet)
                    ys.append(float("nan"))
                    continue
                loss = res["eval_loss_last"]
                ys.append(loss if loss is not None and loss < 1e6 else 1e6)
            ax.bar([i + j * width for i in range(len(scenarios))], ys, width, label=agg)
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 for i in range(len(scenarios))])
        ax.set_xticklabels(
            [f"{b}\n{100 * f:.0f}%" for b, f in scenarios], rotation=60, fontsize=7
        )
        ax.set_ylabel("final eval loss (log; 1e6 = diverged)")
        ax.set_title(f"{method}: attacks by aggregator")
        ax.legend(fontsize=7)
    if not dp:
        return save_figure(fig, plot_dir, results.get("stem", "robustness"))
    ax = axes[-1]
    for method in methods:
        pts = sorted(
            (r["result"]["epsilon"], r["result"]["eval_loss_last"])
            for r in dp
            if r["method"] == method
            and r["result"]["epsilon"] is not None
            and r["result"]["eval_loss_last"] is not None
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (delta = 1/(10 N))")
    ax.set_ylabel("final eval loss")
    ax.set_title("central DP: utility vs epsilon")
    ax.legend(fontsize=7)
    return save_figure(fig, plot_dir, results.get("stem", "robustness"))


def render(results: dict[str, Any], plot_dir: Path | None = None) -> str:
    """The markdown report (and the plot beside it when ``plot_dir`` is given)."""
    m = results.get("machine", {})
    scale = results.get("scale", {})
    lines = [
        "# Robustness and privacy benchmark",
        "",
        f"{results.get('started', '?')} to {results.get('finished', 'unfinished')}, "
        f"{m.get('cpu_count', '?')} CPU ({m.get('cpu_model', '?')}), torch "
        f"{m.get('torch', '?')}. Model {scale.get('model')}, "
        f"{scale.get('clients')} clients (all sampled), {scale.get('rounds')} rounds of "
        f"{scale.get('local_steps')} local steps (batch {scale.get('batch_size')}, "
        f"{scale.get('max_length')} tokens), Rouge-L on {scale.get('eval_examples')} "
        "held-out Natural Instructions examples. Raw numbers: the JSON beside this file.",
        "",
    ]
    lines += _honest(results) + _attacks(results) + _dp(results) + _secagg(results)
    if plot_dir is not None:
        name = _plot(results, plot_dir)
        if name:
            lines += [
                f"![eval loss by attack and aggregator, and DP utility]({name})",
                "",
            ]
    return "\n".join(lines)
