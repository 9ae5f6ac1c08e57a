"""The FedKSeed report: the markdown table, cost model and notes, from the JSON.

:func:`render` reads only the results dict, so ``--render`` rebuilds the
report of any saved ``fedkseed*.json``. Each measured quantity is one row
dict (section, quantity, value, how measured).
"""

from __future__ import annotations

from typing import Any

from bench.harness import REPORT_COLUMNS, markdown_table, report_row, result_stem


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def render(results: dict[str, Any]) -> str:
    """The markdown report (table, cost model, notes) of a results dict."""
    m = results["machine"]
    rows: list[dict[str, str]] = []
    b = results.get("bytes")
    if b:
        s = b["settings"]
        d = s["distinct_seeds_used"]
        for method, label in (
            ("fedkseed", "FedKSeed"),
            ("fedkseed-pro", "FedKSeed-Pro"),
        ):
            ins = b["ins"][method]
            synced = ins["0"]["bytes"]
            total = synced + b["res"]["bytes"]
            rows.append(
                report_row(
                    "1a bytes",
                    f"{label}, node synced last round: down + up",
                    f"{synced:,} + {b['res']['bytes']:,} = **{total:,} B** "
                    f"({'<' if total < 18000 else '>='} 18 kB)",
                    f"`payload_bytes` of `FedKSeed.configure` / `encode_zo_train_res` contents; "
                    f"K={s['K']}, tau={s['tau']}, history = 1 round of D={d} seeds "
                    f"(E[distinct] of {s['draws_per_round']} draws)",
                )
            )
            growth = ", ".join(
                f"r={r}: {ins[str(r)]['bytes']:,} B"
                for r in ("1", "5", "20")
                if r in ins
            )
            rows.append(
                report_row(
                    "1a bytes",
                    f"{label} download after missing r rounds",
                    growth,
                    f"same encoder, history of r+1 round deltas x {d} (int32 index, float32 "
                    "coefficient) pairs: grows ~8 D B per missed round",
                )
            )
        rows.append(
            report_row(
                "1a bytes",
                "upload (reply), tau=200 steps",
                f"{b['res']['bytes']:,} B",
                "`encode_zo_train_res`: 200 int32 indices + 200 float32 scalars + sync proof "
                "+ metrics",
            )
        )
        rows.append(
            report_row(
                "1a bytes",
                "paper accounting 4K + 8 tau / our floor 8D + 8 tau",
                f"{b['paper_accounting']['bytes']:,} B / "
                f"{b['paper_accounting']['our_payload_floor_bytes']:,} B",
                "arithmetic only (payload arrays, no headers)",
            )
        )
    t = results.get("task")
    if t:
        for key, label in (
            ("fedkseed", "FedKSeed"),
            ("fedkseed-pro", "FedKSeed-Pro"),
            ("lora", "LoRA FedAvg"),
        ):
            run = t["runs"].get(key, {})
            if "bytes_up_per_client_round" in run:
                up, down = (
                    run["bytes_up_per_client_round"],
                    run["bytes_down_per_client_round"],
                )
                rows.append(
                    report_row(
                        "1b bytes",
                        f"{label}, measured per client per round (section 5 run)",
                        "down "
                        + ", ".join(f"{x:,.0f}" for x in down)
                        + " / up "
                        + ", ".join(f"{x:,.0f}" for x in up)
                        + " B",
                        "`bytes_down`/`bytes_up` of metrics.jsonl rounds 1..3 / clients "
                        "(4 clients, all sampled; round 1 has no history)",
                    )
                )
    st = results.get("step")
    if st:
        ss = st["settings"]
        rows.append(
            report_row(
                "2 step time",
                "ms per forward pass (batch 8 x 128)",
                f"{st['forward_ms_mean']:,.0f} ms (min {st['forward_ms_min']:,.0f}; "
                f"{st['forward_cpu_ms_mean']:,.0f} CPU-ms)",
                f"`client.zo_trainer._loss` under inference_mode, {ss['timed_steps']} step(s) "
                "after 1 warm-up, perf_counter",
            )
        )
        rows.append(
            report_row(
                "2 step time",
                "ms per perturbation pass (134.5M params)",
                f"{st['perturb_ms_mean']:,.0f} ms (min {st['perturb_ms_min']:,.0f}; "
                f"{st['perturb_cpu_ms_mean']:,.0f} CPU-ms)",
                "`perturb_` (+eps, -2eps, eps - lr g) over the full ParamWalk, numba backend",
            )
        )
        rows.append(
            report_row(
                "2 step time",
                "share of a step: forwards / perturbations / other",
                f"{_pct(st['share_forward'])} / {_pct(st['share_perturb'])} / "
                f"{_pct(st['share_other'])} of {st['step_ms_mean']:,.0f} ms "
                f"(perturbation share of CPU time: {_pct(st['share_perturb_cpu'])})",
                "sums of the timed parts over the step wall time; CPU time = process_time",
            )
        )
        rows.append(
            report_row(
                "2 step time",
                "passes over the parameters per step",
                "3 (MeZO reference: 4)",
                "restore and update fused into one `perturb_(eps - lr g)` (client/zo_trainer.py)",
            )
        )
        rows.append(
            report_row(
                "2 step time",
                "generator throughput inside perturb_",
                f"{st['perturb_values_per_s_mean'] / 1e6:,.0f} M values/s (best "
                f"{st['perturb_values_per_s_best'] / 1e6:,.0f} M; standalone "
                f"`gaussian` {st['generator_standalone_values_per_s'] / 1e6:,.0f} M)",
                "perturbed values / perturb_ time; standalone = `generation_throughput(4M, "
                "numba)`",
            )
        )
        rows.append(
            report_row(
                "2 step time",
                "cross-check: `zo_local_steps` ms per step",
                f"{st['zo_local_steps_ms_per_step']:,.0f} ms",
                "the real loop over the same 8 examples (batch 8), wall / steps",
            )
        )
    mem = results.get("memory")
    if mem:
        rows.append(
            report_row(
                "3 memory",
                "peak RSS: inference / ZO steps",
                f"{mem['inference']['peak_mib']:,.0f} MiB / {mem['zo']['peak_mib']:,.0f} MiB "
                f"-> **{mem['ratio_zo_over_inference']:.2f}x** (target < 1.2)",
                "`ru_maxrss` of two fresh subprocesses: load + 3 inference forwards (8 x 128, "
                "with labels) vs load + 3 `zo_local_steps` over all 134.5M params",
            )
        )
        rows.append(
            report_row(
                "3 memory",
                "of which numba import + JIT compile",
                f"{mem['numba_import_and_compile_mib']:,.0f} MiB",
                "RSS before/after the first `perturb_` in the ZO child (one-off, model-size "
                "independent)",
            )
        )
        cp = mem["client_path"]
        rows.append(
            report_row(
                "3 memory",
                "client path (ZoModelState: sync + snapshot + 3 steps + restore)",
                f"{cp['peak_mib']:,.0f} MiB -> {mem['ratio_client_path_over_inference']:.2f}x "
                f"inference; snapshot on disk {cp['snapshot_bytes'] / 2**20:,.0f} MiB",
                "`ru_maxrss` of a third subprocess; the synced snapshot lives on disk, "
                "not in memory",
            )
        )
    rp = results.get("replay")
    if rp:
        rs = rp["settings"]
        pr = rp["paper_round"]
        rows.append(
            report_row(
                "4 replay",
                f"server replay, D={rs['D']} seeds, 134.5M params",
                f"{rp['replay_s_per_seed'] * 1000:,.0f} ms per seed "
                f"({rp['replay_values_per_s'] / 1e6:,.0f} M values/s)",
                f"`apply_seed_sum_` over the full walk, best of {rs['repeats']}",
            )
        )
        rows.append(
            report_row(
                "4 replay",
                "floor: generate one perturbation per seed",
                f"{rp['floor_s_per_seed'] * 1000:,.0f} ms per seed -> replay/floor "
                f"**{rp['ratio_replay_over_floor']:.2f}**; at the standalone generator "
                f"rate: {rp['ideal_s_per_seed_at_standalone_rate'] * 1000:,.0f} ms per seed",
                "`gaussian(seed, name, numel)` for every tensor and seed, results discarded, "
                "best of the same repeats (it allocates and writes z, which the fused replay "
                "does not, hence < 1); standalone = `generation_throughput(4M, numba)`",
            )
        )
        rows.append(
            report_row(
                "4 replay",
                "paper round extrapolated (2 CPU cores)",
                f"{pr['cpu_seconds_extrapolated'] / 60:,.1f} min "
                f"({pr['values']:.2e} values); torch int-op backend: "
                f"{pr['cpu_seconds_torch_int_backend'] / 3600:,.1f} h",
                f"D = {pr['distinct_seeds']:.0f} x 134.5M at the measured per-value replay "
                "time; torch-backend rate from `generation_throughput(1M, torch)`",
            )
        )
    if t:
        pb = t["probe"]
        rows.append(
            report_row(
                "5 task",
                "ZO learning-rate probe (eps 1e-3)",
                "; ".join(
                    f"lr {r['learning_rate']:g}: {r['eval_loss_change']:+.4f}"
                    for r in pb["rows"]
                )
                + f" -> chose {pb['chosen_learning_rate']:g}",
                f"held-out loss change after a short probe ({pb['settings']['steps']} steps x "
                f"{pb['settings']['batch_size']}) from {pb['eval_loss_before']:.4f}, "
                "in-process `zo_local_steps`",
            )
        )
        for key, label in (
            ("lora", "LoRA FedAvg"),
            ("fedkseed", "FedKSeed"),
            ("fedkseed-pro", "FedKSeed-Pro"),
        ):
            run = t["runs"].get(key, {})
            state = (run.get("status") or {}).get("state", "no status")
            if "metric_last" in run:
                rows_m = run.get("metrics") or []
                rouge = ", ".join(f"{r['eval_metric']:.3f}" for r in rows_m[:-1])
                loss = ", ".join(f"{r['eval_loss']:.3f}" for r in rows_m[:-1])
                lora_b = t["runs"].get("lora", {}).get("bytes_per_client_round_mean")
                vs = (
                    f" (LoRA / this: {lora_b / run['bytes_per_client_round_mean']:,.0f}x)"
                    if lora_b and key != "lora"
                    else ""
                )
                wall = run.get("wall_s_total") or run["wall_s"]
                value = (
                    f"Rouge-L by round {rouge}, **{run['metric_last']:.3f}**; eval loss "
                    f"{loss}, **{run['eval_loss_last']:.3f}**; "
                    f"{run['bytes_per_client_round_mean']:,.0f} B/client/round{vs}; "
                    f"{wall:,.0f} s wall ({state}, {run.get('rounds_done')} rounds)"
                )
            else:
                value = (
                    f"no metrics ({state}, rc {run.get('returncode')}, "
                    f"timed out {run.get('timed_out')})"
                )
            zo = t["settings"]["zo"]
            if run.get("harness") == "inproc":
                runner = (
                    "in-process harness (same `prepare_run`, `run_server` and ClientApp "
                    "handlers, real Flower messages, no Ray: the `pollinate simulate` "
                    "attempt's Ray node was killed from outside)"
                )
            else:
                runner = "`pollinate simulate`"
            how = (
                f"{runner}, NI, 4 clients, task split, limit 1200, 3 rounds, "
                + (
                    "10 steps x 8, AdamW (defaults)"
                    if key == "lora"
                    else f"K=4096, {zo['local_steps']} steps x {zo['batch_size']}, eps {zo['eps']:g}, "
                    f"lr {zo['learning_rate']:g}, layers 28-29 + final norm"
                )
                + "; round 0 -> 3, 32 held-out examples, 32 new tokens"
            )
            rows.append(report_row("5 task", label, value, how))
    lines = [
        f"# FedKSeed benchmark ({results.get('mode', 'full')})",
        "",
        f"{m['date']}, {m['cpu_count']} CPU ({m['cpu_model']}), torch {m['torch']}, "
        f"numpy {m['numpy']}, numba {m['numba']}, CUDA: "
        f"{'yes' if m['cuda_available'] else 'no (not available in this session)'}. "
        "CPU shared with other engineers' work during the run. "
        f"Total runtime {results.get('total_seconds', 0) / 60:.1f} min"
        + (
            f" (first pass {results['first_pass_seconds'] / 60:.1f} min, then reruns)"
            if results.get("first_pass_seconds")
            else ""
        )
        + ". "
        "Raw numbers: `bench/results/"
        + result_stem("fedkseed", results.get("mode"))
        + ".json`.",
        "",
    ]
    lines += markdown_table(rows, REPORT_COLUMNS)
    lines += ["", "## Cost model", ""]
    lines += cost_model(results)
    lines += ["", "## Notes", ""]
    lines += notes(results)
    return "\n".join(lines) + "\n"


def cost_model(results: dict[str, Any]) -> list[str]:
    """The cost-model bullet lines, with the measured constants where present."""
    st, rp = results.get("step"), results.get("replay")
    out = [
        "Per round, with d perturbed values, D distinct seeds per round delta, tau local "
        "steps, a node that missed r rounds:",
        "",
        "- bytes down ~ spec/config header + 8 D (r + 1) (+ K for Pro); bytes up ~ header "
        "+ 8 tau. Download is O(history), not O(K): exact sequential replay of each "
        "round delta (bit-identical models, hash-checked) is the design, so a node that "
        "missed r rounds downloads r + 1 deltas (the dense alternative, A in K floats, "
        "would cap it at 4K bytes but rebuilds from w0 in another summation order).",
        "- client time ~ (r + 1) D d t_gen  (catch-up replay)  +  tau (2 t_fwd + 3 d t_gen) "
        "(local steps); server time ~ D d t_gen per round (replay) + evaluation.",
    ]
    if st and rp:
        t_gen = rp["replay_s_per_seed"] / rp["settings"]["params"]
        out.append(
            f"- measured here: t_gen = {t_gen * 1e9:.2f} ns/value in replay "
            f"({1 / t_gen / 1e6:,.0f} M values/s), "
            f"{1e9 / st['perturb_values_per_s_mean']:.2f} ns/value in `perturb_`; "
            f"t_fwd(8 x 128) = {st['forward_ms_mean'] / 1000:.2f} s. For the full model "
            f"one local step costs {st['step_ms_mean'] / 1000:.2f} s of which perturbation "
            f"is {_pct(st['share_perturb'])}: forward passes dominate."
        )
        pr = rp["paper_round"]
        out.append(
            f"- a paper round (D ~ {pr['distinct_seeds']:.0f}, d = 134.5M: "
            f"{pr['values']:.2e} values) replays in ~{pr['cpu_seconds_extrapolated'] / 60:.1f} "
            f"min on these 2 CPU cores with the numba kernel (per node and per round of "
            f"history; a node 20 rounds behind pays ~"
            f"{21 * pr['cpu_seconds_extrapolated'] / 60:.0f} min), and "
            f"~{pr['cpu_seconds_torch_int_backend'] / 3600:.1f} h with the torch int-op "
            "backend that CUDA uses. GPU: not measured (no CUDA in this session); "
            "the GPU path (torch integer ops) is exercised for bit-exactness only by the "
            "gpu-marked test `tests/test_seeds.py::test_cuda_torch_backend_matches_numpy_bits`"
            "; its speed on a GPU should be measured with `bench/seed_generator.py` there."
        )
    return out


def notes(results: dict[str, Any]) -> list[str]:
    """The notes bullet lines: re-measurements, deviations, failed attempts."""
    out = []
    for key, label in (("step", "Section 2"), ("replay", "Section 4")):
        again = (results.get(key) or {}).get("remeasured")
        if again:
            out.append(
                f"- {label} was re-measured on {again['date']} (load average "
                f"{again['load_average_at_start'][0]:.1f} at its start; "
                f"{again['reason'] or 'no reason given'}); the first-pass numbers are "
                "kept under `remeasured.replaced` in the JSON."
            )
    if results.get("interference"):
        out.append(f"- Shared machine: {results['interference']}")
    out += [
        "- Section 1 counts message *content* (protobuf `RecordDict`), the same quantity "
        "as `bytes_up`/`bytes_down` in metrics.jsonl; Flower's message metadata and "
        "transport framing are not included. The download includes the catch-up "
        "history by design (bit-exact sequential replay), so it grows with missed "
        "rounds; the headline '< 18 kB' holds for a node that trained last round.",
        "- FedKSeed-Pro adds the K uint8 quantized importances (4,096 B + record header) "
        "to every download.",
    ]
    t = results.get("task")
    if t:
        zo = t["settings"]["zo"]
        out.append(
            f"- Section 5 deviates from the paper to fit 2 shared CPU cores: 3 rounds (paper "
            f"40-60), {zo['local_steps']} local steps of batch {zo['batch_size']} (paper 200 "
            f"of batch 1), 4 clients all sampled (paper 5% of many), perturbation restricted "
            f"to layers 28-29 + final norm "
            f"({t['probe']['settings']['perturbed_params'] / 1e6:.1f}M params, paper: all), "
            f"eps {zo['eps']:g} and lr {zo['learning_rate']:g} (paper 5e-4 / 3e-7 on "
            "1.3B-3B fp16). Equal rounds is not equal compute or equal steps: FedKSeed "
            "barely moving in 3 rounds is expected; do not read these numbers as a "
            "reproduction of the paper's Rouge-L."
        )
        for key, run in t["runs"].items():
            for attempt in run.get("earlier_attempts", []):
                tail = (attempt.get("log_tail") or "").replace("\n", " ")
                why = "engine died" + (
                    " (Ray node SIGTERMed / actors unavailable)"
                    if "Ray" in tail or "actor" in tail
                    else ""
                )
                out.append(
                    f"- {key}: a `{attempt.get('harness')}` attempt failed after "
                    f"{attempt.get('wall_s') or 0:,.0f} s, {attempt.get('rounds_done')} "
                    f"round(s) recorded ({why}); the reported run is the retry."
                )
            if "rerun" in run:
                out.append(
                    f"- {key}: rerun on {run['rerun']['date']} after the full benchmark "
                    f"({run['rerun']['reason'] or 'no reason given'}); the run it "
                    f"replaced ended in state "
                    f"{(run['rerun']['replaced'].get('status') or {}).get('state')}."
                )
        lora = t["runs"].get("lora", {})
        for key in ("fedkseed", "fedkseed-pro"):
            run = t["runs"].get(key, {})
            if "metric_last" in run and "metric_last" in lora:
                out.append(
                    f"- {key}: held-out loss fell by "
                    f"{run['eval_loss_first'] - run['eval_loss_last']:.3f} (LoRA: "
                    f"{lora['eval_loss_first'] - lora['eval_loss_last']:.3f}) while Rouge-L "
                    f"went {run['metric_first']:.3f} -> {run['metric_last']:.3f} (LoRA: "
                    f"{lora['metric_first']:.3f} -> {lora['metric_last']:.3f}); with 32 "
                    "examples one answer moves Rouge-L by ~0.03, so small changes are noise."
                )
        pb = t["probe"]
        best_lr = max(r["learning_rate"] for r in pb["rows"])
        if pb["chosen_learning_rate"] == best_lr:
            out.append(
                f"- The probe's best learning rate was the largest tried ({best_lr:g}); a "
                "larger one was not tried, so FedKSeed may move faster than shown."
            )
        out.append(
            "- Rouge-L is the scorer Pollinate had when this was recorded (its own, on "
            "the first line of the answer; today `rouge_l` is the `rouge-score` package "
            "on the whole answer, and `bench.fedkseed_protocol` uses the `rouge` package "
            "as the paper did), on 32 held-out examples (unseen mix of the same 61 "
            "tasks), greedy, 32 new tokens."
        )
    return out
