"""Section 2, analytic: FLOPs per training token of the device against full fine-tuning.

Every term is written out in :func:`flop_model`'s docstring; the result is
machine independent, unlike the measured times of :mod:`bench.sfprompt.compute`.
"""

from __future__ import annotations

import math
from typing import Any

from bench.sfprompt.settings import ROUND_EPOCHS, ROUND_EXAMPLES


def flop_model(
    cfg: Any,
    n_params: int,
    tokens: int,
    p: int,
    batch: int,
    local_loss_steps: int,
    gamma: float,
) -> dict[str, Any]:
    """Analytic FLOPs per training token (multiply-add = 2 FLOPs), every term named.

    Full fine-tuning: 6 N (forward 2 N, backward 4 N: input and weight
    gradients) plus attention scores (QK^T and AV, causal average T/2 keys):
    forward 2 x 2 x L x (T/2) x d per token, x3 with the backward.

    SFPrompt device (k = 0 blocks): embedding lookup and prompt concatenation
    are memory moves (0 FLOPs). The tail is RMSNorm + LM head on every one of
    the P + T positions (the code slices off the prompt positions *after* the
    tail), so the tail terms carry a factor (P + T) / T:
      forward      2 d V        (LM head) + ~4 d (RMSNorm)
      input grad   2 d V        (always: the server needs d loss / d body output)
      weight grad  2 d V        (only when the head trains: tail = "norm+head")
      softmax/CE   ~4 V per position (exp, sum, log-sum, grad)
    Prompt gradient: the cut gradient (B, P, d) summed over the batch: P d / T
    per token. AdamW: ~12 FLOPs per trainable parameter per step, / (B T).
    Local-loss step: the same tail work on head(x) directly (skipping the body).
    EL2N scoring: tail forward + softmax + ||p - onehot|| (~6 V per position).
    """
    d = int(cfg.hidden_size)
    v = int(cfg.vocab_size)
    layers = int(cfg.num_hidden_layers)
    full_dense = 6 * n_params
    full_attn = 3 * 2 * 2 * layers * (tokens / 2) * d
    full = full_dense + full_attn
    pos = (p + tokens) / tokens
    head_params = d * v
    out: dict[str, Any] = {
        "d": d,
        "V": v,
        "L": layers,
        "T": tokens,
        "P": p,
        "B": batch,
        "N": n_params,
        "lm_head_params": head_params,
        "lm_head_share_of_params": head_params / n_params,
        "full_per_token": full,
        "full_dense_6N": full_dense,
        "full_attention_scores": full_attn,
        "tails": {},
    }
    for tail in ("norm+head", "norm"):
        trains_head = tail == "norm+head"
        trainable = p * d + d + (head_params if trains_head else 0)
        fwd = 2 * d * v + 4 * d
        in_grad = 2 * d * v + 6 * d
        w_grad = (2 * d * v if trains_head else 0) + 2 * d
        softmax = 4 * v
        tail_train = pos * (fwd + in_grad + w_grad + softmax)
        prompt_acc = p * d / tokens
        adamw = 12 * trainable / (batch * tokens)
        split_step = tail_train + prompt_acc + adamw
        local_loss = tail_train + prompt_acc + adamw  # same tail work, no body
        el2n = pos * (fwd + 6 * v)
        # One round: local_loss_steps x B examples, EL2N over all, split on gamma.
        n = ROUND_EXAMPLES
        kept = math.ceil(gamma * n) * ROUND_EPOCHS
        dev_round = tokens * (
            local_loss_steps * batch * local_loss + n * el2n + kept * split_step
        )
        full_round = tokens * n * ROUND_EPOCHS * full
        out["tails"][tail] = {
            "trainable_params": trainable,
            "terms_per_token": {
                "tail_forward": pos * fwd,
                "tail_input_grad": pos * in_grad,
                "tail_weight_grad": pos * w_grad,
                "softmax_ce": pos * softmax,
                "prompt_grad_accumulation": prompt_acc,
                "adamw": adamw,
            },
            "split_step_per_token": split_step,
            "split_step_fraction": split_step / full,
            "local_loss_per_token": local_loss,
            "el2n_per_token": el2n,
            "round_device_flops": dev_round,
            "round_full_flops": full_round,
            "round_fraction": dev_round / full_round,
            "round_assumption": f"{n} examples x {tokens} tokens; {local_loss_steps} "
            f"local-loss steps of {batch}; EL2N over all {n}; split training on "
            f"ceil(gamma n) = {math.ceil(gamma * n)} x E={ROUND_EPOCHS}; full FT: "
            f"E={ROUND_EPOCHS} pass over all {n}",
        }
    # Server work per split token (not the device's): body forward + input grad.
    body = n_params - head_params - d  # blocks only (tied embedding/head excluded)
    out["server_body_per_token"] = pos * (
        4 * body + 2 * 2 * 2 * layers * ((p + tokens) / 2) * d
    )
    out["server_body_params"] = body
    return out
