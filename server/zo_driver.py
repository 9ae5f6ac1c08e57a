"""The server side of FedKSeed: the seed-rebuilt global model.

The global model is w0 plus, round after round, the aggregated seed deltas,
applied with :func:`protocols.seeds.apply_seed_sum_` on the server's device in
the canonical order; its hash is what every client must reproduce. Replay
time is recorded per round (``replay_seconds``) with the number of distinct
seeds, the quantity that bounds it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message
from flwr.serverapp import Grid
from transformers import PreTrainedModel

from protocols import ZOSpec, state_hash
from protocols.seeds import apply_seed_sum_
from server.checkpoints import (
    CheckpointError,
    atomic_write_bytes,
    read_checkpoint,
    write_tensors,
)
from server.evaluation import CentralEvaluator, EvalResult
from server.federation import FederationError, RoundResult
from strategies import FedKSeed

__all__ = ["ZoDriver"]


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
    """

    def __init__(
        self,
        model: PreTrainedModel,
        params: list[tuple[str, torch.Tensor]],
        seeds: list[int],
        strategy: FedKSeed,
        evaluator: CentralEvaluator,
    ) -> None:
        self.method = "fedkseed-pro" if strategy.spec.sampling == "pro" else "fedkseed"
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

    def set_nodes(self, node_labels: dict[int, str]) -> None:
        """Pass the federation's labels to the strategy."""
        self.strategy.set_nodes(node_labels)

    def label(self, node_id: int) -> str:
        """A node's stable label."""
        return self.strategy.label(node_id)

    def configure(self, server_round: int, grid: Grid) -> list[Message]:
        """Seeds, catch-up history and the target hash for the sampled nodes."""
        return self.strategy.configure(
            server_round, grid, global_round=self.round, global_hash=self.hash
        )

    def apply(self, server_round: int, replies: Iterable[Message]) -> RoundResult:
        """Aggregate the scalars and replay the round delta on the global model."""
        replies = list(replies)
        result = self.strategy.aggregate(
            server_round, replies, global_round=self.round, global_hash=self.hash
        )
        if result.delta is None:
            raise FederationError(
                f"round {server_round}: no usable update ({len(replies)} replies; "
                f"rejected: {result.rejected})"
            )
        t0 = time.perf_counter()
        seeds = [self.seeds[i] for i in result.delta.indices.tolist()]
        apply_seed_sum_(self.params, seeds, result.delta.coefficients.tolist())
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
        self, run_dir: Path, server_round: int, extra: dict[str, Any]
    ) -> None:
        """Save the seed history and state: the model is rebuilt from them."""
        state = {
            "round": server_round,
            "model_hash": self.hash,
            "spec_fingerprint": self.spec.fingerprint(),
            "strategy": self.strategy.state(),
            **extra,
        }
        atomic_write_bytes(
            run_dir / "checkpoint" / "state.json", json.dumps(state).encode()
        )

    def finish(self, run_dir: Path) -> None:
        """Write the tuned perturbed parameters as safetensors."""
        write_tensors(
            run_dir / "model" / "perturbed.safetensors",
            dict(self.params),
            {"round": str(self.round), "hash": self.hash},
        )

    def close(self) -> None:
        """Nothing to release."""

    def restore(self, run_dir: Path) -> int:
        """Rebuild the global model from the checkpointed seed history.

        The model is w0 plus every recorded round delta, applied in order with
        the same kernel as during the run, so its hash must equal the
        checkpoint's; nodes are assumed to hold nothing (full catch-up next).

        Raises
        ------
        CheckpointError
            If the rebuilt model's hash differs from the checkpoint's.
        """
        state = read_checkpoint(run_dir, self.spec.fingerprint())
        self.strategy.load_state(state["strategy"])
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
