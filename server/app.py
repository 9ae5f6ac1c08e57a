"""The Pollinate ServerApp: builds the run from its config and drives it.

``server.app:app`` is the ServerApp Flower loads with ``flwr run``; it reads
the prepared run folder named by the run-config key ``run-dir``.
:func:`build_server_app` makes the same app bound to a config object, which is
what ``pollinate simulate`` hands to Flower's simulation engine.

The run folder is the unit of state: ``config.toml`` (resolved),
``data/eval.jsonl`` (held-out set), ``metrics.jsonl``, ``checkpoint/``, the
final ``adapter/`` (LoRA) or ``model/`` (FedKSeed), and ``status.json``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from corpora import Example, read_jsonl
from models import LoadedModel, adapter_layout, attach_lora, load_causal_lm
from models.split import PromptedLM, build_split, split_spec_for, trainable_state
from protocols import ByteLedger, TensorLayout, ZOSpec
from protocols.seeds import GENERATOR_VERSION, ParamWalk, candidate_seeds
from server.checkpoints import write_status
from server.config import RunConfig, load_config
from server.evaluation import CentralEvaluator, pick_device, pick_metric
from server.federation import RoundDriver, discover_nodes, run_rounds
from server.lora_driver import LoraDriver
from server.split_driver import SplitDriver
from server.trunk_service import TrunkService, start_trunk_server
from server.zo_driver import ZoDriver
from strategies import (
    FedKSeed,
    LocalTrainSettings,
    LoraFedAvg,
    SFPromptFedAvg,
    SplitRoundSettings,
)

__all__ = ["EVAL_FILE", "app", "build_driver", "build_server_app", "run_server"]

log = logging.getLogger(__name__)

EVAL_FILE = Path("data") / "eval.jsonl"


FAULT_ENV = "POLLINATE_FAULT_AFTER_ROUND"


def run_server(
    grid: Grid, config: RunConfig, run_dir: Path, *, resume: bool = False
) -> None:
    """Run a whole federated job; record the outcome in ``status.json``.

    With ``resume`` the run continues from the last checkpoint in ``run_dir``
    (rounds already recorded are not redone). ``$POLLINATE_FAULT_AFTER_ROUND``
    (tests only) kills the server right after that round is recorded.

    Raises
    ------
    Exception
        Whatever stopped the run, after ``status.json`` says ``failed``.
    """
    write_status(run_dir, "running", rounds_planned=config.run.rounds)
    driver: RoundDriver | None = None
    fault = os.environ.get(FAULT_ENV)
    try:
        driver = build_driver(config, read_jsonl(run_dir / EVAL_FILE))
        start, ledger = 0, ByteLedger()
        if resume:
            start = driver.restore(run_dir)
            state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
            ledger = ByteLedger.from_json(state["ledger"])
            log.info("resuming %s after round %d", run_dir, start)
        # On resume the hello goes to a scratch ledger: round 0 is already counted.
        hello_ledger = ByteLedger() if resume else ledger
        driver.set_nodes(
            discover_nodes(
                grid,
                expected=config.federation.clients,
                timeout_s=config.federation.round_timeout_s,
                ledger=hello_ledger,
            )
        )
        run_rounds(
            grid,
            driver,
            rounds=config.run.rounds,
            run_dir=run_dir,
            timeout_s=config.federation.round_timeout_s,
            ledger=ledger,
            start_round=start,
            crash_after=int(fault) if fault else None,
            min_replies=config.federation.min_replies,
        )
    except (KeyboardInterrupt, SystemExit) as exc:
        # Told to stop (``server stop``, Ctrl-C, the SuperLink going away):
        # the checkpoint holds every finished round; ``resume`` continues.
        write_status(run_dir, "stopped", reason=f"{type(exc).__name__}: {exc}")
        raise
    except BaseException as exc:
        write_status(run_dir, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if driver is not None:
            driver.close()
    write_status(run_dir, "completed", rounds=config.run.rounds)


def _evaluator(
    config: RunConfig,
    loaded: LoadedModel,
    model: torch.nn.Module,
    examples: list[Example],
    device: torch.device,
) -> CentralEvaluator:
    return CentralEvaluator(
        model,  # type: ignore[arg-type]
        loaded.tokenizer,
        examples,
        metric=pick_metric(config.eval.metric, examples),
        max_length=config.model.max_length,
        max_new_tokens=config.eval.max_new_tokens,
        batch_size=config.eval.batch_size,
        device=device,
    )


def zo_spec(config: RunConfig, walk: ParamWalk) -> ZOSpec:
    """The FedKSeed spec of a run, for a model whose walk is ``walk``."""
    return ZOSpec(
        model=config.model.name,
        walk_fingerprint=walk.fingerprint(),
        generator=GENERATOR_VERSION,
        include=config.zo.include,
        num_seeds=config.zo.num_seeds,
        master_seed=config.run.seed,
        eps=config.zo.eps,
        learning_rate=config.zo.learning_rate,
        sampling="pro" if config.run.method == "fedkseed-pro" else "uniform",
        grad_clip=config.zo.grad_clip,
        max_length=config.model.max_length,
    )


def _split_driver(
    config: RunConfig, eval_examples: list[Example], device: torch.device
) -> SplitDriver:
    """Cut the model, start the trunk service, wire SFPrompt's strategy."""
    loaded = load_causal_lm(config.model.name, dtype="float32", device=device)
    split = config.split
    spec = split_spec_for(
        loaded.model,
        config.model.name,
        num_prompts=split.num_prompts,
        client_blocks=split.client_blocks,
        max_length=config.model.max_length,
        tail=split.tail,
    )
    head, trunk, tail = build_split(loaded.model, spec, init_seed=config.run.seed)
    service = TrunkService(
        trunk, spec, max_message_bytes=int(split.max_message_mb * 1e6)
    )
    tls, root = None, b""
    if split.tls_certfile and split.tls_keyfile and split.tls_ca_certfile:
        tls = (split.tls_certfile.read_bytes(), split.tls_keyfile.read_bytes())
        root = split.tls_ca_certfile.read_bytes()
    server, port = start_trunk_server(service, split.host, split.port, tls=tls)
    strategy = SFPromptFedAvg(
        spec=spec,
        layout=TensorLayout.of(trainable_state(head, tail)),
        settings=SplitRoundSettings(
            local_steps=config.train.local_steps,
            local_loss_steps=split.local_loss_steps,
            batch_size=config.train.batch_size,
            learning_rate=config.train.learning_rate,
            gamma=split.gamma,
        ),
        trunk_address=f"{split.host}:{port}",
        trunk_root_certificate=root,
        max_payload_bytes=int(config.federation.max_payload_mb * 1e6),
        fraction_train=config.federation.fraction,
        min_train_nodes=config.federation.min_clients,
        seed=config.run.seed,
        device=device,
    )
    log.info(
        "SFPrompt trunk service on %s:%d (%s)",
        split.host,
        port,
        "TLS" if tls else "plaintext",
    )
    model = PromptedLM(head, trunk, tail)
    evaluator = _evaluator(config, loaded, model, eval_examples, device)
    return SplitDriver(head, tail, strategy, evaluator, service, server)


def build_driver(config: RunConfig, eval_examples: list[Example]) -> RoundDriver:
    """The method's server side, with its model on the server's device."""
    device = pick_device(config.eval.device)
    if config.run.method == "sfprompt":
        return _split_driver(config, eval_examples, device)
    if config.run.method == "lora":
        spec = config.lora_spec()
        loaded = load_causal_lm(spec.model, dtype=spec.model_dtype, device=device)
        model = attach_lora(loaded.model, spec, init_seed=config.run.seed)
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
        return LoraDriver(
            model, strategy, _evaluator(config, loaded, model, eval_examples, device)
        )
    loaded = load_causal_lm(config.model.name, dtype="float32", device=device)
    walk = ParamWalk.from_model(loaded.model, config.zo.include or None)
    spec = zo_spec(config, walk)
    zo = FedKSeed(
        spec=spec,
        local_steps=config.train.local_steps,
        batch_size=config.train.batch_size,
        fraction_train=config.federation.fraction,
        min_train_nodes=config.federation.min_clients,
        seed=config.run.seed,
    )
    zo.summary()
    return ZoDriver(
        loaded.model,
        walk.params(loaded.model),
        candidate_seeds(spec.master_seed, spec.num_seeds),
        zo,
        _evaluator(config, loaded, loaded.model, eval_examples, device),
    )


def build_server_app(
    config: RunConfig, run_dir: Path, *, resume: bool = False
) -> ServerApp:
    """A ServerApp bound to ``config`` and ``run_dir`` (for the simulation engine)."""
    bound = ServerApp()

    @bound.main()
    def main(grid: Grid, context: Context) -> None:
        del context
        run_server(grid, config, run_dir, resume=resume)

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
    resume = bool(context.run_config.get("resume", False))
    run_server(grid, load_config(folder / "config.toml"), folder, resume=resume)
