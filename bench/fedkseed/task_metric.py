"""Section 5: task metric of FedKSeed / FedKSeed-Pro against LoRA FedAvg at equal rounds.

Natural Instructions, 4 clients with one task each, 3 rounds, Rouge-L on 32
held-out examples. The ZO learning rate is chosen first by a short probe
(:func:`lr_probe`); then each method runs as one ``pollinate simulate``
(:mod:`bench.fedkseed.simulate`).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.fedkseed.settings import (
    MODEL,
    NI_PATH,
    PAPER_K,
    PROBE_LRS,
    SIM_CLIENTS,
    SIM_EVAL,
    SIM_LIMIT,
    SIM_ROUNDS,
    SIM_RUNS,
    ZO_EPS,
    ZO_INCLUDE,
    run_zo_steps,
    zo_train_config,
)
from bench.fedkseed.simulate import run_with_retry, sim_extra
from bench.harness import now


@dataclass
class _ProbeSetup:
    """The model, client 0's tokenized data and the held-out loss of the probe."""

    model: Any
    tokenizer: Any
    held_out_loss: Callable[[], float]
    tokenized: list[Any]
    max_length: int
    client_examples: int
    held_out_examples: int


def _probe_setup() -> _ProbeSetup:
    """Same data as the simulation, and the server's held-out loss on it.

    The seeded 1,200-example subset, the same 32 held-out examples, client 0
    of the task split, ``model.max_length`` 96 (the default when this was
    recorded). The one place this bench uses the server's evaluator (``server.evaluation.CentralEvaluator._loss``).
    """
    import torch

    from corpora import load_examples, split_holdout
    from models import load_causal_lm, tokenize_example
    from server.evaluation import CentralEvaluator
    from simulation.partitioning import partition

    max_length = 96  # the default model.max_length when fedkseed.json was recorded
    examples = load_examples(str(NI_PATH), limit=SIM_LIMIT, seed=0)
    train, held = split_holdout(examples, SIM_EVAL, 0)
    parts = partition([e.group for e in train], SIM_CLIENTS, "task", seed=0)
    client = [train[i] for i in parts[0]]
    loaded = load_causal_lm(MODEL, dtype="float32", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    evaluator = CentralEvaluator(
        model,
        tok,
        held,
        metric="rouge_l",
        max_length=max_length,
        max_new_tokens=32,
        batch_size=32,
        device=torch.device("cpu"),
    )
    return _ProbeSetup(
        model=model,
        tokenizer=tok,
        held_out_loss=evaluator._loss,
        tokenized=[tokenize_example(e, tok, max_length) for e in client],
        max_length=max_length,
        client_examples=len(client),
        held_out_examples=len(held),
    )


def lr_probe(steps: int, batch: int, lrs: tuple[float, ...]) -> dict[str, Any]:
    """A short run of ZO steps per learning rate (from w0); held-out loss after each.

    Same data as the simulation (the seeded 1,200-example subset, the same 32
    held-out examples, client 0 of the task split), the same model length
    (``model.max_length`` default), the same include globs and eps.

    Returns
    -------
    dict[str, Any]
        ``settings``, ``eval_loss_before``, ``rows`` (one per learning rate),
        ``chosen_learning_rate`` and the ``reason`` for the choice.
    """
    import torch

    from protocols.seeds import ParamWalk, candidate_seeds

    setup = _probe_setup()
    model, tok, held_out_loss = setup.model, setup.tokenizer, setup.held_out_loss
    walk = ParamWalk.from_model(model, list(ZO_INCLUDE))
    params = walk.params(model)
    saved = [p.detach().clone() for _, p in params]
    seeds = candidate_seeds(0, PAPER_K)
    with torch.no_grad():
        base = held_out_loss()
    rows = []
    for lr in lrs:
        with torch.no_grad():
            for (_, p), s in zip(params, saved, strict=True):
                p.copy_(s)
        config = zo_train_config(steps, batch, lr)
        t0 = now()
        stats = run_zo_steps(
            model,
            params,
            setup.tokenized,
            config,
            seeds=seeds,
            eps=ZO_EPS,
            pad_id=int(tok.pad_token_id),
            label="probe",
        )
        seconds = now() - t0
        with torch.no_grad():
            after = held_out_loss()
        rows.append(
            {
                "learning_rate": lr,
                "eval_loss_after": after,
                "eval_loss_change": after - base,
                "train_loss_mean": stats.mean_loss,
                "mean_abs_g": float(stats.scalars.abs().mean()),
                "skipped": stats.skipped,
                "seconds": seconds,
            }
        )
    improving = [r for r in rows if r["eval_loss_after"] < base]
    if improving:
        best = min(improving, key=lambda r: r["eval_loss_after"])
        reason = (
            f"lowest held-out loss after the probe ({best['eval_loss_after']:.4f} "
            f"vs {base:.4f} before)"
        )
    else:
        best = min(rows, key=lambda r: r["learning_rate"])
        reason = "no learning rate lowered the held-out loss; the smallest was kept"
    settings = {
        "eps": ZO_EPS,
        "include": list(ZO_INCLUDE),
        "perturbed_params": walk.numel,
        "steps": steps,
        "batch_size": batch,
        "client_examples": setup.client_examples,
        "held_out_examples": setup.held_out_examples,
        "max_length": setup.max_length,
    }
    del model, held_out_loss, params, saved, setup
    gc.collect()
    return {
        "settings": settings,
        "eval_loss_before": base,
        "rows": rows,
        "chosen_learning_rate": best["learning_rate"],
        "reason": reason,
    }


def section_task(args: argparse.Namespace) -> dict[str, Any]:
    """The probe, then the three runs of :data:`SIM_RUNS` in a temporary folder."""
    t_start = now()
    probe = lr_probe(args.probe_steps, args.zo_batch, PROBE_LRS)
    lr = probe["chosen_learning_rate"]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="fedkseed-sim-") as tmp:
        root = Path(tmp)
        for name in SIM_RUNS:
            extra = sim_extra(name, args.zo_steps, args.zo_batch, lr)
            runs[name] = run_with_retry(name, extra, root, args.sim_timeout)
    return {
        "settings": {
            "dataset": str(NI_PATH),
            "clients": SIM_CLIENTS,
            "partition": "task",
            "limit": SIM_LIMIT,
            "rounds": SIM_ROUNDS,
            "eval_examples": SIM_EVAL,
            "eval_max_new_tokens": 32,
            "metric": "rouge_l",
            "lora": {
                "local_steps": 10,
                "batch_size": 8,
                "defaults": "lora.rank 8, q_proj+v_proj, AdamW lr 2e-3",
            },
            "zo": {
                "num_seeds": PAPER_K,
                "local_steps": args.zo_steps,
                "batch_size": args.zo_batch,
                "eps": ZO_EPS,
                "learning_rate": lr,
                "include": list(ZO_INCLUDE),
            },
        },
        "probe": probe,
        "runs": runs,
        "seconds": now() - t_start,
    }
