"""The FedKSeed-protocol report: tables, the published numbers, a verdict, a plot.

Everything here reads the results dict alone (``--render`` rebuilds a saved
result): the preset, the methods' settings and the published numbers are in
it, falling back to :mod:`bench.fedkseed_protocol.settings`. The verdict
(:func:`compare`) is derived from the numbers: on each seed a method and
FedIT are scored on the same held-out examples, and they *differ beyond
their intervals* on that seed when their bootstrap 95% intervals do not
overlap.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.fedkseed_protocol.settings import (
    DATASET_NAMES,
    METHOD_LABELS,
    METHODS,
    PUBLISHED,
)
from bench.harness import markdown_table, save_figure

BASELINE = "fedit"
"""The method every other is compared with."""


def _ok(run: dict[str, Any]) -> bool:
    res = run["result"]
    return res["status"] == "completed" and res.get("metric_last") is not None


def _mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def _present(values: list[Any]) -> list[float]:
    return [float(v) for v in values if v is not None]


def summary(results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Dataset -> method -> the completed seeds' numbers and their means.

    Each cell: ``seeds`` (completed), ``per_seed`` (seed -> (metric, low,
    high)), ``metric`` (mean over seeds), ``metric_sd`` (their standard
    deviation, ``None`` below two seeds), ``low`` / ``high`` (the per-run
    intervals' mean bounds), ``metric_first`` (round 0), ``loss_first`` /
    ``loss``, ``bytes_down`` / ``bytes_up`` (per client-round),
    ``round_bytes`` (down + up per round), ``clients_per_round``,
    ``seconds`` (per run), ``overlap`` (held-out groups some client trained
    on, over every run) and ``failed`` (errors of runs that did not
    complete).
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for run in results.get("runs", []):
        cell = out.setdefault(run["dataset"], {}).setdefault(
            run["method"], {"runs": [], "failed": []}
        )
        if _ok(run):
            cell["runs"].append((run["seed"], run["result"]))
        else:
            cell["failed"].append(run["result"]["status"])
    for per_method in out.values():
        for cell in per_method.values():
            done = cell.pop("runs")
            res = [r for _, r in done]
            metrics = [r["metric_last"] for r in res]
            rounds = [
                (r.get("round_bytes_down") or 0.0) + (r.get("round_bytes_up") or 0.0)
                for r in res
                if r.get("round_bytes_down") is not None
            ]
            cell.update(
                seeds=len(done),
                per_seed={
                    s: (r["metric_last"], r.get("metric_low"), r.get("metric_high"))
                    for s, r in done
                },
                metric=_mean(metrics),
                metric_sd=statistics.stdev(metrics) if len(metrics) > 1 else None,
                low=_mean(_present([r.get("metric_low") for r in res])),
                high=_mean(_present([r.get("metric_high") for r in res])),
                metric_first=_mean(_present([r.get("metric_first") for r in res])),
                loss_first=_mean(_present([r.get("eval_loss_first") for r in res])),
                loss=_mean(_present([r.get("eval_loss_last") for r in res])),
                bytes_down=_mean(_present([r.get("bytes_down") for r in res])),
                bytes_up=_mean(_present([r.get("bytes_up") for r in res])),
                round_bytes=_mean(rounds),
                clients_per_round=_mean(
                    _present([r.get("clients_per_round") for r in res])
                ),
                seconds=_mean([r["seconds"] for r in res]),
                overlap=sorted({g for r in res for g in r.get("overlap") or []}),
                groups_known=all("overlap" in r for r in res),
            )
    return out


def _separated(a: tuple[Any, ...], b: tuple[Any, ...]) -> int:
    """+1 if interval ``a`` lies above ``b``, -1 if below, 0 if they overlap or are unknown."""
    _, a_low, a_high = a
    _, b_low, b_high = b
    if None in (a_low, a_high, b_low, b_high):
        return 0
    if a_low > b_high:
        return 1
    if a_high < b_low:
        return -1
    return 0


def compare(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each method against FedIT, per dataset, on the seeds both completed.

    Returns
    -------
    list[dict[str, Any]]
        One dict per (dataset, method): ``dataset``, ``method``, ``seeds``
        (shared), ``diff`` (mean Rouge-L difference, method - FedIT),
        ``above`` / ``below`` (seeds whose intervals lie wholly above / below
        FedIT's), ``beyond`` (every shared seed separated in one direction),
        ``bytes_ratio`` (FedIT's bytes per round over the method's).
    """
    table = summary(results)
    out = []
    for dataset, per_method in table.items():
        base = per_method.get(BASELINE)
        if base is None:
            continue
        for method, cell in per_method.items():
            if method == BASELINE:
                continue
            shared = sorted(set(cell["per_seed"]) & set(base["per_seed"]))
            signs = [
                _separated(cell["per_seed"][s], base["per_seed"][s]) for s in shared
            ]
            diffs = [cell["per_seed"][s][0] - base["per_seed"][s][0] for s in shared]
            above, below = signs.count(1), signs.count(-1)
            ratio = (
                base["round_bytes"] / cell["round_bytes"]
                if base["round_bytes"] and cell["round_bytes"]
                else None
            )
            out.append(
                {
                    "dataset": dataset,
                    "method": method,
                    "seeds": len(shared),
                    "diff": _mean(diffs),
                    "above": above,
                    "below": below,
                    "beyond": bool(shared) and max(above, below) == len(shared),
                    "bytes_ratio": ratio,
                }
            )
    return out


def _labels(results: dict[str, Any]) -> dict[str, str]:
    return results.get("method_labels") or METHOD_LABELS


def _pct(value: float | None, sd: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}" + ("" if sd is None else f" +- {100 * sd:.2f}")


def _interval(cell: dict[str, Any]) -> str:
    runs = [
        f"[{100 * lo:.1f}, {100 * hi:.1f}]"
        for _, lo, hi in cell["per_seed"].values()
        if lo is not None and hi is not None
    ]
    return " ".join(runs) or "-"


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f} MB"
    return f"{value / 1e3:.1f} KB"


def _loss(cell: dict[str, Any]) -> str:
    if cell["loss"] is None:
        return "-"
    first = "?" if cell["loss_first"] is None else f"{cell['loss_first']:.3f}"
    return f"{first} -> {cell['loss']:.3f}"


def _heldout(cell: dict[str, Any]) -> str:
    if not cell["seeds"]:
        return "-"
    if not cell["groups_known"]:
        return "not read"
    if cell["overlap"]:
        return "NO: " + ", ".join(cell["overlap"])
    return "yes"


def results_table(results: dict[str, Any]) -> list[str]:
    """One row per dataset and method: Rouge-L, intervals, loss, bytes, time."""
    table = summary(results)
    labels = _labels(results)
    rows = []
    for dataset in ("ni", "dolly"):
        for method in METHODS:
            cell = table.get(dataset, {}).get(method)
            if cell is None:
                continue
            rows.append(
                {
                    "data": dataset,
                    "method": labels.get(method, method),
                    "seeds": cell["seeds"],
                    "Rouge-L % (mean +- sd over seeds)": _pct(
                        cell["metric"], cell["metric_sd"]
                    ),
                    "95% interval per run": _interval(cell),
                    "round 0": _pct(cell["metric_first"]),
                    "eval loss (0 -> last)": _loss(cell),
                    "down / up per client-round": (
                        f"{_bytes(cell['bytes_down'])} / {_bytes(cell['bytes_up'])}"
                    ),
                    "bytes per round": _bytes(cell["round_bytes"]),
                    "clients / round": "-"
                    if cell["clients_per_round"] is None
                    else f"{cell['clients_per_round']:.1f}",
                    "s per run": "-"
                    if cell["seconds"] is None
                    else f"{cell['seconds']:.0f}",
                    "held-out groups unseen": _heldout(cell),
                    "failed": "; ".join(f[:160] for f in cell["failed"]),
                }
            )
    if not rows:
        return ["No run has completed yet."]
    return markdown_table(rows, list(rows[0]), align="llrrlrlllrrll")


def published_table(results: dict[str, Any]) -> list[str]:
    """Ours beside FedKSeed's Table 2 (Rouge-L %), FedKSeed and FedIT."""
    table = summary(results)
    published = results.get("published") or PUBLISHED
    labels = _labels(results)
    model = results.get("preset", {}).get("model", "?")
    rows = []
    for dataset in ("ni", "dolly"):
        for method in (BASELINE, "fedkseed"):
            row = {"data": dataset, "method": labels.get(method, method)}
            cell = table.get(dataset, {}).get(method)
            row[f"ours ({model})"] = (
                _pct(cell["metric"], cell["metric_sd"]) if cell else "-"
            )
            for paper_model, per_data in published.items():
                value = per_data.get(dataset, {}).get(method)
                if value is None:
                    row[paper_model] = "-"
                    continue
                mean, spread = value
                row[paper_model] = f"{mean:.2f}" + (
                    "" if spread is None else f" +- {spread:.2f}"
                )
            rows.append(row)
    return markdown_table(rows, list(rows[0]), align="ll" + "r" * (len(rows[0]) - 2))


def verdict(results: dict[str, Any]) -> list[str]:
    """The derived statements: each method against FedIT, beyond the intervals or not."""
    labels = _labels(results)
    lines = []
    for c in compare(results):
        name = labels.get(c["method"], c["method"])
        if not c["seeds"]:
            continue
        ratio = (
            ""
            if c["bytes_ratio"] is None
            else f", at 1/{c['bytes_ratio']:,.0f} of FedIT's bytes per round"
        )
        direction = "above" if c["above"] else "below"
        if c["beyond"]:
            on = "its one seed" if c["seeds"] == 1 else f"all {c['seeds']} seeds"
            what = f"**differs beyond the intervals** ({direction} FedIT on {on})"
        else:
            what = (
                f"**does not differ beyond the intervals** (separated on "
                f"{c['above'] + c['below']} of {c['seeds']} seeds)"
            )
        lines.append(
            f"- {c['dataset']}: {name} - FedIT = {_pct(c['diff'])} Rouge-L points "
            f"(mean over seeds); it {what}{ratio}."
        )
    return lines or ["- FedIT and another method have not both completed a run."]


def _settings(results: dict[str, Any]) -> list[str]:
    p = results.get("preset", {})
    rows = []
    for dataset, d in (p.get("data") or {}).items():
        held = (
            f"{d['heldout_group_count']} tasks (seeded draw)"
            if d.get("heldout_group_count")
            else "summarization"
        )
        rows.append(
            {
                "data": dataset,
                "clients": d["clients"],
                "fraction / round": f"{d['fraction']:.3f}",
                "rounds": d["rounds"],
                "examples read": "all" if d["limit"] is None else d["limit"],
                "held out": held,
                "eval examples": d["eval_examples"],
            }
        )
    lines = [
        f"Preset `{p.get('name', '?')}`: model {p.get('model')}, "
        f"{p.get('local_steps')} local steps of batch {p.get('batch_size')}, "
        f"max_length {p.get('max_length')}, K = {p.get('num_seeds')}, "
        f"{p.get('new_tokens')} new tokens, seeds {results.get('seeds', '?')}; "
        "example-weighted, no clipping; Rouge-L by the `rouge` package "
        "(`rouge_l_fedkseed`) at round 0 and after the last round.",
        "",
    ]
    if rows:
        lines += [*markdown_table(rows, list(rows[0]), align="lrrrrlr"), ""]
    methods = results.get("methods") or p.get("methods") or {}
    for name, overrides in methods.items():
        shown = ", ".join(f"`{k} = {v!r}`" for k, v in overrides.items())
        lines.append(f"- {_labels(results).get(name, name)}: {shown}")
    return lines


def render(results: dict[str, Any], plot_dir: Path | None = None) -> str:
    """The markdown report (and the plot beside it when ``plot_dir`` is given)."""
    m = results.get("machine", {})
    p = results.get("preset", {})
    lines = [
        "# The FedKSeed protocol (Table 2), scaled to this machine",
        "",
        f"{results.get('started', '?')} to {results.get('finished', 'unfinished')}, "
        f"{m.get('cpu_count', '?')} CPU ({m.get('cpu_model', '?')}), torch "
        f"{m.get('torch', '?')}, CUDA {m.get('cuda_device') or 'none'}. Datasets: "
        + "; ".join(DATASET_NAMES.get(d, d) for d in (p.get("data") or {}))
        + ". Bytes: serialized messages from `metrics.jsonl`, per client and "
        "trained round, and per round (all its clients). Raw numbers: the JSON "
        "beside this file.",
        "",
        *_settings(results),
        "",
        f"Expected duration: {p.get('estimate') or '?'}.",
        "",
        "What this preset changes relative to the paper:",
        "",
        *[f"- {c}" for c in p.get("cuts") or []],
        "",
        "## FedKSeed against FedIT (derived from the numbers below)",
        "",
        *verdict(results),
        "",
        "On each seed both methods are scored on the same held-out examples; they "
        "differ beyond their intervals there when their bootstrap 95% intervals do "
        "not overlap, and overall when that holds, in one direction, on every seed.",
        "",
        "## Results",
        "",
        *results_table(results),
        "",
        "## Beside the published numbers (Rouge-L %)",
        "",
        *published_table(results),
        "",
        "The paper's models (1.3B and 3B parameters) are far larger than ours "
        f"({p.get('model', '?')}), so the absolute numbers are not comparable; "
        "what carries over is "
        "FedKSeed against FedIT on the same model and protocol, at its "
        "communication (bytes per round above).",
        "",
    ]
    if plot_dir is not None:
        name = _plot(results, plot_dir)
        if name:
            lines += [f"![Rouge-L with intervals, and bytes per round]({name})", ""]
    return "\n".join(lines)


def _plot(results: dict[str, Any], plot_dir: Path) -> str | None:
    """``<stem>.png``: Rouge-L with error bars per method and dataset; bytes per round."""
    table = summary(results)
    if not table:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = _labels(results)
    datasets = [d for d in ("ni", "dolly") if d in table]
    methods = [m for m in METHODS if any(m in table[d] for d in datasets)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.8 / max(1, len(methods))
    for j, method in enumerate(methods):
        xs, ys, lows, highs, dots = [], [], [], [], []
        for i, d in enumerate(datasets):
            cell = table[d].get(method)
            if not cell or cell["metric"] is None:
                continue
            x = i + j * width
            y = 100 * cell["metric"]
            xs.append(x)
            ys.append(y)
            lows.append(y - 100 * cell["low"] if cell["low"] is not None else 0.0)
            highs.append(100 * cell["high"] - y if cell["high"] is not None else 0.0)
            dots += [(x, 100 * v[0]) for v in cell["per_seed"].values()]
        left.bar(
            xs,
            ys,
            width,
            yerr=[[max(0.0, v) for v in lows], [max(0.0, v) for v in highs]],
            capsize=3,
            label=labels.get(method, method),
        )
        if dots:
            left.scatter(*zip(*dots, strict=True), s=8, color="black", zorder=3)
        rb = [(table[d].get(method) or {}).get("round_bytes") for d in datasets]
        right.bar(
            [i + j * width for i in range(len(datasets))],
            [v if v else float("nan") for v in rb],
            width,
            label=labels.get(method, method),
        )
    for i, d in enumerate(datasets):  # the base model, where every method starts
        firsts = [
            c["metric_first"]
            for c in table[d].values()
            if c["metric_first"] is not None
        ]
        if firsts:
            left.hlines(
                100 * sum(firsts) / len(firsts),
                i - width / 2,
                i + (len(methods) - 0.5) * width,
                colors="black",
                linestyles="dashed",
                linewidth=1,
                label="round 0 (the base model)" if i == 0 else None,
            )
    for ax in (left, right):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(datasets))])
        ax.set_xticklabels(datasets)
    top = max(
        [
            100 * (c["high"] or c["metric"] or 0.0)
            for per in table.values()
            for c in per.values()
        ]
        + [0.0]
    )
    left.set_ylim(0, max(1.0, 1.3 * top))
    left.legend(fontsize=7, loc="upper left")
    left.set_ylabel("Rouge-L % (bootstrap 95% interval; dots: seeds)")
    left.set_title("Rouge-L on held-out tasks / categories", fontsize=9)
    right.set_yscale("log")
    right.set_ylabel("bytes per round, down + up (log)")
    right.set_title("communication per round", fontsize=9)
    return save_figure(fig, plot_dir, results.get("stem", "fedkseed_protocol"))
