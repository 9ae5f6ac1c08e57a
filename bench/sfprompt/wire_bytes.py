"""Section 1: bytes per client per round, activations included.

Against LoRA FedAvg (r = 8 on q_proj, v_proj) and full-model FedAvg: exact
serialized sizes of real ``train.sfprompt`` instructions and replies (tail
"norm+head" and "norm") and of real ``train.lora`` messages, plus the
activation traffic of real split steps over gRPC on 127.0.0.1 (a
``TrunkService`` on the real model's trunk, batch 8 x 128 Dolly tokens),
scaled to a round of a client with 200 examples.
"""

from __future__ import annotations

import gc
import math
from typing import Any

from bench.harness import bytes_by_record, now
from bench.sfprompt.settings import (
    MODEL,
    PAPER_COMM_RATIO,
    ROUND_EPOCHS,
    ROUND_EXAMPLES,
    SFP_LR,
    dolly_batches,
    make_spec,
    split_defaults,
    split_step,
)


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
    from server.methods import build_spec

    # The one place this bench asks the server for a LoRA spec.
    spec = build_spec(load_config(None, {"run.method": "lora"}))
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
            server_round=1,
            local_steps=10,
            batch_size=8,
            learning_rate=2e-3,
            weight_decay=0.0,
            seed=0,
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


def sfprompt_message_bytes(
    model: Any, tail: str, trunk_up: int, trunk_down: int
) -> dict:
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
        trunk_grant=bytes(32),  # the size of a real grant
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
        "ins_by_record": bytes_by_record(ins),
        "res_by_record": bytes_by_record(res),
    }
    del head, tl, tensors
    gc.collect()
    return out


def activation_bytes(
    model: Any, tokenizer: Any, steps: int, batch: int, tokens: int
) -> dict[str, Any]:
    """Real gRPC on 127.0.0.1: split steps against a TrunkService on the real trunk."""
    import torch

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
            grant = service.grant_round(1, ["bench-device"])["bench-device"]
            session = client.open(spec, "bench-device", grant)
            open_up, open_down = session.bytes_up, session.bytes_down
            for b in batches:
                up0, down0 = session.bytes_up, session.bytes_down
                t0 = now()
                loss, cut_grad = split_step(head, tail, session, b, p, opt)
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
    analytic_up = (
        positions * d * 4 * 2 + positions * 8
    )  # hidden + grad (fp32), mask int64
    analytic_down = positions * d * 4 + p * d * 4  # body output + prompt-position grad
    del head, trunk, tail, service, opt
    gc.collect()
    return {
        "settings": {
            "steps": steps,
            "batch": batch,
            "tokens": tokens,
            "num_prompts": p,
            "hidden": d,
            "dtype": spec.activation_dtype,
            "data": "Dolly examples (seeded order) reaching exactly "
            f"{tokens} tokens (prompt truncated from the left)",
        },
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
        "framing_overhead_per_step": (up + down) / steps
        - batch * (analytic_up + analytic_down),
    }


def section_bytes(
    model: Any, tokenizer: Any, steps: int, batch: int, tokens: int
) -> dict[str, Any]:
    """Section 1: bytes per client-round of SFPrompt, LoRA and full FedAvg.

    Real activation traffic (``steps`` split steps of ``batch`` x ``tokens``
    over gRPC) scaled to a round of :data:`ROUND_EXAMPLES` examples, plus the
    exact Flower message sizes of each method.
    """
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
        )
        / per_ex,
        "paper_ratio_vs_full": PAPER_COMM_RATIO,
    }
