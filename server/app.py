"""The Pollinate ServerApp: builds the run from its config and drives it.

``server.app:app`` is the ServerApp Flower loads with ``flwr run``; it reads
the prepared run folder named by the run-config key ``run-dir``.
:func:`build_server_app` makes the same app bound to a config object, which is
what ``pollinate simulate`` hands to Flower's simulation engine.

The run folder is the unit of state: ``config.toml`` (resolved),
``data/eval.jsonl`` (held-out set), ``metrics.jsonl``, ``checkpoint/``,
``adapter/`` (the final PEFT adapter) and ``status.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from corpora import read_jsonl
from models import (
    adapter_layout,
    adapter_tensors,
    attach_lora,
    load_adapter_tensors,
    load_causal_lm,
)
from protocols import ByteLedger
from server.checkpoints import save_peft_adapter, write_status
from server.config import RunConfig, load_config
from server.evaluation import CentralEvaluator, pick_device, pick_metric
from server.federation import discover_nodes, run_lora_rounds
from strategies import LocalTrainSettings, LoraFedAvg

__all__ = ["EVAL_FILE", "app", "build_server_app", "run_server"]

log = logging.getLogger(__name__)

EVAL_FILE = Path("data") / "eval.jsonl"


def run_server(grid: Grid, config: RunConfig, run_dir: Path) -> None:
    """Run a whole federated LoRA job; record the outcome in ``status.json``.

    Raises
    ------
    Exception
        Whatever stopped the run, after ``status.json`` says ``failed``.
    """
    write_status(run_dir, "running", rounds_planned=config.run.rounds)
    try:
        _run(grid, config, run_dir)
    except BaseException as exc:
        write_status(run_dir, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    write_status(run_dir, "completed", rounds=config.run.rounds)


def _run(grid: Grid, config: RunConfig, run_dir: Path) -> None:
    device = pick_device(config.eval.device)
    spec = config.lora_spec()
    loaded = load_causal_lm(spec.model, dtype=spec.model_dtype, device=device)
    model = attach_lora(loaded.model, spec, init_seed=config.run.seed)
    eval_examples = read_jsonl(run_dir / EVAL_FILE)
    evaluator = CentralEvaluator(
        model,
        loaded.tokenizer,
        eval_examples,
        metric=pick_metric(config.eval.metric, eval_examples),
        max_length=spec.max_length,
        max_new_tokens=config.eval.max_new_tokens,
        batch_size=config.eval.batch_size,
        device=device,
    )
    strategy = LoraFedAvg(
        spec=spec,
        layout=adapter_layout(model),
        train=LocalTrainSettings(
            local_steps=config.train.local_steps,
            batch_size=config.train.batch_size,
            learning_rate=config.train.learning_rate,
            weight_decay=config.train.weight_decay,
        ),
        fraction_train=config.federation.fraction,
        min_train_nodes=config.federation.min_clients,
        seed=config.run.seed,
        device=device,
        max_payload_bytes=int(config.federation.max_payload_mb * 1e6),
    )
    strategy.summary()
    ledger = ByteLedger()
    initial = adapter_tensors(model)
    strategy.set_nodes(
        discover_nodes(
            grid,
            expected=config.federation.clients,
            timeout_s=config.federation.round_timeout_s,
            ledger=ledger,
        )
    )
    final = run_lora_rounds(
        grid,
        strategy,
        evaluator,
        initial,
        rounds=config.run.rounds,
        run_dir=run_dir,
        timeout_s=config.federation.round_timeout_s,
        ledger=ledger,
    )
    load_adapter_tensors(model, final)
    save_peft_adapter(run_dir / "adapter", model)


def build_server_app(config: RunConfig, run_dir: Path) -> ServerApp:
    """A ServerApp bound to ``config`` and ``run_dir`` (for the simulation engine)."""
    bound = ServerApp()

    @bound.main()
    def main(grid: Grid, context: Context) -> None:
        del context
        run_server(grid, config, run_dir)

    return bound


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: the run config names a prepared run folder."""
    run_dir = context.run_config.get("run-dir")
    if not run_dir:
        raise ValueError(
            "run config key 'run-dir' is empty: prepare a run folder with "
            "`pollinate simulate --prepare-only` and pass "
            "--run-config 'run-dir=\"PATH\"'"
        )
    folder = Path(str(run_dir))
    run_server(grid, load_config(folder / "config.toml"), folder)
