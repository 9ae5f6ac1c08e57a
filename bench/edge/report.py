"""The edge report: the markdown table and the plot, from the results JSON alone.

:func:`render` reads only the results dict, so ``--render`` rebuilds the
report (and ``<stem>.png`` beside it) of any saved ``edge*.json``. Each
measured quantity is one row (section, quantity, value, how measured).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.harness import REPORT_COLUMNS, markdown_table, report_row, save_figure

_WALK_LABELS = {"full": "full", "subset": "subset", "adapter": "adapter"}


def _mb(x: float) -> str:
    return f"{x:,.0f} MB" if x >= 10 else f"{x:.2f} MB"


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g} s" if x < 100 else f"{x:,.0f} s"


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _footprint(f: dict[str, Any]) -> list[dict[str, str]]:
    sets = f["sets"]
    rows = []
    for key, label in (
        ("edge", "edge client install"),
        ("ort", "ONNX Runtime inference alone"),
        ("torch", "torch client install"),
    ):
        s = sets[key]
        top = sorted(s["dists"].items(), key=lambda kv: -kv[1]["mb"])[:3]
        rows.append(
            report_row(
                "1 footprint",
                label,
                f"**{_mb(s['mb'])}** ({len(s['dists'])} distributions)",
                f"closure of {', '.join(s['requirements'])}; largest: "
                + ", ".join(f"{n} {_mb(d['mb'])}" for n, d in top)
                + (
                    f"; not installed: {', '.join(s['missing'])}"
                    if s["missing"]
                    else ""
                ),
            )
        )
    rows.append(
        report_row(
            "1 footprint",
            "edge / ORT alone; torch / edge",
            f"{sets['edge']['mb'] / sets['ort']['mb']:.2f}x; "
            f"{sets['torch']['mb'] / sets['edge']['mb']:.2f}x",
            "ratios of the sizes above",
        )
    )
    if f.get("bundle_mb"):
        files = f["bundle_mb"]
        rows.append(
            report_row(
                "1 footprint",
                "edge bundle (full walk)",
                f"**{_mb(sum(files.values()))}**",
                ", ".join(f"{n} {_mb(v)}" for n, v in files.items()),
            )
        )
    return rows


def _memory(m: dict[str, Any], batch: str) -> list[dict[str, str]]:
    rows = []
    for key, label, how in (
        (
            "ort",
            "ORT inference alone",
            "plain `InferenceSession` on model.onnx, w0 fed, one forward",
        ),
        (
            "edge",
            "edge client",
            "`EdgeModel.open` + one `mezo_step` (NumPy kernels, no numba)",
        ),
        ("torch", "torch client", "model load + one `zo_local_steps` step"),
    ):
        c = m[key]
        rows.append(
            report_row(
                "2 memory",
                f"peak RSS: {label}",
                f"**{c['peak_mib']:,.0f} MiB**",
                f"{how}, {batch}; fresh child, `ru_maxrss` (after imports "
                f"{c['marks_mib'].get('after_imports', float('nan')):,.0f} MiB); "
                f"loss at w0 {c.get('loss_w0', float('nan')):.5f}",
            )
        )
    ratio = m["ratio_edge_over_ort"]
    rows.append(
        report_row(
            "2 memory",
            "edge / ORT inference (aim <= 1.2x)",
            f"**{ratio:.2f}x** ({'meets' if ratio <= m['aim'] else 'misses'} the aim); "
            f"torch / edge {m['ratio_torch_over_edge']:.2f}x",
            "ratios of the peaks above",
        )
    )
    return rows


def _steps(st: dict[str, Any], batch: str) -> list[dict[str, str]]:
    rows = []
    sizes = sorted(int(k.split("_")[1]) for k in st["torch"] if k.startswith("batch_"))
    for size in sizes:
        key = f"batch_{size}"
        e, en, t = st["edge"][key], st["edge_numba"][key], st["torch"][key]
        rows.append(
            report_row(
                "3 step time",
                f"s per ZO step, batch {size} x {batch.split(' x ')[1]}: edge / edge+numba / torch",
                f"**{_s(e['median_s'])}** / {_s(en['median_s'])} / **{_s(t['median_s'])}** "
                f"(edge/torch {e['median_s'] / t['median_s']:.2f}x)",
                f"median of {st['repeats']} after a warm-up; `edge_local_steps` / "
                "`zo_local_steps`, one step per call, all cores",
            )
        )
    rows.append(
        report_row(
            "3 step time",
            f"one forward ({batch}) / one perturbation: edge, edge+numba, torch",
            " ; ".join(
                f"{label} {_s(st[k]['forward']['median_s'])} / {_s(st[k]['perturb']['median_s'])}"
                for k, label in (
                    ("edge", "edge"),
                    ("edge_numba", "+numba"),
                    ("torch", "torch"),
                )
            ),
            "median; a step is 2 forwards + 3 perturbations"
            + (
                ""
                if st["edge"].get("tokens_equal_torch_client")
                else "; WARNING: edge tokenization differed from the torch client's"
            ),
        )
    )
    return rows


def _replay(r: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    k = r["seeds"]
    for walk, w in r["walks"].items():
        if walk == "full":
            what = "every parameter"
        elif walk == "subset":
            what = f"`zo.include` {w.get('name', '')} ({', '.join(w['include'])})"
        else:
            what = f"LoRA r={w['rank']} on {', '.join(w['targets'])}"
        same = w["numpy_numba_bit_identical"] and w["numpy_reference_bit_identical"]
        p = w["paper_round_seconds"]
        rows.append(
            report_row(
                "4 replay",
                f"{walk}: {w['numel']:,} values ({what})",
                f"{w['generated_values_per_round']:,} values/round; torch **{_s(w['torch_s'])}**, "
                f"NumPy+numba {_s(w['numpy_numba_s'])}, NumPy **{_s(w['numpy_reference_s'])}**"
                f"{'' if same else ' (NOT bit-identical)'}",
                f"K = {k} distinct seeds, one timed replay each; bit-identical to torch: "
                f"{'yes' if same else 'NO'}; paper round ({r['paper_round_distinct_seeds']:,.0f} "
                f"seeds): torch {_s(p['torch'])}, NumPy {_s(p['numpy_reference'])}",
            )
        )
    return rows


def _quality(q: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for name, e in q["runs"].items():
        run = e.get("run") or {}
        if e.get("error") or not run.get("metrics"):
            rows.append(
                report_row(
                    "5 quality", name, f"no result: {e.get('error', 'run failed')}", ""
                )
            )
            continue
        ov = ", ".join(
            f"{k}={v}" for k, v in e["overrides"].items() if k != "run.method"
        )
        rows.append(
            report_row(
                "5 quality",
                f"{name}: held-out loss / Rouge-L",
                f"{_f(run['eval_loss_first'])} -> **{_f(run['eval_loss_last'])}** / "
                f"{_f(run['metric_first'])} -> **{_f(run['metric_last'])}**",
                f"{run.get('rounds_done')} rounds x {_s(e['train_seconds_per_round'])} training "
                f"({_s(e['train_seconds_used'])} used{', capped' if e.get('capped') else ''}); {ov}",
            )
        )
    return rows


def _plot(results: dict[str, Any], plot_dir: Path) -> str | None:
    """``<stem>.png``: sizes, peak memory, step times, replay times, quality."""
    panels = [k for k in ("footprint", "memory", "step", "replay") if results.get(k)]
    if results.get("quality"):
        panels += ["eval_loss", "eval_metric"]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows = 1 if len(panels) <= 3 else 2
    ncols = -(-len(panels) // nrows)
    fig, grid = plt.subplots(
        nrows, ncols, figsize=(4.6 * ncols, 4 * nrows), squeeze=False
    )
    axes = list(grid.flat)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, key in zip(axes, panels, strict=False):
        data = results["quality" if key.startswith("eval_") else key]
        if key == "footprint":
            names = ["ort", "edge", "torch"]
            ax.bar(
                names,
                [data["sets"][n]["mb"] for n in names],
                color=["grey", "C0", "C1"],
            )
            ax.set_ylabel("MB on disk")
            ax.set_title("install footprint")
        elif key == "memory":
            names = ["ort", "edge", "torch"]
            ax.bar(
                names, [data[n]["peak_mib"] for n in names], color=["grey", "C0", "C1"]
            )
            ax.axhline(
                data["ort"]["peak_mib"] * data["aim"],
                ls="--",
                c="k",
                lw=1,
                label="1.2x ORT",
            )
            ax.set_ylabel("peak RSS, MiB")
            ax.set_title("peak memory")
            ax.legend(fontsize=7)
        elif key == "step":
            sizes = sorted(
                int(k.split("_")[1]) for k in data["torch"] if k.startswith("batch_")
            )
            for j, (run, label) in enumerate(
                (("edge", "edge"), ("edge_numba", "edge+numba"), ("torch", "torch"))
            ):
                ax.bar(
                    [i + 0.27 * j for i in range(len(sizes))],
                    [data[run][f"batch_{b}"]["median_s"] for b in sizes],
                    0.27,
                    label=label,
                )
            ax.set_xticks([i + 0.27 for i in range(len(sizes))])
            ax.set_xticklabels([f"batch {b}" for b in sizes])
            ax.set_ylabel("s per ZO step (median)")
            ax.set_title("step time")
            ax.legend(fontsize=7)
        elif key == "replay":
            walks = list(data["walks"])
            for j, (col, label) in enumerate(
                (
                    ("torch_s", "torch"),
                    ("numpy_numba_s", "NumPy+numba"),
                    ("numpy_reference_s", "NumPy"),
                )
            ):
                ax.bar(
                    [i + 0.27 * j for i in range(len(walks))],
                    [data["walks"][w][col] for w in walks],
                    0.27,
                    label=label,
                )
            ax.set_xticks([i + 0.27 for i in range(len(walks))])
            ax.set_xticklabels(walks)
            ax.set_yscale("log")
            ax.set_ylabel(f"replay s per round (K = {data['seeds']})")
            ax.set_title("replay")
            ax.legend(fontsize=7)
        else:
            for name, e in data["runs"].items():
                rows = ((e.get("run") or {}).get("metrics")) or []
                if not rows:
                    continue
                per = e["train_seconds_per_round"] or 0.0
                ax.plot(
                    [r["round"] * per for r in rows],
                    [r.get(key) for r in rows],
                    marker="o",
                    label=name,
                )
            ax.axvline(data["settings"]["budget_s"], ls="--", c="k", lw=1)
            ax.set_xlabel("training seconds (evaluation excluded)")
            what = "loss" if key == "eval_loss" else "Rouge-L"
            ax.set_ylabel(f"held-out {what}")
            ax.set_title(f"{what} at equal wall-clock")
            ax.legend(fontsize=7)
    return save_figure(fig, plot_dir, results.get("stem", "edge"))


def render(results: dict[str, Any], plot_dir: Path | None = None) -> str:
    """The markdown report (and the plot beside it when ``plot_dir`` is given)."""
    m = results.get("machine", {})
    st = results.get("settings", {})
    batch = f"{st.get('batch', '?')} x {st.get('tokens', '?')}"
    rows: list[dict[str, str]] = []
    if results.get("footprint"):
        rows += _footprint(results["footprint"])
    if results.get("memory"):
        rows += _memory(results["memory"], batch)
    if results.get("step"):
        rows += _steps(results["step"], batch)
    if results.get("replay"):
        rows += _replay(results["replay"])
    if results.get("quality"):
        rows += _quality(results["quality"])
    lines = [
        f"# Edge client benchmark ({results.get('mode', '?')})",
        "",
        f"Model {st.get('model', '?')}, Natural Instructions; {m.get('cpu_affinity', '?')} "
        f"CPU ({m.get('cpu_model', '?')}), load average at start "
        f"{_f((m.get('load_average_at_start') or [None])[0], 1)}; onnxruntime "
        f"{m.get('onnxruntime', '?')}, torch {m.get('torch', '?')}; "
        f"{_s(results.get('total_seconds'))} in all. Raw numbers: the JSON beside this file.",
        "",
        *markdown_table(rows, REPORT_COLUMNS),
        "",
    ]
    for key in (
        "export_error",
        "memory_error",
        "step_error",
        "replay_error",
        "quality_error",
    ):
        if results.get(key):
            lines += [f"- {key}: {results[key]}", ""]
    q = results.get("quality")
    if q:
        s = q["settings"]
        lines += [
            f"Section 5 budget: **{_s(s['budget_s'])} of training per method**, the "
            "central evaluation not counted: rounds = floor(budget / seconds per round), "
            f"at most {s['max_rounds']}, the seconds of round "
            f"{s.get('calibration_rounds', 2)} of a calibration run whose evaluation is "
            "cut to 1 example and 1 new token; "
            f"{s['clients']} clients ({s['partition']} split) of {s['limit']} examples, "
            f"Rouge-L on {s['eval_examples']} held-out examples, {s['new_tokens']} new tokens; "
            f"harness {s['harness']}.",
            "",
        ]
    if plot_dir is not None:
        name = _plot(results, plot_dir)
        if name:
            lines += [f"![footprint, memory, step time, replay, quality]({name})", ""]
    return "\n".join(lines)
