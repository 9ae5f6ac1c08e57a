"""Benchmark of SFPrompt (split learning with soft prompts) on SmolLM2-135M.

Sections (see ``bench/README.md``):

1. Bytes per client per round, activations included, against LoRA FedAvg
   (r = 8 on q_proj, v_proj) and full-model FedAvg: exact serialized sizes of
   real ``train.sfprompt`` instructions and replies (tail "norm+head" and
   "norm"), and the activation traffic of real split steps over gRPC on
   127.0.0.1 (a ``TrunkService`` on the real model's trunk, batch 8 x 128
   Dolly tokens), scaled to a round of a client with 200 examples.
2. Device compute as a fraction of full local fine-tuning: FLOPs per training
   token (analytic, every term written out) and the measured wall time of the
   device's part of a split step (head and tail, the trunk excluded) against
   one full backprop + AdamW step on the whole model at the same batch.
3. Device peak memory as a fraction of full local fine-tuning: ``ru_maxrss``
   of fresh subprocesses: a device holding only its parts
   (``models.split.device_parts``) training against a trunk service that runs
   in another process, and a process doing full backprop + AdamW steps.
4. Task metric after equal rounds: ``pollinate simulate`` on Dolly (4 clients,
   Dirichlet 0.5), LoRA FedAvg vs SFPrompt: Rouge-L, eval loss, bytes per
   client-round from ``metrics.jsonl``, wall time.

Usage: ``python bench/sfprompt.py [--quick]``. ``--quick`` runs sections 1
(one short activation step), 2 (one timed step, no warm-up) and a one-step
section 3, and writes ``bench/results/sfprompt-quick.*``; the full run writes
``bench/results/sfprompt.json`` (raw numbers, machine info, settings) and
``bench/results/sfprompt.md`` (the table), and prints the table. ``--only
1,3`` runs a subset (``sfprompt-partial.*``); ``--render results.json``
rewrites the table from saved numbers. The CPU may be shared with other
work: timings are what this machine gave at that moment.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/sfprompt.py` from anywhere
    sys.path.insert(0, str(REPO))

# torch is imported inside functions: the memory children of section 3 are
# spawned first, from a lean parent (on Linux a child's ru_maxrss starts at its
# parent's RSS at fork/exec, so a parent holding the model would hide the
# children's own peaks).

RESULTS_DIR = REPO / "bench" / "results"
SHARED_DATA = REPO.parent / "shared" / "data"
DOLLY_PATH = SHARED_DATA / "dolly-15k" / "databricks-dolly-15k.jsonl.gz"
NI_PATH = SHARED_DATA / "natural-instructions-v1" / "ni-v1-61tasks-cap200.jsonl.gz"
MODEL = "smollm2-135m"

# Split steps of sections 1-3: batch 8 x 128 real Dolly tokens.
STEP_BATCH = 8
STEP_TOKENS = 128
SFP_LR = 1e-3  # the SFPrompt learning rate of section 4
FULL_LR = 1e-5  # full fine-tuning (AdamW) in sections 2-3; the value does not matter

# Per-round accounting of section 1/2: a client with 200 examples, gamma 0.5,
# E = 1 pass of split training over the kept examples.
ROUND_EXAMPLES = 200
ROUND_EPOCHS = 1

# Paper (Cao et al. 2024) headline numbers, ViT-Base.
PAPER_COMM_RATIO = 0.47
PAPER_COMPUTE_FRACTION = 0.0046

# Section 4.
SIM_CLIENTS = 4
SIM_ROUNDS = 3
SIM_LIMIT = 800
SIM_ALPHA = 0.5
# Reduced from the requested 10 local steps, 32 eval examples and 32 new tokens
# to keep section 4 near 20 minutes on 2 shared CPU cores (see the notes the
# report prints): when the recorded results were measured,
# `PromptedLM.generate` re-ran the whole sequence for every new token (it has a
# KV cache since), and SFPrompt's evaluation alone would have taken > 10 min
# per round at 32 x 32 here. The requested setting is
# `--sim-local-steps 10 --sim-eval 32 --sim-new-tokens 32 --sim-timeout 3600`.
SIM_LOCAL_STEPS = 3
SIM_EVAL = 16
SIM_NEW_TOKENS = 16


def now() -> float:
    return time.perf_counter()


def cpu() -> float:
    """CPU seconds of this process (all threads): less sensitive to a shared CPU."""
    return time.process_time()


def maxrss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mib() -> float:
    """Current resident set size (VmRSS) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def split_defaults() -> dict[str, Any]:
    """The ``[split]`` and ``[train]`` defaults of the run config (no drift)."""
    from server.config import RunConfig

    c = RunConfig()
    return {
        "num_prompts": c.split.num_prompts,
        "client_blocks": c.split.client_blocks,
        "tail": c.split.tail,
        "gamma": c.split.gamma,
        "local_loss_steps": c.split.local_loss_steps,
        "max_length": c.model.max_length,
        "local_steps": c.train.local_steps,
        "batch_size": c.train.batch_size,
    }


# ------------------------------------------------------------------ machine


def machine_info() -> dict[str, Any]:
    import flwr
    import grpc
    import numpy as np
    import torch
    import transformers

    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
        ),
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "transformers": transformers.__version__,
        "flwr": flwr.__version__,
        "grpcio": grpc.__version__,
        "cuda_available": torch.cuda.is_available(),
        "git_commit": commit,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "note": "CPU shared with other engineers' processes during the run; "
        "timings are this machine's at that time",
    }


# ------------------------------------------------------------------ data


def dolly_batches(tokenizer: Any, batches: int, n: int = STEP_BATCH,
                  length: int = STEP_TOKENS, seed: int = 0) -> list[Any]:
    """``batches`` TrainBatches of ``n`` real Dolly examples, exactly ``length`` tokens.

    Examples are visited in a seeded random order and kept when prompt plus
    response reach ``length`` tokens (``tokenize_example`` truncates the
    prompt from the left), so every row is ``length`` real tokens, no padding.
    """
    from corpora import load_examples
    from models import collate_train, tokenize_example

    examples = load_examples(str(DOLLY_PATH))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    chosen = []
    for i in order:
        t = tokenize_example(examples[i], tokenizer, length)
        if len(t.input_ids) == length:
            chosen.append(t)
            if len(chosen) == n * batches:
                break
    pad = int(tokenizer.pad_token_id)
    out = [collate_train(chosen[b * n : (b + 1) * n], pad) for b in range(batches)]
    for b in out:
        assert tuple(b.input_ids.shape) == (n, length), b.input_ids.shape
    return out


def dolly_examples(tokenizer: Any, n: int, length: int = STEP_TOKENS, seed: int = 1):
    """``n`` tokenized Dolly examples of exactly ``length`` tokens (for split_round)."""
    from corpora import load_examples
    from models import tokenize_example

    examples = load_examples(str(DOLLY_PATH))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    chosen = []
    for i in order:
        t = tokenize_example(examples[i], tokenizer, length)
        if len(t.input_ids) == length:
            chosen.append(t)
            if len(chosen) == n:
                break
    return chosen


def make_spec(model: Any, tail: str, max_length: int = STEP_TOKENS) -> Any:
    from models.split import split_spec_for

    d = split_defaults()
    return split_spec_for(
        model,
        MODEL,
        num_prompts=d["num_prompts"],
        client_blocks=d["client_blocks"],
        max_length=max_length,
        tail=tail,
    )


# ------------------------------------------------------------------ section 1


def _breakdown(content: Any) -> dict[str, int]:
    from flwr.app import RecordDict

    from protocols import payload_bytes

    return {key: payload_bytes(RecordDict({key: content[key]})) for key in content}


def lora_bytes() -> dict[str, Any]:
    """Exact ``train.lora`` instruction and reply sizes for the default LoRA spec."""
    from models import adapter_tensors, attach_lora, load_causal_lm
    from protocols import (
        LocalTrainConfig,
        LoraTrainIns,
        LoraTrainRes,
        encode_lora_train_ins,
        encode_lora_train_res,
        encode_tensors,
        payload_bytes,
    )
    from server.config import load_config

    config = load_config(None, {"run.method": "lora"})
    spec = config.lora_spec()
    model = load_causal_lm(MODEL, dtype="float32", device="cpu").model
    peft = attach_lora(model, spec, init_seed=0)
    adapter = adapter_tensors(peft)
    numel = sum(t.numel() for t in adapter.values())
    cfg = model.config
    d, layers = int(cfg.hidden_size), int(cfg.num_hidden_layers)
    kv = int(cfg.num_key_value_heads) * (d // int(cfg.num_attention_heads))
    r = spec.rank
    formula = layers * ((d * r + r * d) + (d * r + r * kv))
    ins = LoraTrainIns(
        spec=spec,
        config=LocalTrainConfig(
            server_round=1, local_steps=10, batch_size=8, learning_rate=2e-3,
            weight_decay=0.0, seed=0,
        ),
        adapter=adapter,
    )
    res = LoraTrainRes(adapter=adapter, num_examples=ROUND_EXAMPLES, train_loss=2.0)
    down = payload_bytes(encode_lora_train_ins(ins))
    up = payload_bytes(encode_lora_train_res(res))
    from flwr.app import RecordDict

    array_only = payload_bytes(RecordDict({"adapter": encode_tensors(adapter)}))
    del peft, model
    gc.collect()
    return {
        "spec": {"rank": r, "alpha": spec.alpha, "targets": list(spec.target_modules)},
        "adapter_params": numel,
        "adapter_params_formula": formula,
        "formula": f"{layers} x ((576x{r} + {r}x576) q + (576x{r} + {r}x{kv}) v)",
        "adapter_array_record_bytes": array_only,
        "ins_bytes": down,
        "res_bytes": up,
        "total_bytes": down + up,
    }


def full_fedavg_bytes(model: Any) -> dict[str, Any]:
    """Analytic: unique parameters x 4 bytes x 2 directions (tied embedding once)."""
    unique = sum(p.numel() for p in model.parameters())  # dedups the tied head
    state_values = sum(t.numel() for t in model.state_dict().values())
    return {
        "params": unique,
        "state_dict_values": state_values,
        "bytes_one_way": 4 * unique,
        "total_bytes": 2 * 4 * unique,
        "how": "analytic: unique parameters x 4 B (float32) x 2 directions; no message "
        "framing (a few hundred bytes); the tied LM head/embedding counted once "
        f"(state_dict lists {state_values:,} values with the tied copy)",
    }


def sfprompt_message_bytes(model: Any, tail: str, trunk_up: int, trunk_down: int) -> dict:
    """Exact ``train.sfprompt`` instruction and reply sizes for one tail setting."""
    from models.split import DeviceHead, DeviceTail, trainable_state
    from protocols import payload_bytes
    from protocols.split_messages import (
        SplitRoundConfig,
        SplitTrainIns,
        SplitTrainRes,
        encode_split_train_ins,
        encode_split_train_res,
    )

    d = split_defaults()
    spec = make_spec(model, tail, max_length=d["max_length"])
    head = DeviceHead(model, spec, init_seed=0)
    tl = DeviceTail(model, train_head=tail == "norm+head")
    tensors = {k: v.detach().clone() for k, v in trainable_state(head, tl).items()}
    numel = {k: v.numel() for k, v in tensors.items()}
    config = SplitRoundConfig(
        server_round=1,
        local_steps=d["local_steps"],
        local_loss_steps=d["local_loss_steps"],
        batch_size=d["batch_size"],
        learning_rate=SFP_LR,
        gamma=d["gamma"],
        seed=0,
        trunk_address="127.0.0.1:50123",
    )
    ins = encode_split_train_ins(SplitTrainIns(spec, config, tensors))
    res = encode_split_train_res(
        SplitTrainRes(
            tensors=tensors,
            num_examples=ROUND_EXAMPLES,
            train_loss=2.0,
            local_loss=2.0,
            kept=math.ceil(d["gamma"] * ROUND_EXAMPLES),
            trunk_bytes_up=trunk_up,
            trunk_bytes_down=trunk_down,
        )
    )
    out = {
        "tail": tail,
        "trainable_params": sum(numel.values()),
        "trainable_by_tensor": numel,
        "ins_bytes": payload_bytes(ins),
        "res_bytes": payload_bytes(res),
        "ins_by_record": _breakdown(ins),
        "res_by_record": _breakdown(res),
    }
    del head, tl, tensors
    gc.collect()
    return out


def activation_bytes(model: Any, tokenizer: Any, steps: int, batch: int,
                     tokens: int) -> dict[str, Any]:
    """Real gRPC on 127.0.0.1: split steps against a TrunkService on the real trunk."""
    import torch

    from client.split_trainer import _lm_loss
    from client.trunk_client import TrunkClient
    from models.split import build_split
    from server.trunk_service import TrunkService, start_trunk_server

    spec = make_spec(model, "norm+head", max_length=tokens)
    head, trunk, tail = build_split(model, spec, init_seed=0)
    service = TrunkService(trunk, spec)
    server, port = start_trunk_server(service, "127.0.0.1", 0)
    batches = dolly_batches(tokenizer, steps, n=batch, length=tokens)
    p = spec.num_prompts
    params = [q for q in (*head.parameters(), *tail.parameters()) if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=SFP_LR, weight_decay=0.0)
    per_step = []
    try:
        with TrunkClient(f"127.0.0.1:{port}") as client:
            session = client.open(spec, "bench-device", 1)
            open_up, open_down = session.bytes_up, session.bytes_down
            for b in batches:  # the step of client/split_trainer.split_round, phase 3
                up0, down0 = session.bytes_up, session.bytes_down
                t0 = now()
                hidden, mask = head(b.input_ids, b.attention_mask)
                body_out = session.forward(hidden.detach(), mask, train=True)
                body_out.requires_grad_()
                loss = _lm_loss(tail(body_out)[:, p:], b.labels)
                loss.backward()
                cut_grad = session.backward(body_out.grad)
                target = hidden if cut_grad.shape[1] == hidden.shape[1] else hidden[:, :p]
                target.backward(cut_grad)
                opt.step()
                opt.zero_grad(set_to_none=True)
                per_step.append(
                    {
                        "up": session.bytes_up - up0,
                        "down": session.bytes_down - down0,
                        "loss": float(loss.detach()),
                        "seconds": now() - t0,
                        "cut_grad_shape": list(cut_grad.shape),
                    }
                )
            closed = session.close()
    finally:
        server.stop(grace=None)
    n_ex = steps * batch
    up = sum(s["up"] for s in per_step)
    down = sum(s["down"] for s in per_step)
    d = int(model.config.hidden_size)
    positions = p + tokens
    analytic_up = positions * d * 4 * 2 + positions * 8  # hidden + grad (fp32), mask int64
    analytic_down = positions * d * 4 + p * d * 4  # body output + prompt-position grad
    del head, trunk, tail, service, opt
    gc.collect()
    return {
        "settings": {"steps": steps, "batch": batch, "tokens": tokens, "num_prompts": p,
                     "hidden": d, "dtype": spec.activation_dtype,
                     "data": "Dolly examples (seeded order) reaching exactly "
                     f"{tokens} tokens (prompt truncated from the left)"},
        "open_up": open_up,
        "open_down": open_down,
        "steps": per_step,
        "session_bytes_up": session.bytes_up,
        "session_bytes_down": session.bytes_down,
        "server_counters": closed,
        "client_matches_server": closed["bytes_up"] == session.bytes_up
        and closed["bytes_down"] == session.bytes_down,
        "up_per_example": up / n_ex,
        "down_per_example": down / n_ex,
        "per_example": (up + down) / n_ex,
        "analytic_up_per_example": analytic_up,
        "analytic_down_per_example": analytic_down,
        "framing_overhead_per_step": (up + down) / steps - batch * (analytic_up + analytic_down),
    }


def section_bytes(model: Any, tokenizer: Any, steps: int, batch: int,
                  tokens: int) -> dict[str, Any]:
    d = split_defaults()
    act = activation_bytes(model, tokenizer, steps, batch, tokens)
    kept = math.ceil(d["gamma"] * ROUND_EXAMPLES)
    split_examples = kept * ROUND_EPOCHS
    trunk_up = act["open_up"] + round(act["up_per_example"] * split_examples)
    trunk_down = act["open_down"] + round(act["down_per_example"] * split_examples)
    full = full_fedavg_bytes(model)
    lora = lora_bytes()
    sfp = {}
    for tail in ("norm+head", "norm"):
        msg = sfprompt_message_bytes(model, tail, trunk_up, trunk_down)
        total = msg["ins_bytes"] + msg["res_bytes"] + trunk_up + trunk_down
        msg["round"] = {
            "trunk_up": trunk_up,
            "trunk_down": trunk_down,
            "flower_bytes": msg["ins_bytes"] + msg["res_bytes"],
            "total_bytes": total,
            "ratio_vs_full_fedavg": total / full["total_bytes"],
            "ratio_vs_lora": total / lora["total_bytes"],
            "activation_share": (trunk_up + trunk_down) / total,
        }
        sfp[tail] = msg
    # Where SFPrompt breaks even with full FedAvg (tail norm+head): examples/round.
    per_ex = act["per_example"]
    fixed = sfp["norm+head"]["ins_bytes"] + sfp["norm+head"]["res_bytes"]
    return {
        "settings": {
            "round_examples": ROUND_EXAMPLES,
            "gamma": d["gamma"],
            "epochs_over_kept": ROUND_EPOCHS,
            "kept": kept,
            "split_examples_per_round": split_examples,
            "tokens_per_example": tokens,
            "num_prompts": d["num_prompts"],
            "client_blocks": d["client_blocks"],
            "assumptions": "every example is exactly 128 tokens (no padding); the "
            "local-loss pass and EL2N pruning move no bytes; one trunk session per "
            "round (Open counted, Close is not in the ledger); Flower message "
            "content only (no transport framing), as in metrics.jsonl",
        },
        "activations": act,
        "full_fedavg": full,
        "lora": lora,
        "sfprompt": sfp,
        "break_even_examples_vs_full_norm_head": (full["total_bytes"] - fixed) / per_ex,
        "break_even_examples_vs_full_norm": (
            full["total_bytes"] - sfp["norm"]["ins_bytes"] - sfp["norm"]["res_bytes"]
        ) / per_ex,
        "paper_ratio_vs_full": PAPER_COMM_RATIO,
    }


# ------------------------------------------------------------------ section 2


def flop_model(cfg: Any, n_params: int, tokens: int, p: int, batch: int,
               local_loss_steps: int, gamma: float) -> dict[str, Any]:
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
        "d": d, "V": v, "L": layers, "T": tokens, "P": p, "B": batch,
        "N": n_params, "lm_head_params": head_params,
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
    out["server_body_per_token"] = pos * (4 * body + 2 * 2 * 2 * layers * ((p + tokens) / 2) * d)
    out["server_body_params"] = body
    return out


class _TimedSession:
    """Wraps a LocalTrunkSession and measures the time spent in the server body."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0

    def forward(self, hidden: Any, mask: Any, *, train: bool) -> Any:
        t0 = now()
        try:
            return self.inner.forward(hidden, mask, train=train)
        finally:
            self.seconds += now() - t0

    def backward(self, grad: Any) -> Any:
        t0 = now()
        try:
            return self.inner.backward(grad)
        finally:
            self.seconds += now() - t0


def time_device_steps(model: Any, batches: list, tail_kind: str, warmup: int,
                      steps: int) -> dict[str, Any]:
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
        parts = {}
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
                "device_s": parts["head_s"] + parts["tail_fwd_bwd_s"]
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
        "device_s_mean": sum(r["device_s"] for r in timed) / len(timed),
        "device_s_min": min(r["device_s"] for r in timed),
        "device_cpu_s_mean": sum(r["device_cpu_s"] for r in timed) / len(timed),
        "server_s_mean": sum(r["server_s"] for r in timed) / len(timed),
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
        rows.append({"warmup": i < warmup, "forward_s": t1 - t0, "backward_s": t2 - t1,
                     "adamw_s": t3 - t2, "step_s": t3 - t0, "cpu_s": c3 - c0,
                     "loss": float(loss.detach())})
        del logits, loss
    timed = [r for r in rows if not r["warmup"]]
    n = sum(q.numel() for q in params)
    del model, opt, params
    gc.collect()
    return {
        "trainable_params": n,
        "steps": rows,
        "step_s_mean": sum(r["step_s"] for r in timed) / len(timed),
        "step_s_min": min(r["step_s"] for r in timed),
        "cpu_s_mean": sum(r["cpu_s"] for r in timed) / len(timed),
    }


def _ranks(x: Any) -> Any:
    import torch

    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    return r


def local_path_diagnostics(model: Any, tokenizer: Any, n: int) -> dict[str, Any]:
    """What the local-loss / EL2N path (tail(head(x)), no body) sees at initialisation.

    On ``n`` Dolly examples of 128 tokens: the local path's token loss, how often
    its argmax is the *input* token itself (tied embedding: the head scores a
    token's own embedding highest), and whether EL2N on the local path ranks
    examples like EL2N on the whole split model (Spearman rank correlation, and
    the overlap of the kept halves).
    """
    import torch

    from client.pruning import el2n_scores, keep_hardest
    from client.split_trainer import _lm_loss, _local_logits
    from models import IGNORE_INDEX, collate_train
    from models.split import PromptedLM, build_split

    spec = make_spec(model, "norm+head")
    head, trunk, tail = build_split(model, spec, init_seed=0)
    whole = PromptedLM(head, trunk, tail)
    examples = dolly_examples(tokenizer, n, seed=2)
    local_scores, full_scores = [], []
    local_loss, full_loss, self_pred, valid_total = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, n, 8):
            b = collate_train(examples[start : start + 8], int(tokenizer.pad_token_id))
            ll = _local_logits(head, tail, b)
            fl = whole(b.input_ids, b.attention_mask).logits
            local_scores.append(el2n_scores(ll, b.labels))
            full_scores.append(el2n_scores(fl, b.labels))
            k = b.input_ids.shape[0]
            local_loss += float(_lm_loss(ll, b.labels)) * k
            full_loss += float(_lm_loss(fl, b.labels)) * k
            valid = b.labels[:, 1:] != IGNORE_INDEX
            same = ll[:, :-1].argmax(-1) == b.input_ids[:, :-1]
            self_pred += int((same & valid).sum())
            valid_total += int(valid.sum())
    ls, fs = torch.cat(local_scores).double(), torch.cat(full_scores).double()
    rl, rf = _ranks(ls), _ranks(fs)
    spearman = float(torch.corrcoef(torch.stack([rl, rf]))[0, 1])
    kl, kf = set(keep_hardest(ls, 0.5)), set(keep_hardest(fs, 0.5))
    del head, trunk, tail, whole
    gc.collect()
    return {
        "examples": n,
        "local_path_loss": local_loss / n,
        "full_split_model_loss": full_loss / n,
        "local_argmax_is_input_token": self_pred / max(valid_total, 1),
        "el2n_local_mean": float(ls.mean()),
        "el2n_local_std": float(ls.std()),
        "el2n_full_mean": float(fs.mean()),
        "el2n_full_std": float(fs.std()),
        "spearman_local_vs_full": spearman,
        "kept_half_overlap": len(kl & kf) / max(len(kf), 1),
        "kept_half_overlap_random_expectation": 0.5,
    }


def section_compute(model: Any, tokenizer: Any, warmup: int, steps: int,
                    tails: tuple[str, ...], diag_examples: int) -> dict[str, Any]:
    d = split_defaults()
    n_params = sum(q.numel() for q in model.parameters())
    flops = flop_model(model.config, n_params, STEP_TOKENS, d["num_prompts"], STEP_BATCH,
                       d["local_loss_steps"], d["gamma"])
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
        dev_round = d["local_loss_steps"] * local + (n / b) * el2n + (kept / b) * r["device_s_mean"]
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
        "settings": {"batch": STEP_BATCH, "tokens": STEP_TOKENS, "warmup_steps": warmup,
                     "timed_steps": steps, "num_prompts": d["num_prompts"],
                     "client_blocks": d["client_blocks"], "full_lr": FULL_LR,
                     "sfp_lr": SFP_LR},
        "flops": flops,
        "device": dev,
        "full": full,
        "timing": timing,
        "paper_fraction": PAPER_COMPUTE_FRACTION,
        "local_path": local_path_diagnostics(model, tokenizer, diag_examples),
    }


# ------------------------------------------------------------------ section 3


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def child_trunk(tail: str) -> None:
    """A trunk service process: prints its port, serves until stdin closes."""
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    from models import load_causal_lm
    from models.split import build_split
    from server.trunk_service import TrunkService, start_trunk_server

    model = load_causal_lm(MODEL, dtype="float32", device="cpu").model
    spec = make_spec(model, tail)
    _, trunk, _ = build_split(model, spec, init_seed=0)
    service = TrunkService(trunk, spec)
    server, port = start_trunk_server(service, "127.0.0.1", 0)
    _emit({"port": port, "peak_mib_ready": maxrss_mib()})
    sys.stdin.read()  # the parent closes our stdin when the device is done
    server.stop(grace=None)
    _emit({"peak_mib": maxrss_mib(), "usage": service.usage()})


def child_device(port: int, steps: int, tail: str, mode: str) -> dict[str, Any]:
    """A device process: only its parts in memory, split steps over gRPC."""
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    from client.split_trainer import SplitSettings, _lm_loss, split_round
    from client.trunk_client import TrunkClient
    from models import load_causal_lm
    from models.split import device_parts

    marks = {"after_imports": maxrss_mib()}
    rss = {"after_imports": rss_mib()}
    t0 = now()
    loaded = load_causal_lm(MODEL, dtype="float32", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    marks["after_full_model_load"] = maxrss_mib()
    rss["after_full_model_load"] = rss_mib()
    spec = make_spec(model, tail)
    head, tl = device_parts(model, spec, init_seed=0)
    gc.collect()
    marks["after_device_parts"] = maxrss_mib()
    rss["after_device_parts"] = rss_mib()
    held = {id(q): q.numel() for m in (head, tl) for q in m.parameters()}
    p = spec.num_prompts
    with TrunkClient(f"127.0.0.1:{port}") as client:
        session = client.open(spec, f"mem-{mode}", 1)
        if mode == "steps":
            batches = dolly_batches(tokenizer, steps)
            marks["after_batches"] = maxrss_mib()
            params = [q for q in (*head.parameters(), *tl.parameters()) if q.requires_grad]
            opt = torch.optim.AdamW(params, lr=SFP_LR, weight_decay=0.0)
            for b in batches:  # phase 3 of client/split_trainer.split_round
                hidden, mask = head(b.input_ids, b.attention_mask)
                body_out = session.forward(hidden.detach(), mask, train=True)
                body_out.requires_grad_()
                loss = _lm_loss(tl(body_out)[:, p:], b.labels)
                loss.backward()
                cut_grad = session.backward(body_out.grad)
                target = hidden if cut_grad.shape[1] == hidden.shape[1] else hidden[:, :p]
                target.backward(cut_grad)
                opt.step()
                opt.zero_grad(set_to_none=True)
            marks[f"after_{steps}_split_steps"] = maxrss_mib()
            rss[f"after_{steps}_split_steps"] = rss_mib()
        else:  # the real device round: local loss, EL2N pruning, split steps
            examples = dolly_examples(tokenizer, 64)
            d = split_defaults()
            stats = split_round(
                head, tl, session, examples,
                SplitSettings(local_steps=steps, local_loss_steps=d["local_loss_steps"],
                              batch_size=STEP_BATCH, learning_rate=SFP_LR,
                              gamma=d["gamma"], seed=0, server_round=1),
                pad_id=int(tokenizer.pad_token_id), label="mem-round",
            )
            marks["after_split_round"] = maxrss_mib()
            rss["after_split_round"] = rss_mib()
            marks["kept"] = stats.kept
        session.close()
    return {
        "kind": f"device-{mode}",
        "tail": tail,
        "peak_mib": maxrss_mib(),
        "marks_mib": marks,
        "rss_mib": rss,
        "device_params_held": sum(held.values()),
        "seconds": now() - t0,
    }


def child_full(steps: int) -> dict[str, Any]:
    """Full backprop + AdamW steps on the whole model, all parameters trainable."""
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    from client.split_trainer import _lm_loss
    from models import load_causal_lm

    marks = {"after_imports": maxrss_mib()}
    t0 = now()
    loaded = load_causal_lm(MODEL, dtype="float32", device="cpu")
    model = loaded.model
    model.requires_grad_(True)
    model.train()
    marks["after_load"] = maxrss_mib()
    batches = dolly_batches(loaded.tokenizer, steps)
    opt = torch.optim.AdamW(model.parameters(), lr=FULL_LR, weight_decay=0.0)
    for b in batches:
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        loss = _lm_loss(logits, b.labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del logits, loss
    marks[f"after_{steps}_steps"] = maxrss_mib()
    return {"kind": "full", "peak_mib": maxrss_mib(), "marks_mib": marks,
            "trainable_params": sum(q.numel() for q in model.parameters()),
            "seconds": now() - t0}


def _child_cmd(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", *args]


def _last_json(text: str) -> dict[str, Any]:
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"no JSON line in child output: {text[-2000:]}")
    return json.loads(lines[-1])


def run_device_with_trunk(steps: int, tail: str, mode: str) -> dict[str, Any]:
    """Start a trunk-service child, then a device child that trains against it."""
    env = dict(os.environ)
    trunk = subprocess.Popen(
        _child_cmd("trunk", "--tail", tail), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        first = trunk.stdout.readline() if trunk.stdout else ""
        if not first.startswith("{"):
            raise RuntimeError(f"trunk child failed: {first} {trunk.stderr.read()[-2000:]}")
        ready = json.loads(first)
        dev = subprocess.run(
            _child_cmd("device", "--port", str(ready["port"]), "--steps", str(steps),
                       "--tail", tail, "--mode", mode),
            capture_output=True, text=True, timeout=1200, check=False, env=env,
        )
        if dev.returncode != 0:
            raise RuntimeError(f"device child failed (rc {dev.returncode}): "
                               f"{dev.stderr[-2000:]}")
        device = _last_json(dev.stdout)
        out, _ = trunk.communicate(input="", timeout=120)
        device["trunk_process"] = {"ready": ready, "final": _last_json(out)}
        return device
    finally:
        if trunk.poll() is None:  # only the child this function started
            trunk.kill()
            trunk.wait()


def run_child(*args: str) -> dict[str, Any]:
    proc = subprocess.run(_child_cmd(*args), capture_output=True, text=True,
                          timeout=1200, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return _last_json(proc.stdout)


def section_memory(steps: int, with_round: bool, with_norm: bool) -> dict[str, Any]:
    parent = maxrss_mib()
    device = run_device_with_trunk(steps, "norm+head", "steps")
    device_norm = run_device_with_trunk(steps, "norm", "steps") if with_norm else None
    full = run_child("full", "--steps", str(steps))
    out: dict[str, Any] = {
        "settings": {"steps": steps, "batch": STEP_BATCH, "tokens": STEP_TOKENS},
        "parent_peak_mib_at_spawn": parent,
        "device": device,
        "device_norm": device_norm,
        "full": full,
        "ratio": device["peak_mib"] / full["peak_mib"],
        "ratio_norm": device_norm["peak_mib"] / full["peak_mib"] if device_norm else None,
    }
    if with_round:
        rnd = run_device_with_trunk(steps, "norm+head", "round")
        out["device_round"] = rnd
        out["ratio_round"] = rnd["peak_mib"] / full["peak_mib"]
    return out


# ------------------------------------------------------------------ section 4


def sim_args(out_dir: Path, name: str, rounds: int, eval_examples: int,
             new_tokens: int) -> list[str]:
    return [
        "simulate", "--name", name, "--output-dir", str(out_dir),
        "--model", MODEL, "--dataset", str(DOLLY_PATH),
        "--clients", str(SIM_CLIENTS), "--partition", "dirichlet",
        "--alpha", str(SIM_ALPHA), "--limit", str(SIM_LIMIT),
        "--rounds", str(rounds),
        "--set", 'eval.metric="rouge_l"',
        "--set", f"data.eval_examples={eval_examples}",
        "--set", f"eval.max_new_tokens={new_tokens}",
    ]


def run_simulation(name: str, args: list[str], root: Path, timeout: float) -> dict[str, Any]:
    """One ``pollinate simulate`` subprocess; its metrics and outcome."""
    out_dir = root / name
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).parent / "pollinate"
    cmd = [str(exe), *args]
    log_path = root / f"{name}.log"
    t0 = now()
    timed_out = False
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=REPO)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGINT)  # pollinate stops its engine group on ^C
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    wall = now() - t0
    run_dirs = sorted(p for p in out_dir.iterdir() if p.is_dir())
    result: dict[str, Any] = {
        "name": name, "command": cmd, "returncode": proc.returncode,
        "timed_out": timed_out, "timeout_s": timeout, "wall_s": wall,
        "log_tail": log_path.read_text()[-3000:],
    }
    if not run_dirs:
        return result
    run_dir = run_dirs[-1]
    status = run_dir / "status.json"
    result["status"] = json.loads(status.read_text()) if status.exists() else None
    parts = run_dir / "partitions.json"
    if parts.exists():
        result["partition_sizes"] = json.loads(parts.read_text()).get("sizes")
    metrics = run_dir / "metrics.jsonl"
    rows = ([json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
            if metrics.exists() else [])
    result["metrics"] = rows
    trained = [r for r in rows if r["round"] >= 1 and r["clients"]]
    if rows:
        result["eval_loss_first"] = rows[0]["eval_loss"]
        result["eval_loss_last"] = rows[-1]["eval_loss"]
        result["metric_first"] = rows[0]["eval_metric"]
        result["metric_last"] = rows[-1]["eval_metric"]
        result["rounds_done"] = rows[-1]["round"]
        result["round0_seconds"] = rows[0]["seconds"]
    if trained:
        per = [(r["bytes_up"] + r["bytes_down"]) / r["clients"] for r in trained]
        result["bytes_per_client_round"] = per
        result["bytes_per_client_round_mean"] = sum(per) / len(per)
        result["bytes_up_per_client_round"] = [r["bytes_up"] / r["clients"] for r in trained]
        result["bytes_down_per_client_round"] = [r["bytes_down"] / r["clients"]
                                                 for r in trained]
        result["round_seconds"] = [r["seconds"] for r in trained]
        if "kept_examples" in trained[0]:
            result["kept_examples"] = [r.get("kept_examples") for r in trained]
            result["local_loss"] = [r.get("local_loss") for r in trained]
    return result


def section_task(args: argparse.Namespace) -> dict[str, Any]:
    t_start = now()
    runs: dict[str, Any] = {}
    base = {"rounds": args.sim_rounds, "eval_examples": args.sim_eval,
            "new_tokens": args.sim_new_tokens}
    steps = ["--local-steps", str(args.sim_local_steps), "--batch-size", "8"]
    plan = [
        ("lora", ["--method", "lora", *steps, "--lr", "2e-3"]),
        ("sfprompt", ["--method", "sfprompt", *steps, "--lr", str(SFP_LR)]),
    ]
    if args.sim_tail_norm:
        plan.append(("sfprompt-norm", ["--method", "sfprompt", *steps, "--lr", str(SFP_LR),
                                       "--set", 'split.tail="norm"']))
    with tempfile.TemporaryDirectory(prefix="sfprompt-bench-") as tmp:
        root = Path(tmp)
        for name, extra in plan:
            runs[name] = run_simulation(name, [*sim_args(root / name, name, **base), *extra],
                                        root, args.sim_timeout)
    return {
        "settings": {
            "dataset": str(DOLLY_PATH), "clients": SIM_CLIENTS, "partition": "dirichlet",
            "alpha": SIM_ALPHA, "limit": SIM_LIMIT, "rounds": args.sim_rounds,
            "eval_examples": args.sim_eval, "eval_max_new_tokens": args.sim_new_tokens,
            "metric": "rouge_l", "local_steps": args.sim_local_steps, "batch_size": 8,
            "lora": "rank 8, q_proj+v_proj, AdamW lr 2e-3",
            "sfprompt": f"default [split] (8 prompts, 0 device blocks, gamma 0.5, 2 "
            f"local-loss steps), AdamW lr {SFP_LR}",
            "timeout_s_per_run": args.sim_timeout,
        },
        "runs": runs,
        "seconds": now() - t_start,
    }


# ------------------------------------------------------------------ report


def _mb(x: float) -> str:
    return f"{x / 1e6:,.1f} MB" if x >= 1e5 else f"{x / 1e3:,.1f} kB"


def _x(x: float) -> str:
    return f"{x:.3f}x" if x < 10 else f"{x:.1f}x"


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    rows: list[tuple[str, str, str, str]] = []
    b = results.get("bytes")
    if b:
        a = b["activations"]
        s = b["settings"]
        full = b["full_fedavg"]
        lora = b["lora"]
        rows.append((
            "1 bytes", "full-model FedAvg, per client-round",
            f"**{_mb(full['total_bytes'])}** (2 x {full['params']:,} params x 4 B)",
            full["how"],
        ))
        rows.append((
            "1 bytes", "LoRA FedAvg r=8 q,v: down + up",
            f"{lora['ins_bytes']:,} + {lora['res_bytes']:,} = **{_mb(lora['total_bytes'])}** "
            f"({lora['adapter_params']:,} adapter params)",
            "`payload_bytes` of real `encode_lora_train_ins/res` contents, adapter from "
            f"`attach_lora` on the real model (formula {lora['formula']} = "
            f"{lora['adapter_params_formula']:,})",
        ))
        for tail in ("norm+head", "norm"):
            msg = b["sfprompt"][tail]
            rows.append((
                "1a bytes", f"SFPrompt `train.sfprompt` ins + res, tail=\"{tail}\"",
                f"{msg['ins_bytes']:,} + {msg['res_bytes']:,} B "
                f"({msg['trainable_params']:,} trainable params)",
                "`payload_bytes` of real `encode_split_train_ins/res` contents, tensors "
                "from `trainable_state` (prompts + trainable tail) of the real model",
            ))
        rows.append((
            "1b bytes", "activation traffic per example (P=8, T=128, fp32)",
            f"up {a['up_per_example']:,.0f} + down {a['down_per_example']:,.0f} = "
            f"**{a['per_example']:,.0f} B** (analytic payload "
            f"{a['analytic_up_per_example'] + a['analytic_down_per_example']:,} B)",
            f"real gRPC on 127.0.0.1: TrunkService on the real trunk, "
            f"{a['settings']['steps']} split step(s) of batch {a['settings']['batch']} x "
            f"{a['settings']['tokens']} Dolly tokens, session bytes_up/bytes_down (server "
            f"counters {'agree' if a['client_matches_server'] else 'DIFFER'}); analytic: "
            "up (P+T)d x 4 x 2 + mask (P+T) x 8, down (P+T)d x 4 + Pd x 4",
        ))
        for tail in ("norm+head", "norm"):
            r = b["sfprompt"][tail]["round"]
            rows.append((
                "1 bytes", f"SFPrompt per client-round, tail=\"{tail}\"",
                f"**{_mb(r['total_bytes'])}** (activations {_mb(r['trunk_up'] + r['trunk_down'])}"
                f" = {r['activation_share']:.0%}); vs full FedAvg **{_x(r['ratio_vs_full_fedavg'])}**"
                f" (paper ViT-B: {b['paper_ratio_vs_full']}x), vs LoRA **{_x(r['ratio_vs_lora'])}**",
                f"{s['round_examples']} examples, gamma {s['gamma']} -> {s['kept']} kept, "
                f"E={s['epochs_over_kept']}: {s['split_examples_per_round']} x per-example "
                "bytes + Open + ins + res. Assumes " + s["assumptions"],
            ))
        rows.append((
            "1 bytes", "break-even vs full FedAvg (split examples per round)",
            f"{b['break_even_examples_vs_full_norm_head']:,.0f} (norm+head), "
            f"{b['break_even_examples_vs_full_norm']:,.0f} (norm)",
            "(full FedAvg bytes - ins - res) / per-example activation bytes, T=128",
        ))
    c = results.get("compute")
    if c:
        f = c["flops"]
        rows.append((
            "2 FLOPs", "full fine-tuning per training token",
            f"{f['full_per_token'] / 1e6:,.0f} MFLOP (6N = {f['full_dense_6N'] / 1e6:,.0f} "
            f"+ attention {f['full_attention_scores'] / 1e6:,.1f})",
            f"analytic: 6 x N (N = {f['N']:,}) + 3 x 2 x 2 x L x T/2 x d attention scores, T=128",
        ))
        for tail in ("norm+head", "norm"):
            t = f["tails"][tail]
            terms = t["terms_per_token"]
            rows.append((
                "2 FLOPs", f"device split step per token, tail=\"{tail}\"",
                f"{t['split_step_per_token'] / 1e6:,.1f} MFLOP = **{t['split_step_fraction']:.1%}**"
                f" of full (paper: {c['paper_fraction']:.2%})",
                f"analytic: (P+T)/T x [LM head fwd 2dV + input grad 2dV"
                f"{' + weight grad 2dV' if tail == 'norm+head' else ' (head frozen: no weight grad)'}"
                f" + norm + softmax ~4V] + prompt grad Pd/T + AdamW 12 x "
                f"{t['trainable_params']:,}/(BT); terms (MFLOP): fwd "
                f"{terms['tail_forward'] / 1e6:.1f}, in-grad {terms['tail_input_grad'] / 1e6:.1f},"
                f" w-grad {terms['tail_weight_grad'] / 1e6:.1f}, AdamW {terms['adamw'] / 1e6:.2f}",
            ))
            rows.append((
                "2 FLOPs", f"device per round / full FT per round, tail=\"{tail}\"",
                f"**{t['round_fraction']:.1%}**",
                f"analytic: {t['round_assumption']}; EL2N = tail forward + ~6V per position",
            ))
        for tail in c["timing"]:
            tm = c["timing"][tail]
            dev = c["device"][tail]
            rows.append((
                "2 time", f"device split step vs full backprop step, tail=\"{tail}\"",
                f"{tm['device_step_s']:.2f} s vs {tm['full_step_s']:.2f} s = "
                f"**{tm['step_ratio']:.1%}** (CPU time {tm['step_ratio_cpu']:.1%}); the "
                f"server body took {dev['server_s_mean']:.2f} s",
                f"perf_counter, batch {c['settings']['batch']} x {c['settings']['tokens']} "
                f"Dolly tokens, {c['settings']['timed_steps']} timed step(s) after "
                f"{c['settings']['warmup_steps']} warm-up: device = head + tail fwd/bwd + "
                "prompt bwd + AdamW (the body runs in-process via LocalTrunkSession, its time "
                "excluded); full = whole model, all params trainable, fwd + bwd + AdamW",
            ))
            rows.append((
                "2 time", f"device round vs full FT round (extrapolated), tail=\"{tail}\"",
                f"{tm['round_device_s']:.0f} s vs {tm['round_full_s']:.0f} s = "
                f"**{tm['round_ratio']:.1%}**",
                f"measured local-loss step {tm['local_loss_step_s']:.2f} s, EL2N batch of 8 "
                f"{tm['el2n_batch_s']:.2f} s, split step as above; same round assumptions "
                "as the FLOP row",
            ))
    if c and c.get("local_path"):
        lp = c["local_path"]
        rows.append((
            "2 local path", "local-loss / EL2N path tail(head(x)) at init",
            f"token loss {lp['local_path_loss']:.1f} nats (whole split model "
            f"{lp['full_split_model_loss']:.2f}); argmax = input token at "
            f"{lp['local_argmax_is_input_token']:.0%} of targets; EL2N local "
            f"{lp['el2n_local_mean']:.3f} +- {lp['el2n_local_std']:.3f} vs whole model "
            f"{lp['el2n_full_mean']:.3f} +- {lp['el2n_full_std']:.3f}; Spearman "
            f"**{lp['spearman_local_vs_full']:.2f}**, kept-half overlap "
            f"{lp['kept_half_overlap']:.0%} (random: 50%)",
            f"{lp['examples']} Dolly examples x 128 tokens, `_local_logits` + "
            "`el2n_scores` (what pruning uses) vs `PromptedLM` (head -> trunk -> tail), "
            "fresh split, no training",
        ))
    mem = results.get("memory")
    if mem:
        dev, full = mem["device"], mem["full"]
        st = mem["settings"]
        dm, fm = dev["marks_mib"], full["marks_mib"]
        rows.append((
            "3 memory", "device peak RSS / full FT peak RSS, tail=\"norm+head\"",
            f"{dev['peak_mib']:,.0f} / {full['peak_mib']:,.0f} MiB = **{mem['ratio']:.2f}**",
            f"fresh subprocesses, `ru_maxrss`; device = `device_parts` "
            f"({dev['device_params_held']:,} params held: embedding + untied head copy + norm"
            f" + prompts), {st['steps']} split step(s) of {st['batch']} x {st['tokens']} "
            "against a TrunkService in another process; full = whole model, 3 fwd/bwd/AdamW "
            "steps" if st["steps"] == 3 else
            f"fresh subprocesses, `ru_maxrss`; device = `device_parts`, {st['steps']} split "
            f"step(s) against a TrunkService in another process; full = {st['steps']} "
            "fwd/bwd/AdamW step(s)",
        ))
        if mem.get("device_norm"):
            rows.append((
                "3 memory", "device, tail=\"norm\"",
                f"{mem['device_norm']['peak_mib']:,.0f} MiB = **{mem['ratio_norm']:.2f}** of full",
                "same, head frozen (no head grad, no AdamW state for it)",
            ))
        base_d, base_f = dm["after_imports"], fm["after_imports"]
        rows.append((
            "3 memory", "same, above the interpreter + libraries baseline",
            f"{dev['peak_mib'] - base_d:,.0f} / {full['peak_mib'] - base_f:,.0f} MiB = "
            f"**{(dev['peak_mib'] - base_d) / (full['peak_mib'] - base_f):.2f}**",
            f"peak minus `ru_maxrss` after imports (python + torch + transformers + flwr: "
            f"{base_d:,.0f} / {base_f:,.0f} MiB), which a real device would also pay",
        ))
        rr = dev["rss_mib"]
        rows.append((
            "3 memory", "device RSS: after imports / whole-model load / device_parts",
            f"{rr['after_imports']:,.0f} / {rr['after_full_model_load']:,.0f} / "
            f"{rr['after_device_parts']:,.0f} MiB",
            "VmRSS marks in the device child. `device_parts` is called on a fully loaded "
            f"model; loading raised RSS by only {rr['after_full_model_load'] - rr['after_imports']:,.0f}"
            " MiB of the 513 MiB of weights (memory-mapped safetensors: pages are resident "
            "only once touched, so the server blocks never become resident here); "
            "`device_parts` adds the untied head copy (108 MiB) and touches the tied "
            "embedding it copies from (108 MiB)",
        ))
        if "device_round" in mem:
            rr = mem["device_round"]
            rows.append((
                "3 memory", "device running a real `split_round` (64 examples)",
                f"{rr['peak_mib']:,.0f} MiB = **{mem['ratio_round']:.2f}** of full",
                f"`client.split_trainer.split_round`: 2 local-loss steps, EL2N pruning of 64 x "
                f"128-token examples (scored in chunks of 32, logits + softmax + one-hot over "
                f"V), gamma 0.5, {st['steps']} split steps; trunk in another process",
            ))
        tp = dev.get("trunk_process")
        if tp:
            rows.append((
                "3 memory", "trunk server process: ready / peak while serving one device",
                f"{tp['ready']['peak_mib_ready']:,.0f} / {tp['final']['peak_mib']:,.0f} MiB",
                "`ru_maxrss` of the TrunkService child: whole model loaded, then one "
                f"session's pending graph (30-block body on {st['batch']} x (8 + "
                f"{st['tokens']}) positions) per training step; TrunkService admits up to "
                "256 such sessions at once (`max_sessions`), with no memory budget",
            ))
        rows.append((
            "3 memory", "full FT peak RSS",
            f"{full['peak_mib']:,.0f} MiB (after load {fm['after_load']:,.0f})",
            "whole model, all params trainable, AdamW, batch 8 x 128",
        ))
    t = results.get("task")
    if t:
        st = t["settings"]
        for name, r in t["runs"].items():
            if "metric_last" not in r:
                rows.append(("4 task", name, f"no metrics (rc {r.get('returncode')}, "
                             f"timed out: {r.get('timed_out')})", "see JSON log_tail"))
                continue
            partial = "" if r.get("rounds_done") == st["rounds"] and not r["timed_out"] else (
                f" (**only {r.get('rounds_done')} of {st['rounds']} rounds** before the "
                f"{st['timeout_s_per_run']:.0f} s timeout)")
            bpc = r.get("bytes_per_client_round_mean")
            rows.append((
                "4 task", name,
                f"Rouge-L {r['metric_first']:.3f} -> **{r['metric_last']:.3f}**, eval loss "
                f"{r['eval_loss_first']:.3f} -> {r['eval_loss_last']:.3f}; "
                f"{_mb(bpc) if bpc else 'n/a'} per client-round; wall {r['wall_s'] / 60:.1f} "
                f"min{partial}; round 0 (evaluation only) {r.get('round0_seconds', 0):.0f} s, "
                f"rounds {', '.join(f'{x:.0f}' for x in r.get('round_seconds', []))} s"
                + (f"; local-path loss per round "
                   f"{', '.join(f'{x:.1f}' for x in r['local_loss'])}, kept "
                   f"{r['kept_examples']}" if r.get("local_loss") else ""),
                f"`pollinate simulate` Dolly, {st['clients']} clients dirichlet {st['alpha']}, "
                f"limit {st['limit']}, {st['rounds']} rounds, {st['local_steps']} local steps "
                f"x batch {st['batch_size']}, {st['eval_examples']} eval examples, "
                f"{st['eval_max_new_tokens']} new tokens; bytes = mean over rounds of "
                "(bytes_up + bytes_down)/clients from metrics.jsonl",
            ))
    if t:
        done = {n: r.get("rounds_done", 0) for n, r in t["runs"].items() if r.get("metrics")}
        k = min(done.values()) if done else 0
        if k >= 1 and len(set(done.values())) > 1:  # some run stopped early
            parts = []
            for name, r in t["runs"].items():
                row = next((x for x in r.get("metrics", []) if x["round"] == k), None)
                if row:
                    parts.append(f"{name}: Rouge-L {row['eval_metric']:.3f}, eval loss "
                                 f"{row['eval_loss']:.3f}")
            rows.append((
                "4 task", f"at equal rounds (round {k}, the last every run reached)",
                "; ".join(parts),
                "the same metrics.jsonl rows, read at round k",
            ))
    head = (
        f"# SFPrompt benchmark{' (quick)' if results['quick'] else ''}\n\n"
        f"{m['date']}, {m['cpu_affinity']} CPU ({m['cpu_model']}), torch {m['torch']}, "
        f"transformers {m['transformers']}, flwr {m['flwr']}, CUDA: "
        f"{'yes' if m['cuda_available'] else 'no'}. CPU shared with other engineers' work "
        f"during the run (load average {m['load_average_at_start'][0]:.1f} at start, "
        f"{m.get('load_average_at_end', [float('nan')])[0]:.1f} at end): timings are "
        f"contended. Total runtime {results['total_seconds'] / 60:.1f} min. Raw numbers: "
        f"`bench/results/{results['stem']}.json`.\n\n"
        "| section | quantity | value | how measured |\n| --- | --- | --- | --- |\n"
    )
    body = "".join(f"| {a} | {q} | {v} | {h} |\n" for a, q, v, h in rows)
    extra = "\n## Notes\n\n" + "\n".join(notes(results)) + "\n"
    return head + body + extra


def notes(results: dict[str, Any]) -> list[str]:
    out = [
        "- Model: SmolLM2-135M-Instruct, float32, d = 576, V = 49,152, 30 blocks, tied "
        "embeddings. Default split: 8 prompts, 0 device blocks, so the device holds the "
        "embedding, the prompts and the tail (final norm + an untied copy of the LM head).",
        "- The LM head is d x V = 28.3M params = 21% of the model, and it sits on the "
        "device. SFPrompt's 0.46% compute figure is for ViT-B, whose classifier head is "
        "768 x classes; for a 49k-vocabulary LM the tail alone costs ~1/5 of a full "
        "training step per token, and with tail=\"norm+head\" the device also uploads "
        "and downloads the 113 MB head every round.",
    ]
    c = results.get("compute")
    if c:
        out.append(
            "- Section 2 per-round numbers count EL2N scoring of all local examples "
            "through the LM head (a forward over V for every position): for this vocabulary "
            "that pass alone is a large share of the device's round."
        )
        out.append(
            "- Section 2 time vs FLOPs: the measured ratios are below the FLOP ratios because "
            "on a CPU the device's work is one large GEMM (d x V) per pass, run near peak, "
            "while the full step is many small GEMMs plus elementwise work (norms, RoPE, "
            "SiLU, attention) and an AdamW update over all 134.5M parameters (memory bound; "
            "see `adamw_s` in the JSON). Wall times were taken under heavy contention (load "
            "average up to ~10 on 2 cores): CPU-time ratios are steadier than wall ratios, "
            "and the FLOP ratio is the machine-independent figure."
        )
    if c and c.get("local_path"):
        lp = c["local_path"]
        out.append(
            "- Local path (section 2 row '2 local path'): with tied embeddings the tail "
            "applied to raw token embeddings mostly predicts the *input* token "
            f"({lp['local_argmax_is_input_token']:.0%} of positions here), with huge "
            f"confidence: token loss {lp['local_path_loss']:.0f} nats, and EL2N saturates "
            f"near sqrt(2) for every example (std {lp['el2n_local_std']:.3f}). Pruning on "
            f"it ranks examples unlike the whole model (Spearman "
            f"{lp['spearman_local_vs_full']:.2f} on {lp['examples']} examples): at "
            "initialisation the 'hardest gamma' selection is close to arbitrary, and the "
            "local-loss steps train the shared tail on inputs it never sees in the split "
            "path (cf. docs/algorithms.md 3.5)."
        )
    t = results.get("task")
    if t:
        st = t["settings"]
        requested = (10, 32, 32, 3)
        given = (st["local_steps"], st["eval_examples"], st["eval_max_new_tokens"],
                 st["rounds"])
        if given != requested:
            out.append(
                f"- Section 4 deviates from the requested settings to fit ~20 min on 2 "
                f"shared cores: {st['local_steps']} local steps (requested 10), "
                f"{st['eval_examples']} eval examples and {st['eval_max_new_tokens']} new "
                f"tokens (requested 32 / 32)"
                + (f", {st['rounds']} rounds (requested 3)" if st["rounds"] != 3 else "")
                + "; "
                "everything else as requested (Dolly, 4 clients, dirichlet 0.5, limit 800, "
                "batch 8, lr 2e-3 LoRA / 1e-3 SFPrompt, default [split]). Reason: "
                "SFPrompt's central evaluation generates with `PromptedLM.generate`, which "
                "re-runs the whole sequence for every new token (no KV cache): measured "
                "here, one forward of 32 Dolly eval prompts x 104 positions takes ~23 s, so "
                "32 x 32 tokens is > 10 min per evaluation, 4 evaluations per run; and a "
                "LoRA round of 4 clients x 10 steps x batch 8 takes ~4-5 min on this box. "
                "Rerun with `--only 4 --sim-local-steps 10 --sim-eval 32 --sim-new-tokens "
                "32 --sim-timeout 3600` where time allows."
            )
        if "sfprompt-norm" not in t["runs"]:
            out.append("- Section 4: SFPrompt with tail=\"norm\" was not run (time); "
                       "`--sim-tail-norm` adds it.")
        out.append(
            f"- Section 4: {st['rounds']} rounds of {st['local_steps']} local steps is far "
            "from convergence for either method; equal rounds and equal steps is not equal "
            "compute (SFPrompt adds the local-loss steps and an EL2N pass per round, LoRA "
            "back-propagates through the whole model). SFPrompt's bytes include the trunk "
            "traffic (side channel in the ledger). Rouge-L is Pollinate's "
            "`corpora.scoring.rouge_l` on greedy generations."
        )
    return out


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="sections 1 (short activation step), 2 (1 step), 3 (1 step)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps in section 2")
    parser.add_argument("--act-steps", type=int, default=3, help="gRPC split steps, section 1")
    parser.add_argument("--mem-steps", type=int, default=3, help="steps per memory child")
    parser.add_argument("--sim-rounds", type=int, default=SIM_ROUNDS)
    parser.add_argument("--sim-local-steps", type=int, default=SIM_LOCAL_STEPS)
    parser.add_argument("--sim-eval", type=int, default=SIM_EVAL)
    parser.add_argument("--sim-new-tokens", type=int, default=SIM_NEW_TOKENS)
    parser.add_argument("--sim-tail-norm", action="store_true",
                        help="also run SFPrompt with tail=norm in section 4")
    parser.add_argument("--sim-timeout", type=float, default=900.0, help="s per simulation")
    parser.add_argument("--only", default="", help="comma list of sections to run (1-4)")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="only re-render the markdown table from a results JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tail", default="norm+head", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="steps", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if args.render:
        results = json.loads(args.render.read_text())
        table = render(results)
        args.render.with_suffix(".md").write_text(table)
        print(table)
        return 0
    if args.child == "trunk":
        child_trunk(args.tail)
        return 0
    if args.child == "device":
        _emit(child_device(args.port, args.steps, args.tail, args.mode))
        return 0
    if args.child == "full":
        _emit(child_full(args.steps))
        return 0

    started = now()
    load_at_start = os.getloadavg()
    date_at_start = datetime.now(UTC).isoformat(timespec="seconds")
    warmup = 1
    act_steps, act_batch, act_tokens = args.act_steps, STEP_BATCH, STEP_TOKENS
    if args.quick:
        sections = {"1", "2", "3"}
        args.steps, args.mem_steps, warmup = 1, 1, 0
        act_steps, act_batch = 1, 2
    elif args.only:
        sections = set(args.only.split(","))
    else:
        sections = {"1", "2", "3", "4"}
    full_run = sections == {"1", "2", "3", "4"} and not args.quick
    stem = "sfprompt-quick" if args.quick else ("sfprompt" if full_run else "sfprompt-partial")

    def log(msg: str) -> None:
        print(f"[{now() - started:7.1f} s] {msg}", flush=True)

    results: dict[str, Any] = {
        "benchmark": "sfprompt",
        "quick": args.quick,
        "mode": "quick" if args.quick else ("full" if full_run else "partial"),
        "stem": stem,
        "sections": sorted(sections),
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "port", "mode")},
        "split_defaults": split_defaults(),
    }
    if "3" in sections:  # first, while this process is still lean (no model yet)
        try:
            results["memory"] = section_memory(args.mem_steps, with_round=not args.quick,
                                               with_norm=not args.quick)
        except Exception as exc:  # keep the other sections
            results["memory_error"] = f"{type(exc).__name__}: {exc}"
        log("section 3 done")
    results["machine"] = machine_info()
    results["machine"]["load_average_at_start"] = load_at_start
    results["machine"]["date"] = date_at_start

    from models import load_causal_lm

    if sections & {"1", "2"}:
        loaded = load_causal_lm(MODEL, dtype="float32", device="cpu")
        model, tokenizer = loaded.model, loaded.tokenizer
        log(f"model loaded: {sum(q.numel() for q in model.parameters()):,} params")
        if "1" in sections:
            results["bytes"] = section_bytes(model, tokenizer, act_steps, act_batch, act_tokens)
            log("section 1 done")
        if "2" in sections:
            tails = ("norm+head",) if args.quick else ("norm+head", "norm")
            results["compute"] = section_compute(model, tokenizer, warmup, args.steps, tails,
                                                 8 if args.quick else 32)
            log("section 2 done")
        del model, loaded
        gc.collect()
    if "4" in sections:
        try:
            results["task"] = section_task(args)
        except Exception as exc:  # keep sections 1-3 even if a run breaks
            results["task_error"] = f"{type(exc).__name__}: {exc}"
        log("section 4 done")
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["total_seconds"] = now() - started
    table = render(results)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))
    (RESULTS_DIR / f"{stem}.md").write_text(table)
    print(table)
    log(f"wrote {RESULTS_DIR / stem}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
