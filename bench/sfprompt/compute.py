"""Section 2, measured: the device's share of a split step against full fine-tuning.

The device's part of a split step (head, tail forward and backward, prompt
gradient and AdamW; the body runs in-process through ``LocalTrunkSession``
and its time is excluded) against one full backprop + AdamW step on the
whole model at the same batch, then both extrapolated to a round. The
section also carries the analytic FLOPs (:mod:`bench.sfprompt.flops`) and
the local-path diagnostics (:mod:`bench.sfprompt.local_path`).
"""

from __future__ import annotations

import gc
import math
from typing import Any

from bench.harness import cpu, now
from bench.sfprompt.flops import flop_model
from bench.sfprompt.local_path import local_path_diagnostics
from bench.sfprompt.settings import (
    FULL_LR,
    MODEL,
    PAPER_COMPUTE_FRACTION,
    ROUND_EPOCHS,
    ROUND_EXAMPLES,
    SFP_LR,
    STEP_BATCH,
    STEP_TOKENS,
    dolly_batches,
    make_spec,
    split_defaults,
)


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    """The mean of ``key`` over ``rows``."""
    return sum(r[key] for r in rows) / len(rows)


def time_device_steps(
    model: Any, batches: list, tail_kind: str, warmup: int, steps: int
) -> dict[str, Any]:
    """Device-side time of split steps (the body runs in-process but is excluded)."""
    import torch

    from client.pruning import el2n_scores
    from client.split_trainer import LocalTrunkSession, _lm_loss, _local_logits
    from models.split import build_split

    spec = make_spec(model, tail_kind)
    head, trunk, tail = build_split(model, spec, init_seed=0)
    p = spec.num_prompts
    params = [q for q in (*head.parameters(), *tail.parameters()) if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=SFP_LR, weight_decay=0.0)
    session = LocalTrunkSession(trunk, spec.returns_all_positions, p)
    rows = []
    for i in range(warmup + steps):
        b = batches[i % len(batches)]
        t0, c0 = now(), cpu()
        hidden, mask = head(b.input_ids, b.attention_mask)
        t1, c1 = now(), cpu()
        body_out = session.forward(hidden.detach(), mask, train=True)  # server
        t2, c2 = now(), cpu()
        body_out.requires_grad_()
        loss = _lm_loss(tail(body_out)[:, p:], b.labels)
        loss.backward()
        t3, c3 = now(), cpu()
        cut_grad = session.backward(body_out.grad)  # server
        t4, c4 = now(), cpu()
        target = hidden if cut_grad.shape[1] == hidden.shape[1] else hidden[:, :p]
        target.backward(cut_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t5, c5 = now(), cpu()
        parts = {
            "head_s": t1 - t0,
            "server_forward_s": t2 - t1,
            "tail_fwd_bwd_s": t3 - t2,
            "server_backward_s": t4 - t3,
            "prompt_bwd_and_adamw_s": t5 - t4,
        }
        rows.append(
            {
                "warmup": i < warmup,
                **parts,
                "device_s": parts["head_s"]
                + parts["tail_fwd_bwd_s"]
                + parts["prompt_bwd_and_adamw_s"],
                "device_cpu_s": (c1 - c0) + (c3 - c2) + (c5 - c4),
                "server_s": parts["server_forward_s"] + parts["server_backward_s"],
                "loss": float(loss.detach()),
            }
        )
    # Local-loss step (head -> tail, no body) and EL2N scoring of one batch.
    local, el2n = [], []
    for i in range(max(1, steps)):
        b = batches[i % len(batches)]
        t0 = now()
        loss = _lm_loss(_local_logits(head, tail, b), b.labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        local.append(now() - t0)
        t0 = now()
        with torch.no_grad():
            el2n_scores(_local_logits(head, tail, b), b.labels)
        el2n.append(now() - t0)
    timed = [r for r in rows if not r["warmup"]]
    del head, trunk, tail, opt, session
    gc.collect()
    return {
        "tail": tail_kind,
        "steps": rows,
        "device_s_mean": _mean(timed, "device_s"),
        "device_s_min": min(r["device_s"] for r in timed),
        "device_cpu_s_mean": _mean(timed, "device_cpu_s"),
        "server_s_mean": _mean(timed, "server_s"),
        "local_loss_step_s": local,
        "el2n_batch_s": el2n,
    }


def time_full_steps(batches: list, warmup: int, steps: int) -> dict[str, Any]:
    """One full backprop + AdamW step on the whole model (all parameters trainable)."""
    import torch

    from client.split_trainer import _lm_loss
    from models import load_causal_lm

    model = load_causal_lm(MODEL, dtype="float32", device="cpu").model
    model.requires_grad_(True)
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=FULL_LR, weight_decay=0.0)
    rows = []
    for i in range(warmup + steps):
        b = batches[i % len(batches)]
        t0, c0 = now(), cpu()
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        loss = _lm_loss(logits, b.labels)
        t1 = now()
        loss.backward()
        t2 = now()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3, c3 = now(), cpu()
        rows.append(
            {
                "warmup": i < warmup,
                "forward_s": t1 - t0,
                "backward_s": t2 - t1,
                "adamw_s": t3 - t2,
                "step_s": t3 - t0,
                "cpu_s": c3 - c0,
                "loss": float(loss.detach()),
            }
        )
        del logits, loss
    timed = [r for r in rows if not r["warmup"]]
    n = sum(q.numel() for q in params)
    del model, opt, params
    gc.collect()
    return {
        "trainable_params": n,
        "steps": rows,
        "step_s_mean": _mean(timed, "step_s"),
        "step_s_min": min(r["step_s"] for r in timed),
        "cpu_s_mean": _mean(timed, "cpu_s"),
    }


def section_compute(
    model: Any,
    tokenizer: Any,
    warmup: int,
    steps: int,
    tails: tuple[str, ...],
    diag_examples: int,
) -> dict[str, Any]:
    """Section 2: analytic FLOPs, measured step and round times, the local path.

    Parameters
    ----------
    model, tokenizer
        The loaded float32 model and its tokenizer.
    warmup, steps : int
        Untimed and timed split steps per tail (and full steps).
    tails : tuple[str, ...]
        Tail settings to time (``"norm+head"``, ``"norm"``).
    diag_examples : int
        Examples of the local-path diagnostics.
    """
    d = split_defaults()
    n_params = sum(q.numel() for q in model.parameters())
    flops = flop_model(
        model.config,
        n_params,
        STEP_TOKENS,
        d["num_prompts"],
        STEP_BATCH,
        d["local_loss_steps"],
        d["gamma"],
    )
    batches = dolly_batches(tokenizer, max(1, warmup + steps))
    dev = {t: time_device_steps(model, batches, t, warmup, steps) for t in tails}
    full = time_full_steps(batches, warmup, steps)
    timing: dict[str, Any] = {}
    for t, r in dev.items():
        b = STEP_BATCH
        n = ROUND_EXAMPLES
        kept = math.ceil(d["gamma"] * n) * ROUND_EPOCHS
        local = sum(r["local_loss_step_s"]) / len(r["local_loss_step_s"])
        el2n = sum(r["el2n_batch_s"]) / len(r["el2n_batch_s"])
        dev_round = (
            d["local_loss_steps"] * local
            + (n / b) * el2n
            + (kept / b) * r["device_s_mean"]
        )
        full_round = ROUND_EPOCHS * (n / b) * full["step_s_mean"]
        timing[t] = {
            "device_step_s": r["device_s_mean"],
            "full_step_s": full["step_s_mean"],
            "step_ratio": r["device_s_mean"] / full["step_s_mean"],
            "step_ratio_cpu": r["device_cpu_s_mean"] / full["cpu_s_mean"],
            "local_loss_step_s": local,
            "el2n_batch_s": el2n,
            "round_device_s": dev_round,
            "round_full_s": full_round,
            "round_ratio": dev_round / full_round,
        }
    return {
        "settings": {
            "batch": STEP_BATCH,
            "tokens": STEP_TOKENS,
            "warmup_steps": warmup,
            "timed_steps": steps,
            "num_prompts": d["num_prompts"],
            "client_blocks": d["client_blocks"],
            "full_lr": FULL_LR,
            "sfp_lr": SFP_LR,
        },
        "flops": flops,
        "device": dev,
        "full": full,
        "timing": timing,
        "paper_fraction": PAPER_COMPUTE_FRACTION,
        "local_path": local_path_diagnostics(model, tokenizer, diag_examples),
    }
