"""The server side of SFPrompt: the trunk service and the global prompts/tail.

At the start of a run the driver cuts the model, starts the trunk service
(the frozen body, on the server's device) where the run's config says, and
holds the global soft prompts and tail. Each round the devices train against
the service; their prompts and tails are averaged; the server evaluates the
whole split model locally. Activation traffic measured by the service is
reported per client for the byte ledger. The service stops with the run.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
from flwr.app import Message
from flwr.serverapp import Grid

from models.split import DeviceHead, DeviceTail, load_trainable_state, trainable_state
from protocols import TensorLayout
from server.checkpoints import (
    read_checkpoint,
    read_checkpoint_tensors,
    save_checkpoint_tensors,
    write_tensors,
)
from server.evaluation import CentralEvaluator, EvalResult
from server.federation import FederationError, RoundResult
from server.trunk_service import TrunkService
from strategies import SFPromptFedAvg

__all__ = ["SplitDriver"]


class SplitDriver:
    """Holds SFPrompt's global state and the running trunk service.

    Parameters
    ----------
    head, tail : DeviceHead, DeviceTail
        The server's copies of the device parts (their prompts and tail are
        the global tensors, evaluated with the trunk).
    strategy : SFPromptFedAvg
        Builds instructions and aggregates replies.
    evaluator : CentralEvaluator
        Scores the whole split model.
    service : TrunkService
        The body's servicer (for traffic accounting).
    server : grpc.Server
        The running gRPC server, stopped by :meth:`close`.
    """

    method = "sfprompt"

    def __init__(
        self,
        head: DeviceHead,
        tail: DeviceTail,
        strategy: SFPromptFedAvg,
        evaluator: CentralEvaluator,
        service: TrunkService,
        server: grpc.Server,
    ) -> None:
        self.head = head
        self.tail = tail
        self.strategy = strategy
        self.evaluator = evaluator
        self.service = service
        self.server = server
        self.tensors = {
            k: v.detach().clone().to(strategy.device)
            for k, v in trainable_state(head, tail).items()
        }

    def set_nodes(self, node_labels: dict[int, str]) -> None:
        """Pass the federation's labels to the strategy."""
        self.strategy.set_nodes(node_labels)

    def label(self, node_id: int) -> str:
        """A node's stable label."""
        return self.strategy.label(node_id)

    def configure(self, server_round: int, grid: Grid) -> list[Message]:
        """Send the global prompts and tail, and the trunk's address."""
        self.service.reset_usage()
        return self.strategy.configure(server_round, self.tensors, grid)

    def apply(self, server_round: int, replies: Iterable[Message]) -> RoundResult:
        """Average the devices' prompts and tails into the global ones."""
        replies = list(replies)
        result = self.strategy.aggregate(server_round, replies)
        self.service.end_round(server_round)  # late or vanished devices' graphs
        usage = self.service.reset_usage()
        if result.tensors is None:
            raise FederationError(
                f"round {server_round}: no usable update ({len(replies)} replies; "
                f"rejected: {result.rejected})"
            )
        self.tensors = result.tensors
        return RoundResult(
            len(result.accepted),
            len(result.rejected),
            result.train_loss,
            extra={"local_loss": result.local_loss, "kept_examples": result.kept},
            side_bytes={c: (u["up"], u["down"]) for c, u in usage.items()},
        )

    def evaluate(self) -> EvalResult:
        """Score head -> trunk -> tail with the global prompts and tail."""
        load_trainable_state(self.head, self.tail, self.tensors)
        return self.evaluator.evaluate()

    def checkpoint(
        self, run_dir: Path, server_round: int, extra: dict[str, Any]
    ) -> None:
        """Save the global prompts and tail and the round state atomically."""
        save_checkpoint_tensors(
            run_dir,
            server_round,
            self.tensors,
            self.strategy.spec.fingerprint(),
            extra,
            filename="prompts_and_tail.safetensors",
        )

    def finish(self, run_dir: Path) -> None:
        """Write the trained prompts and tail as safetensors."""
        write_tensors(
            run_dir / "model" / "prompts_and_tail.safetensors",
            self.tensors,
            {"spec": self.strategy.spec.fingerprint()},
        )

    def close(self) -> None:
        """Stop the trunk service (idempotent)."""
        self.server.stop(grace=1.0).wait()

    def restore(self, run_dir: Path) -> int:
        """Load the last checkpointed prompts and tail; return their round."""
        state = read_checkpoint(run_dir, self.strategy.spec.fingerprint())
        tensors = read_checkpoint_tensors(run_dir, state)
        self.strategy.layout.check(TensorLayout.of(tensors))
        self.tensors = {k: v.to(self.strategy.device) for k, v in tensors.items()}
        return int(state["round"])
