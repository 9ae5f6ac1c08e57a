"""Section 3: device peak memory against full fine-tuning, in fresh subprocesses.

``ru_maxrss`` of child processes (``python -m bench.sfprompt --child ...``):
a device holding only its parts (``models.split.device_parts``) training
against a trunk service that runs in another child (gRPC on 127.0.0.1, so
the device's peak holds only its own parts), and a child doing full
backprop + AdamW steps on the whole model. The parent spawns them before it
loads the model: on Linux a child's ``ru_maxrss`` starts at its parent's
resident size at fork/exec.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from typing import Any

from bench.harness import (
    REPO,
    last_json_line,
    maxrss_mib,
    module_command,
    now,
    rss_mib,
    run_json_child,
)
from bench.sfprompt.settings import (
    FULL_LR,
    MODEL,
    SFP_LR,
    STEP_BATCH,
    STEP_TOKENS,
    dolly_batches,
    dolly_examples,
    make_spec,
    split_defaults,
    split_step,
)

_GRANT_ENV = "POLLINATE_BENCH_TRUNK_GRANT"


def emit(obj: dict[str, Any]) -> None:
    """Print ``obj`` as one JSON line (how a child reports to its parent)."""
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
    grants = service.grant_round(1, [f"mem-{m}" for m in ("steps", "round")])
    emit(
        {
            "port": port,
            "peak_mib_ready": maxrss_mib(),
            "grants": {k: v.hex() for k, v in grants.items()},
        }
    )
    sys.stdin.read()  # the parent closes our stdin when the device is done
    server.stop(grace=None)
    emit({"peak_mib": maxrss_mib(), "usage": service.usage()})


def child_device(port: int, steps: int, tail: str, mode: str) -> dict[str, Any]:
    """A device process: only its parts in memory, split steps over gRPC."""
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    from client.split_trainer import SplitSettings, split_round
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
        grant = bytes.fromhex(os.environ[_GRANT_ENV])  # from the trunk child
        session = client.open(spec, f"mem-{mode}", grant)
        if mode == "steps":
            batches = dolly_batches(tokenizer, steps)
            marks["after_batches"] = maxrss_mib()
            params = [
                q for q in (*head.parameters(), *tl.parameters()) if q.requires_grad
            ]
            opt = torch.optim.AdamW(params, lr=SFP_LR, weight_decay=0.0)
            for b in batches:
                split_step(head, tl, session, b, p, opt)
            marks[f"after_{steps}_split_steps"] = maxrss_mib()
            rss[f"after_{steps}_split_steps"] = rss_mib()
        else:  # the real device round: local loss, EL2N pruning, split steps
            examples = dolly_examples(tokenizer, 64)
            d = split_defaults()
            stats = split_round(
                head,
                tl,
                session,
                examples,
                SplitSettings(
                    local_steps=steps,
                    local_loss_steps=d["local_loss_steps"],
                    batch_size=STEP_BATCH,
                    learning_rate=SFP_LR,
                    gamma=d["gamma"],
                    seed=0,
                    server_round=1,
                ),
                pad_id=int(tokenizer.pad_token_id),
                label="mem-round",
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
    return {
        "kind": "full",
        "peak_mib": maxrss_mib(),
        "marks_mib": marks,
        "trainable_params": sum(q.numel() for q in model.parameters()),
        "seconds": now() - t0,
    }


def _child_cmd(*args: str) -> list[str]:
    return module_command("bench.sfprompt", "--child", *args)


def run_device_with_trunk(steps: int, tail: str, mode: str) -> dict[str, Any]:
    """Start a trunk-service child, then a device child that trains against it."""
    env = dict(os.environ)
    trunk = subprocess.Popen(
        _child_cmd("trunk", "--tail", tail),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        first = trunk.stdout.readline() if trunk.stdout else ""
        if not first.startswith("{"):
            raise RuntimeError(
                f"trunk child failed: {first} {trunk.stderr.read()[-2000:]}"
            )
        ready = json.loads(first)
        env[_GRANT_ENV] = ready.pop("grants")[f"mem-{mode}"]
        dev = subprocess.run(
            _child_cmd(
                "device",
                "--port",
                str(ready["port"]),
                "--steps",
                str(steps),
                "--tail",
                tail,
                "--mode",
                mode,
            ),
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
            env=env,
            cwd=REPO,
        )
        if dev.returncode != 0:
            raise RuntimeError(
                f"device child failed (rc {dev.returncode}): {dev.stderr[-2000:]}"
            )
        device = last_json_line(dev.stdout)
        out, _ = trunk.communicate(input="", timeout=120)
        device["trunk_process"] = {"ready": ready, "final": last_json_line(out)}
        return device
    finally:
        if trunk.poll() is None:  # only the child this function started
            trunk.kill()
            trunk.wait()


def run_child(*args: str) -> dict[str, Any]:
    """One measuring child (``python -m bench.sfprompt --child ...``); its result."""
    return run_json_child(_child_cmd(*args), timeout=1200, what=f"child {args}")


def section_memory(steps: int, with_round: bool, with_norm: bool) -> dict[str, Any]:
    """Section 3: device children (each with its trunk child) and a full-FT child.

    Parameters
    ----------
    steps : int
        Training steps per child.
    with_round : bool
        Also run a device child through a real ``split_round``.
    with_norm : bool
        Also measure the device with tail ``"norm"`` (head frozen).
    """
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
        "ratio_norm": device_norm["peak_mib"] / full["peak_mib"]
        if device_norm
        else None,
    }
    if with_round:
        rnd = run_device_with_trunk(steps, "norm+head", "round")
        out["device_round"] = rnd
        out["ratio_round"] = rnd["peak_mib"] / full["peak_mib"]
    return out
