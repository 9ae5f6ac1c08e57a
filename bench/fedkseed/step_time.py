"""Section 2: where a MeZO step's time goes on the full model.

All 134.5M parameters perturbed, a batch of 8 x 128 real Natural Instructions
tokens: each step's two forward passes and three perturbation passes
(+eps, -2eps, then restore and update fused) are timed separately, wall and
CPU, after one warm-up step; the real loop (``zo_local_steps``) over the same
batch is the cross-check.
"""

from __future__ import annotations

import os
from typing import Any

from bench.fedkseed.settings import (
    MODEL,
    PAPER_K,
    STEP_BATCH,
    STEP_EPS,
    STEP_LR,
    STEP_TOKENS,
    fixed_ni_batch,
    run_zo_steps,
    zo_train_config,
)
from bench.harness import cpu, generation_throughput, now


def section_step(
    model: Any, tokenizer: Any, params: list[Any], steps: int
) -> dict[str, Any]:
    """Time the five parts of MeZO steps on the full model (after one warm-up).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The float32 model on CPU.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer.
    params : list[tuple[str, torch.Tensor]]
        The perturbed parameters (the full ``ParamWalk``).
    steps : int
        Timed steps, at least 1.

    Returns
    -------
    dict[str, Any]
        ``settings``, ``steps`` (per step: the parts' wall and CPU seconds,
        the losses) and the means, shares and throughputs the report reads.
    """
    from client.zo_trainer import _loss
    from models import collate_train
    from protocols.seeds import candidate_seeds, perturb_

    examples = fixed_ni_batch(tokenizer)
    pad = int(tokenizer.pad_token_id)
    batch = collate_train(examples, pad)
    assert tuple(batch.input_ids.shape) == (STEP_BATCH, STEP_TOKENS)
    numel = sum(p.numel() for _, p in params)
    seeds = candidate_seeds(0, PAPER_K)
    per_step = []
    for s in range(steps + 1):  # step 0 is the warm-up (numba compile, allocator)
        seed = seeds[s]
        t0, c0 = now(), cpu()
        perturb_(params, seed, STEP_EPS)
        t1, c1 = now(), cpu()
        lp = _loss(model, batch)
        t2, c2 = now(), cpu()
        perturb_(params, seed, -2.0 * STEP_EPS)
        t3, c3 = now(), cpu()
        lm = _loss(model, batch)
        t4, c4 = now(), cpu()
        g = (lp - lm) / (2.0 * STEP_EPS)
        perturb_(params, seed, STEP_EPS - STEP_LR * g)
        t5, c5 = now(), cpu()
        per_step.append(
            {
                "warmup": s == 0,
                "perturb_s": [t1 - t0, t3 - t2, t5 - t4],
                "forward_s": [t2 - t1, t4 - t3],
                "perturb_cpu_s": [c1 - c0, c3 - c2, c5 - c4],
                "forward_cpu_s": [c2 - c1, c4 - c3],
                "step_s": t5 - t0,
                "loss_plus": lp,
                "loss_minus": lm,
                "g": g,
            }
        )
    timed = [r for r in per_step if not r["warmup"]]
    fwd = [x for r in timed for x in r["forward_s"]]
    pert = [x for r in timed for x in r["perturb_s"]]
    step_total = sum(r["step_s"] for r in timed)
    fwd_total, pert_total = sum(fwd), sum(pert)
    fwd_cpu = [x for r in timed for x in r["forward_cpu_s"]]
    pert_cpu = [x for r in timed for x in r["perturb_cpu_s"]]
    # Cross-check: the real loop (zo_local_steps) over the same 8 examples.
    config = zo_train_config(steps, STEP_BATCH, STEP_LR)
    t0 = now()
    stats = run_zo_steps(
        model, params, examples, config, seeds=seeds, eps=STEP_EPS, pad_id=pad
    )
    loop_s = now() - t0
    standalone = generation_throughput(1 << 22, "numba")
    return {
        "settings": {
            "model": MODEL,
            "perturbed_params": numel,
            "tensors": len(params),
            "batch": STEP_BATCH,
            "tokens": STEP_TOKENS,
            "eps": STEP_EPS,
            "learning_rate": STEP_LR,
            "timed_steps": steps,
            "warmup_steps": 1,
            "batch_source": "8 NI examples (seeded order) whose prompt+response reach "
            "128 tokens, prompt truncated from the left: exactly 8 x 128 real tokens",
        },
        "steps": per_step,
        "forward_ms_mean": 1000 * fwd_total / len(fwd),
        "forward_ms_min": 1000 * min(fwd),
        "perturb_ms_mean": 1000 * pert_total / len(pert),
        "perturb_ms_min": 1000 * min(pert),
        "step_ms_mean": 1000 * step_total / len(timed),
        "forward_cpu_ms_mean": 1000 * sum(fwd_cpu) / len(fwd_cpu),
        "perturb_cpu_ms_mean": 1000 * sum(pert_cpu) / len(pert_cpu),
        "share_perturb_cpu": sum(pert_cpu) / (sum(pert_cpu) + sum(fwd_cpu)),
        "load_average": os.getloadavg(),
        "share_forward": fwd_total / step_total,
        "share_perturb": pert_total / step_total,
        "share_other": 1 - (fwd_total + pert_total) / step_total,
        "passes_per_step": 3,
        "passes_per_step_mezo_reference": 4,
        "perturb_values_per_s_mean": numel * len(pert) / pert_total,
        "perturb_values_per_s_best": numel / min(pert),
        "generator_standalone_values_per_s": standalone,
        "zo_local_steps_ms_per_step": 1000 * loop_s / steps,
        "zo_local_steps_kept": int(stats.indices.numel()),
    }
