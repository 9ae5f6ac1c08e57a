"""The LoRA-family benchmark's report: tables, a recommendation and a plot, from the JSON.

Everything here reads the results dict alone (``--render`` rebuilds a saved
result): the configurations' labels and settings are in it (``configs``),
falling back to :data:`bench.lora_family.settings.CONFIGS`. The
recommendation (:func:`recommend`) is derived from the numbers: the best
mean Rouge-L over the datasets, ties (within
:data:`~bench.lora_family.settings.ROUGE_TIE`) broken by the lower eval loss
(within :data:`~bench.lora_family.settings.LOSS_TIE`), then by fewer bytes
per client-round.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.harness import markdown_table, save_figure
from bench.lora_family.settings import (
    CONFIGS,
    DATASET_NAMES,
    LOSS_TIE,
    ROUGE_TIE,
    SECTIONS,
)

SECTION_TITLES = {
    "aggregation": "(a) Aggregation at rank 8: FedAvg vs exact vs FFA",
    "mixed_ranks": "(b) Clients of ranks 2, 4, 8, 16 (global rank 16)",
    "server_opt": "(c) Server optimizers on the rank-8 adapter, against FedAvg",
}
SHOWN_KEYS = ("lora.aggregation", "lora.sparsity_weighted", "server_opt.name")
"""The settings a recommendation spells out (the rest is the run's scale)."""


def config_table() -> dict[str, dict[str, Any]]:
    """:data:`CONFIGS` as the JSON records it (label, sections, overrides)."""
    return {name: asdict(c) for name, c in CONFIGS.items()}


def _configs(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return results.get("configs") or config_table()


def _ok(run: dict[str, Any]) -> bool:
    res = run["result"]
    return res["status"] == "completed" and res.get("metric_last") is not None


def _mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def summary(results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Config -> dataset -> the completed seeds' numbers and their means.

    Each cell: ``seeds``, ``metric`` / ``loss`` / ``loss_first`` (means),
    ``metric_sd``, ``bytes_down`` / ``bytes_up`` (means per client-round),
    ``seconds`` and ``failed`` (the errors of runs that did not complete).
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for run in results.get("runs", []):
        cell = out.setdefault(run["config"], {}).setdefault(
            run["dataset"], {"runs": [], "failed": []}
        )
        if _ok(run):
            cell["runs"].append(run["result"])
        else:
            cell["failed"].append(run["result"]["status"])
    for per_data in out.values():
        for cell in per_data.values():
            done = cell.pop("runs")
            metrics = [r["metric_last"] for r in done]
            cell.update(
                seeds=len(done),
                metric=_mean(metrics),
                metric_sd=statistics.stdev(metrics) if len(metrics) > 1 else None,
                loss=_mean([r["eval_loss_last"] for r in done if r["eval_loss_last"]]),
                loss_first=_mean(
                    [r["eval_loss_first"] for r in done if r["eval_loss_first"]]
                ),
                bytes_down=_mean([r["bytes_down"] for r in done if r["bytes_down"]]),
                bytes_up=_mean([r["bytes_up"] for r in done if r["bytes_up"]]),
                seconds=_mean([r["seconds"] for r in done]),
            )
    return out


def _overall(
    results: dict[str, Any], names: list[str]
) -> dict[str, tuple[float, float, float]]:
    """Config -> (Rouge-L, loss, bytes) averaged over the datasets.

    Only configurations with a completed run on every dataset the results
    hold, so each is compared on the same data.
    """
    table = summary(results)
    datasets = sorted({r["dataset"] for r in results.get("runs", [])})
    out = {}
    for name in names:
        cells = [table.get(name, {}).get(d) for d in datasets]
        if not datasets or any(c is None or not c["seeds"] for c in cells):
            continue
        done = [c for c in cells if c is not None]
        out[name] = (
            statistics.mean(c["metric"] for c in done),
            statistics.mean(
                c["loss"] if c["loss"] is not None else float("inf") for c in done
            ),
            statistics.mean(
                (c["bytes_down"] or 0.0) + (c["bytes_up"] or 0.0) for c in done
            ),
        )
    return out


def pick(candidates: dict[str, tuple[float, float, float]]) -> tuple[str, str]:
    """The best of ``candidates`` (name -> Rouge-L, loss, bytes) and why.

    Best Rouge-L; the names within :data:`ROUGE_TIE` of it tie, and the
    lowest loss among them wins; the names within :data:`LOSS_TIE` of that
    loss tie again, and the fewest bytes win.
    """
    best = max(v[0] for v in candidates.values())
    tied = {n: v for n, v in candidates.items() if v[0] >= best - ROUGE_TIE}
    if len(tied) == 1:
        return next(iter(tied)), "best Rouge-L"
    low = min(v[1] for v in tied.values())
    tied_loss = {n: v for n, v in tied.items() if v[1] <= low + LOSS_TIE}

    def others(chosen: str) -> str:
        return ", ".join(f"`{n}`" for n in tied if n != chosen)

    if len(tied_loss) == 1:
        name = next(iter(tied_loss))
        return name, (
            f"Rouge-L within {100 * ROUGE_TIE:.1f} points of {others(name)}; "
            "the lowest eval loss decided"
        )
    name = min(tied_loss, key=lambda n: tied_loss[n][2])
    return name, (
        f"Rouge-L within {100 * ROUGE_TIE:.1f} points and eval loss within "
        f"{LOSS_TIE} of {others(name)}; the fewest bytes decided"
    )


def _settings_text(overrides: dict[str, Any]) -> str:
    parts = []
    for key in SHOWN_KEYS:
        if key in overrides:
            value = overrides[key]
            text = str(value).lower() if isinstance(value, bool) else f'"{value}"'
            parts.append(f"`{key} = {text}`")
    return ", ".join(parts)


def recommend(results: dict[str, Any]) -> list[str]:
    """The derived "start with" statements: clients of one rank, then of mixed ranks."""
    configs = _configs(results)
    datasets = sorted({r["dataset"] for r in results.get("runs", [])})
    over = " and ".join(DATASET_NAMES.get(d, d) for d in datasets)
    lines = []
    groups = (
        ("uniform", "Clients of one rank", ("aggregation", "server_opt")),
        ("mixed", "Clients of mixed ranks (2 to 16)", ("mixed_ranks",)),
    )
    for _, title, sections in groups:
        names = [n for n, c in configs.items() if set(c["sections"]) & set(sections)]
        candidates = _overall(results, names)
        if not candidates:
            continue
        name, why = pick(candidates)
        rouge, loss, nbytes = candidates[name]
        lines.append(
            f"- **{title}: start with `{name}`** ({configs[name]['label']}: "
            f"{_settings_text(configs[name]['overrides'])}): mean Rouge-L "
            f"{100 * rouge:.2f}%, eval loss {loss:.3f}, {nbytes / 1e6:.3f} MB per "
            f"client-round over {over}, of {len(candidates)} configurations "
            f"compared ({why})."
        )
    if not lines:
        return ["- No configuration completed on every dataset: no recommendation."]
    return lines


def _pct(value: float | None, sd: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}" + ("" if sd is None else f" +- {100 * sd:.2f}")


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.3f}"


def _loss(cell: dict[str, Any]) -> str:
    if cell["loss"] is None:
        return "-"
    first = "?" if cell["loss_first"] is None else f"{cell['loss_first']:.3f}"
    return f"{first} -> {cell['loss']:.3f}"


def _section(results: dict[str, Any], section: str) -> list[str]:
    configs = _configs(results)
    table = summary(results)
    names = [n for n, c in configs.items() if section in c["sections"] and n in table]
    if not names:
        return []
    rows = []
    for name in names:
        for dataset, cell in table[name].items():
            rows.append(
                {
                    "config": f"`{name}`",
                    "what": configs[name]["label"],
                    "data": dataset,
                    "seeds": cell["seeds"],
                    "Rouge-L %": _pct(cell["metric"], cell["metric_sd"]),
                    "eval loss (round 0 -> last)": _loss(cell),
                    "MB down / client-round": _mb(cell["bytes_down"]),
                    "MB up / client-round": _mb(cell["bytes_up"]),
                    "s per run": "-"
                    if cell["seconds"] is None
                    else f"{cell['seconds']:.0f}",
                    "failed": "; ".join(f[:160] for f in cell["failed"]),
                }
            )
    return [
        f"## {SECTION_TITLES[section]}",
        "",
        *markdown_table(rows, list(rows[0]), align="llrrrrrrrl"),
        "",
    ]


def render(results: dict[str, Any], plot_dir: Path | None = None) -> str:
    """The markdown report (and the plot beside it when ``plot_dir`` is given)."""
    m = results.get("machine", {})
    s = results.get("scale", {})
    datasets = sorted({r["dataset"] for r in results.get("runs", [])})
    lines = [
        "# LoRA family: aggregation rules, mixed ranks, server optimizers",
        "",
        f"{results.get('started', '?')} to {results.get('finished', 'unfinished')}, "
        f"{m.get('cpu_count', '?')} CPU ({m.get('cpu_model', '?')}), torch "
        f"{m.get('torch', '?')}. Model {s.get('model')}, {s.get('clients')} clients "
        f"(all sampled), {s.get('rounds')} rounds of {s.get('local_steps')} local "
        f"steps (batch {s.get('batch_size')} x {s.get('max_length')} tokens, lr "
        f"{s.get('learning_rate')}), example-weighted, no clipping; Rouge-L and eval "
        f"loss on {s.get('eval_examples')} held-out examples ({s.get('new_tokens')} "
        f"new tokens) after equal rounds, on "
        f"{', '.join(DATASET_NAMES.get(d, d) for d in datasets) or 'no data yet'}; "
        f"seeds {results.get('seeds', '?')}. Bytes: serialized messages per client "
        "and trained round, from `metrics.jsonl`. Raw numbers: the JSON beside this "
        "file.",
        "",
        "## Where to start (derived from the numbers below)",
        "",
        *recommend(results),
        "",
        f"(Best mean Rouge-L over the datasets; Rouge-L within {100 * ROUGE_TIE:.1f} "
        f"points ties, then the lower eval loss wins, within {LOSS_TIE} a tie again, "
        "then the fewer bytes per client-round.)",
        "",
    ]
    for section in SECTIONS:
        lines += _section(results, section)
    if plot_dir is not None:
        name = _plot(results, plot_dir)
        if name:
            lines += [f"![Rouge-L per comparison, and bytes]({name})", ""]
    return "\n".join(lines)


def _plot(results: dict[str, Any], plot_dir: Path) -> str | None:
    """``<stem>.png``: one panel of Rouge-L bars per comparison, one of bytes."""
    table = summary(results)
    if not table:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    configs = _configs(results)
    datasets = sorted({d for per in table.values() for d in per})
    sections = [s for s in SECTIONS if any(s in configs[n]["sections"] for n in table)]
    fig, axes = plt.subplots(
        1, len(sections) + 1, figsize=(5 * (len(sections) + 1), 4.5), squeeze=False
    )
    for ax, section in zip(axes[0], sections, strict=False):
        names = [n for n in configs if section in configs[n]["sections"] and n in table]
        width = 0.8 / max(1, len(names))
        for j, name in enumerate(names):
            xs = [i + j * width for i in range(len(datasets))]
            cells = [table[name].get(d) or {} for d in datasets]
            ys = [
                100 * c["metric"] if c.get("metric") is not None else 0 for c in cells
            ]
            bars = ax.bar(xs, ys, width, label=name)
            for bar, c in zip(bars, cells, strict=True):
                if c.get("loss") is not None:
                    ax.annotate(
                        f"{c['loss']:.2f}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center",
                        va="bottom",
                        fontsize=6,
                    )
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(datasets))])
        ax.set_xticklabels(datasets)
        top = max(
            [100 * (table[n][d].get("metric") or 0) for n in names for d in table[n]]
            + [0.0]
        )
        ax.set_ylim(0, max(1.0, 1.25 * top))
        ax.set_ylabel("final Rouge-L % (eval loss above each bar)")
        ax.set_title(SECTION_TITLES[section].split(":")[0], fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    names = list(table)
    for j, (what, label) in enumerate((("bytes_down", "down"), ("bytes_up", "up"))):
        values = [_mean([c[what] for c in table[n].values() if c[what]]) for n in names]
        ax.barh(
            [i + 0.4 * j for i in range(len(names))],
            [(v or float("nan")) / 1e6 for v in values],
            0.4,
            label=label,
        )
    ys = [i + 0.2 for i in range(len(names))]
    ax.set_yticks(ys)
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: no overlap
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("MB per client-round (log)")
    ax.set_title("bytes per client-round", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, plot_dir, results.get("stem", "lora_family"))
