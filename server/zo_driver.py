"""The server side of FedKSeed: the seed-rebuilt global model.

The global model is w0 plus, round after round, the aggregated seed deltas,
applied with :func:`protocols.seeds.apply_seed_sum_` on the server's device in
the canonical order; its hash is what every client must reproduce. Replay
time is recorded per round (``replay_seconds``) with the number of distinct
seeds, the quantity that bounds it, next to what bounded the round (the
strategy's ``stats``: clip bound, clients clipped, weights capped, clients the
aggregator kept, and with DP epsilon and delta). :class:`ZoMethod` is the server plug-in of
FedKSeed and FedKSeed-Pro (named in :mod:`protocols.methods`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from corpora import Example
from models import LoadedModel
from models.zo_model import AdapterShape, attach_zo_adapter, load_zo_model, zo_walk
from protocols import ZOSpec, state_hash
from protocols.methods import Method
from protocols.run_folder import CheckpointError, RunFolder
from protocols.seeds import (
    GENERATOR_VERSION,
    ParamWalk,
    apply_seed_sum_,
    candidate_seeds,
)
from server.config import RunConfig
from server.evaluation import CentralEvaluator, EvalResult, build_evaluator
from server.federation import RoundResult, require_update
from server.run_data import resolved_max_length
from strategies import LabelledReply, Nodes
from strategies.fedkseed import FedKSeed, ZoGlobal
from strategies.privacy import DPSettings, fresh_noise_seed
from strategies.robust import Bounds

__all__ = ["ZoDriver", "ZoMethod"]


class ZoDriver:
    """Holds the global model of a FedKSeed run.

    Parameters
    ----------
    model : PreTrainedModel
        w0 in float32 on the server's device (modified in place).
    params : list[tuple[str, torch.Tensor]]
        The perturbed parameters of ``model`` in walk order.
    seeds : list[int]
        The candidate pool.
    strategy : FedKSeed
        Builds instructions and aggregates replies.
    evaluator : CentralEvaluator
        Scores ``model``.
    method : Method
        The registry entry the driver serves.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        params: list[tuple[str, torch.Tensor]],
        seeds: list[int],
        strategy: FedKSeed,
        evaluator: CentralEvaluator,
        method: Method,
    ) -> None:
        self.method = method.name
        self.entry = method
        self.model = model
        self.params = params
        self.seeds = seeds
        self.strategy = strategy
        self.evaluator = evaluator
        self.round = 0
        self.hash = state_hash(params)
        # Compile the generator kernels now, so round 1's replay time is honest.
        apply_seed_sum_(
            [("warm-up", torch.zeros(8, device=params[0][1].device))], [1], [1.0]
        )

    @property
    def spec(self) -> ZOSpec:
        """The run's spec."""
        return self.strategy.spec

    @property
    def current(self) -> ZoGlobal:
        """The global model as the strategy sees it."""
        return ZoGlobal(self.round, self.hash)

    def configure(self, server_round: int, nodes: Nodes) -> list[Message]:
        """Seeds, catch-up history and the target hash for the sampled nodes."""
        return self.strategy.configure(server_round, nodes, self.current)

    def apply(self, server_round: int, replies: Sequence[LabelledReply]) -> RoundResult:
        """Aggregate the scalars and replay the round delta on the global model."""
        result = self.strategy.aggregate(server_round, replies, self.current)
        delta = require_update(server_round, result, result.delta)
        t0 = time.perf_counter()
        seeds = [self.seeds[i] for i in delta.indices.tolist()]
        apply_seed_sum_(self.params, seeds, delta.coefficients.tolist())
        if self.params and self.params[0][1].is_cuda:
            torch.cuda.synchronize()  # time the replay, not its launch
        replay = time.perf_counter() - t0
        self.round = server_round
        self.hash = state_hash(self.params)
        return RoundResult(
            len(result.accepted),
            len(result.rejected),
            result.train_loss,
            extra={
                **result.stats,
                "distinct_seeds": len(seeds),
                "local_steps_total": result.steps,
                "replay_seconds": replay,
                "model_hash": self.hash,
            },
        )

    def evaluate(self) -> EvalResult:
        """Score the global model."""
        return self.evaluator.evaluate()

    def checkpoint(
        self, folder: RunFolder, server_round: int, extra: dict[str, Any]
    ) -> None:
        """Save the seed history and state: the model is rebuilt from them."""
        folder.write_checkpoint(
            server_round,
            self.spec.fingerprint(),
            {"model_hash": self.hash, "strategy": self.strategy.state(), **extra},
        )

    def finish(self, folder: RunFolder) -> None:
        """Write the tuned perturbed parameters as safetensors."""
        folder.write_tensors(
            self.entry.artefact,
            dict(self.params),
            {"round": str(self.round), "hash": self.hash},
        )

    def close(self) -> None:
        """Nothing to release."""

    def restore(self, folder: RunFolder) -> int:
        """Rebuild the global model from the checkpointed seed history.

        The model is w0 plus every recorded round delta, applied in order with
        the same kernel as during the run, so its hash must equal the
        checkpoint's; nodes are assumed to hold nothing (full catch-up next).

        Raises
        ------
        CheckpointError
            If the rebuilt model's hash differs from the checkpoint's, or the
            strategy's state does not fit the run (a privacy account made with
            other settings, or none for a DP run).
        """
        state = folder.read_checkpoint(self.spec.fingerprint())
        try:
            self.strategy.load_state(state["strategy"])
        except ValueError as exc:  # e.g. a DP run resumed from a run without DP
            raise CheckpointError(f"cannot resume: {exc}") from None
        for delta in self.strategy.history:
            seeds = [self.seeds[i] for i in delta.indices.tolist()]
            apply_seed_sum_(self.params, seeds, delta.coefficients.tolist())
        self.round = int(state["round"])
        self.hash = state_hash(self.params)
        if self.hash != state["model_hash"]:
            raise CheckpointError(
                f"seed replay of {len(self.strategy.history)} rounds gives model hash "
                f"{self.hash}, the checkpoint recorded {state['model_hash']}"
            )
        return self.round


def _adapter(config: RunConfig) -> AdapterShape | None:
    """The adapter the run's ``[zo]`` asks for, or None (base parameters)."""
    zo = config.zo
    if zo.adapter_rank == 0:
        return None
    return AdapterShape(
        zo.adapter_rank, zo.adapter_alpha, zo.adapter_targets, zo.adapter_seed
    )


def _walk(config: RunConfig, model: nn.Module) -> ParamWalk:
    """The perturbed parameters (``zo.include`` or the adapter's), in walk order."""
    return zo_walk(model, config.zo.include, _adapter(config))


class ZoMethod:
    """FedKSeed's server plug-in (see :class:`server.methods.ServerMethod`).

    The registry entry's ``sampling`` option tells FedKSeed (``uniform``)
    from FedKSeed-Pro (``pro``).
    """

    def __init__(self, method: Method) -> None:
        self.method = method

    def spec(self, config: RunConfig, model: nn.Module) -> ZOSpec:
        """The FedKSeed spec of a run, for ``model``'s parameter walk."""
        return self._spec(config, _walk(config, model))

    def _spec(self, config: RunConfig, walk: ParamWalk) -> ZOSpec:
        adapter = _adapter(config)
        return ZOSpec(
            model=config.model.name,
            walk_fingerprint=walk.fingerprint(),
            generator=GENERATOR_VERSION,
            include=config.zo.include,
            num_seeds=config.zo.num_seeds,
            master_seed=config.run.seed,
            eps=config.zo.eps,
            learning_rate=config.zo.learning_rate,
            sampling=self.method.option("sampling", "uniform"),
            grad_clip=config.zo.grad_clip,
            max_length=resolved_max_length(config),
            adapter_rank=adapter.rank if adapter else 0,
            adapter_alpha=adapter.alpha if adapter else 16.0,
            adapter_targets=adapter.targets if adapter else (),
            adapter_seed=adapter.seed if adapter else 0,
        )

    def driver(
        self,
        config: RunConfig,
        eval_examples: list[Example],
        device: torch.device,
        *,
        run_dir: Path | None = None,
    ) -> ZoDriver:
        """Load w0 in float32 on ``device``, wire FedKSeed(-Pro).

        The strategy gets the run's bounds (``[federation]`` with
        ``zo.max_abs_grad`` as the fixed cap on ``|g|``) and privacy settings;
        a central DP run without ``privacy.noise_seed`` draws a secret one here
        (kept in the checkpoint).
        """
        del run_dir  # FedKSeed starts no service
        loaded = load_zo_model(
            config.model.name,
            include=config.zo.include,
            adapter=_adapter(config),
            device=device,
        )
        walk = loaded.walk
        spec = self._spec(config, walk)
        privacy = DPSettings.from_config(config)
        noise_seed = config.privacy.noise_seed
        if privacy is not None and privacy.mode == "central" and noise_seed is None:
            noise_seed = fresh_noise_seed()
        strategy = FedKSeed(
            spec=spec,
            local_steps=config.train.local_steps,
            batch_size=config.train.batch_size,
            seed=config.run.seed,
            bounds=Bounds.from_config(
                config.federation, fixed_bound=config.zo.max_abs_grad
            ),
            privacy=privacy,
            noise_seed=noise_seed,
        )
        return ZoDriver(
            loaded.model,
            walk.params(loaded.model),
            candidate_seeds(spec.master_seed, spec.num_seeds),
            strategy,
            build_evaluator(
                config, loaded.model, loaded.tokenizer, eval_examples, device
            ),
            self.method,
        )

    def tuned_model(
        self, config: RunConfig, artefact: Path, loaded: LoadedModel
    ) -> nn.Module:
        """The base model with the tuned parameters written over it.

        In adapter mode the tuned adapter is merged into the base weights
        (PEFT ``merge_and_unload``), as a LoRA run's is.
        """
        adapter = _adapter(config)
        model: nn.Module = loaded.model
        if adapter is not None:
            model = attach_zo_adapter(loaded.model, adapter)
        _load_tuned(model, artefact)
        if adapter is not None:
            merged: nn.Module = model.merge_and_unload()  # type: ignore[operator]
            return merged
        return model

    def write_adapter(self, config: RunConfig, artefact: Path, out: Path) -> bool:
        """Write the tuned adapter of an adapter-mode run as a PEFT folder.

        ``out`` is then what a LoRA run's ``adapter`` export is
        (``PeftModel.from_pretrained(base, out)`` loads it). Returns False,
        writing nothing, for a run that perturbs the base parameters.
        """
        adapter = _adapter(config)
        if adapter is None:
            return False
        zo = load_zo_model(config.model.name, adapter=adapter)
        _load_tuned(zo.model, artefact)
        zo.model.save_pretrained(out)
        return True


def _load_tuned(model: nn.Module, artefact: Path) -> None:
    """Copy the run's tuned perturbed tensors into ``model`` (by walk name)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(artefact).items():
            params[name].copy_(value)
