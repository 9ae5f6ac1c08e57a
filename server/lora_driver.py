"""The server side of federated LoRA: global adapter, FedAvg, evaluation."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message
from flwr.serverapp import Grid
from peft import PeftModel

from models import adapter_tensors, load_adapter_tensors
from protocols import TensorLayout
from server.checkpoints import (
    read_checkpoint,
    read_checkpoint_tensors,
    save_checkpoint,
    save_peft_adapter,
)
from server.evaluation import CentralEvaluator, EvalResult
from server.federation import FederationError, RoundResult
from strategies import LoraFedAvg

__all__ = ["LoraDriver"]


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
    """

    method = "lora"

    def __init__(
        self, model: PeftModel, strategy: LoraFedAvg, evaluator: CentralEvaluator
    ) -> None:
        self.model = model
        self.strategy = strategy
        self.evaluator = evaluator
        self.adapter = {
            k: v.to(strategy.device) for k, v in adapter_tensors(model).items()
        }

    def set_nodes(self, node_labels: dict[int, str]) -> None:
        """Pass the federation's labels to the strategy."""
        self.strategy.set_nodes(node_labels)

    def label(self, node_id: int) -> str:
        """A node's stable label."""
        return self.strategy.label(node_id)

    def configure(self, server_round: int, grid: Grid) -> list[Message]:
        """Send the global adapter to the sampled nodes."""
        return self.strategy.configure(server_round, self.adapter, grid)

    def apply(self, server_round: int, replies: Iterable[Message]) -> RoundResult:
        """FedAvg of the valid adapters becomes the global adapter."""
        replies = list(replies)
        result = self.strategy.aggregate(server_round, replies)
        if result.adapter is None:
            raise FederationError(
                f"round {server_round}: no usable update ({len(replies)} replies; "
                f"rejected: {result.rejected})"
            )
        self.adapter = result.adapter
        return RoundResult(
            len(result.accepted), len(result.rejected), result.train_loss
        )

    def evaluate(self) -> EvalResult:
        """Score the global adapter."""
        return self.evaluator.evaluate(self.adapter)

    def checkpoint(
        self, run_dir: Path, server_round: int, extra: dict[str, Any]
    ) -> None:
        """Save the global adapter and state atomically."""
        save_checkpoint(run_dir, server_round, self.adapter, self.strategy.spec, extra)

    def finish(self, run_dir: Path) -> None:
        """Write the final adapter as a PEFT folder."""
        with torch.no_grad():
            load_adapter_tensors(self.model, self.adapter)
        save_peft_adapter(run_dir / "adapter", self.model)

    def close(self) -> None:
        """Nothing to release."""

    def restore(self, run_dir: Path) -> int:
        """Load the last checkpointed global adapter; return its round."""
        state = read_checkpoint(run_dir, self.strategy.spec.fingerprint())
        tensors = read_checkpoint_tensors(run_dir, state)
        self.strategy.layout.check(TensorLayout.of(tensors))
        self.adapter = {k: v.to(self.strategy.device) for k, v in tensors.items()}
        return int(state["round"])
