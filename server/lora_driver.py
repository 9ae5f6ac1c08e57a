"""The server side of federated LoRA: global adapter, FedAvg, evaluation.

:class:`LoraMethod` is the method's server plug-in (named in
:mod:`protocols.methods`): it builds the spec, the driver and the model that
export writes. :class:`LoraDriver` holds the global adapter during a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from corpora import Example
from models import (
    LoadedModel,
    adapter_layout,
    adapter_tensors,
    attach_lora,
    load_adapter_tensors,
    load_causal_lm,
)
from models.lora import merge_adapter_folder
from protocols import LoraSpec, ProtocolError
from protocols.methods import Method
from protocols.run_folder import CheckpointError, RunFolder
from server.checkpoints import restore_tensors, save_peft_adapter
from server.config import RunConfig
from server.evaluation import CentralEvaluator, EvalResult, build_evaluator
from server.federation import RoundResult, require_update
from strategies import LabelledReply, LocalTrainSettings, LoraFedAvg, Nodes
from strategies.privacy import DPSettings
from strategies.robust import Bounds

__all__ = ["LoraDriver", "LoraMethod"]


class LoraDriver:
    """Holds the global adapter; one :class:`LoraFedAvg` round at a time.

    Parameters
    ----------
    model : PeftModel
        The server's model with adapters attached (its adapter is the
        initial global adapter).
    strategy : LoraFedAvg
        Builds instructions and aggregates replies.
    evaluator : CentralEvaluator
        Scores the global adapter.
    method : Method
        The registry entry the driver serves.
    """

    def __init__(
        self,
        model: PeftModel,
        strategy: LoraFedAvg,
        evaluator: CentralEvaluator,
        method: Method,
    ) -> None:
        self.method = method.name
        self.entry = method
        self.model = model
        self.strategy = strategy
        self.evaluator = evaluator
        self.adapter = {
            k: v.to(strategy.fedavg.device) for k, v in adapter_tensors(model).items()
        }

    def configure(self, server_round: int, nodes: Nodes) -> list[Any]:
        """Send the global adapter to the sampled nodes.

        Raises
        ------
        strategies.privacy.PrivacyBudgetExhausted
            If the round would spend past ``privacy.target_epsilon``.
        """
        return self.strategy.configure(server_round, nodes, self.adapter)

    def apply(self, server_round: int, replies: Sequence[LabelledReply]) -> RoundResult:
        """Bounded FedAvg of the valid adapters becomes the global adapter.

        The round's bounds (and epsilon, with DP) go into its metrics row.

        Raises
        ------
        server.federation.FederationError
            If no reply was usable or the aggregate was refused (the adapter
            is kept).
        """
        result = self.strategy.aggregate(server_round, replies, self.adapter)
        self.adapter = require_update(server_round, result, result.adapter)
        return RoundResult(
            len(result.accepted),
            len(result.rejected),
            result.train_loss,
            extra=dict(result.stats),
        )

    def evaluate(self) -> EvalResult:
        """Score the global adapter."""
        return self.evaluator.evaluate(self.adapter)

    def checkpoint(
        self, folder: RunFolder, server_round: int, extra: dict[str, Any]
    ) -> None:
        """Save the global adapter and state atomically.

        With DP the state holds the noise seed and the accountant.
        """
        privacy = self.strategy.privacy_state()
        state = {**extra, "privacy": privacy} if privacy is not None else extra
        folder.write_checkpoint(
            server_round, self.strategy.spec.fingerprint(), state, self.adapter
        )

    def finish(self, folder: RunFolder) -> None:
        """Write the final adapter as a PEFT folder."""
        with torch.no_grad():
            load_adapter_tensors(self.model, self.adapter)
        save_peft_adapter(folder.artefact(self.entry.artefact), self.model)

    def close(self) -> None:
        """Nothing to release."""

    def restore(self, folder: RunFolder) -> int:
        """Load the last checkpointed global adapter; return its round.

        With DP, the noise seed and the accountant are restored too.

        Raises
        ------
        CheckpointError
            If the checkpoint is missing, damaged, of another spec, or lacks
            the privacy state this run's DP settings need.
        """
        done, adapter, state = restore_tensors(
            folder,
            self.strategy.spec.fingerprint(),
            self.strategy.fedavg,
        )
        try:
            self.strategy.load_privacy_state(state.get("privacy"))
        except ValueError as exc:
            raise CheckpointError(f"{folder.checkpoint_state}: {exc}") from None
        self.adapter = adapter
        return done


def _check_targets(spec: LoraSpec, model: nn.Module) -> None:
    """Refuse target modules the model does not have (PEFT would, later)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in spec.target_modules if t not in names]
    if missing:
        raise ProtocolError(
            f"lora.target_modules {missing} name no module of model {spec.model!r}"
        )


class LoraMethod:
    """LoRA's server plug-in (see :class:`server.methods.ServerMethod`)."""

    def __init__(self, method: Method) -> None:
        self.method = method

    def spec(self, config: RunConfig, model: nn.Module) -> LoraSpec:
        """The spec every LoRA client must honour, checked against ``model``."""
        spec = LoraSpec(
            model=config.model.name,
            model_dtype=config.model.dtype,
            rank=config.lora.rank,
            alpha=config.lora.alpha,
            dropout=config.lora.dropout,
            target_modules=config.lora.target_modules,
            max_length=config.model.max_length,
        )
        _check_targets(spec, model)
        return spec

    def driver(
        self,
        config: RunConfig,
        eval_examples: list[Example],
        device: torch.device,
        *,
        run_dir: Path | None = None,
    ) -> LoraDriver:
        """Load the model, attach the initial adapter, wire FedAvg."""
        del run_dir  # LoRA starts no service
        loaded = load_causal_lm(
            config.model.name, dtype=config.model.dtype, device=device
        )
        spec = self.spec(config, loaded.model)
        model = attach_lora(loaded.model, spec, init_seed=config.run.seed)
        strategy = LoraFedAvg(
            bounds=Bounds.from_config(
                config.federation, fixed_bound=config.federation.clip_norm
            ),
            dp=DPSettings.from_config(config),
            noise_seed=config.privacy.noise_seed,
            spec=spec,
            layout=adapter_layout(model),
            train=LocalTrainSettings(
                local_steps=config.train.local_steps,
                batch_size=config.train.batch_size,
                learning_rate=config.train.learning_rate,
                weight_decay=config.train.weight_decay,
            ),
            seed=config.run.seed,
            device=device,
            max_payload_bytes=int(config.federation.max_payload_mb * 1e6),
        )
        evaluator = build_evaluator(
            config, model, loaded.tokenizer, eval_examples, device
        )
        return LoraDriver(model, strategy, evaluator, self.method)

    def tuned_model(
        self, config: RunConfig, artefact: Path, loaded: LoadedModel
    ) -> nn.Module:
        """The base model with the trained adapter merged in."""
        del config
        return merge_adapter_folder(loaded.model, artefact)
