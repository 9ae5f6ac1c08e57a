"""SFPrompt's device-side round: local-loss warm-up, EL2N pruning, split steps.

Pure torch over the device's model parts and a *trunk session*: anything
with ``forward(hidden, mask, *, train) -> Tensor`` and ``backward(grad) ->
Tensor`` (the gRPC client in :mod:`client.trunk_client`, or
:class:`LocalTrunkSession` for tests). One round:

1. **Local loss**: ``local_loss_steps`` AdamW steps on ``tail(head(x))``,
   skipping the server's body, updating prompts and tail with no traffic.
2. **Pruning**: score every local example by EL2N on the same local path,
   keep the hardest fraction gamma.
3. **Split training**: ``local_steps`` steps on the kept examples: the head's
   activations go to the server, the body output comes back, the tail
   computes the loss, the gradient at the body output goes up and the
   gradient at the cut comes back to reach the prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from client.batches import derive_seed, index_batches
from client.pruning import el2n_scores, keep_hardest
from models import IGNORE_INDEX, TokenizedExample, TrainBatch, collate_train
from models.split import DeviceHead, DeviceTail, Trunk

__all__ = [
    "LocalTrunkSession",
    "SplitRoundStats",
    "SplitSettings",
    "TrunkSessionLike",
    "split_round",
]


class TrunkSessionLike(Protocol):
    """The server body as seen from the device."""

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, *, train: bool
    ) -> torch.Tensor:
        """Body output for activations at the cut."""
        ...

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        """Gradient at the cut for the gradient at the body output."""
        ...


class LocalTrunkSession:
    """An in-process trunk session (tests, and a reference for the gRPC one)."""

    def __init__(
        self, trunk: Trunk, returns_all_positions: bool, num_prompts: int
    ) -> None:
        self.trunk = trunk
        self.all = returns_all_positions
        self.p = num_prompts
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, *, train: bool
    ) -> torch.Tensor:
        """Run the body; keep the graph when training."""
        if not train:
            with torch.no_grad():
                return self.trunk(hidden, attention_mask)
        h_in = hidden.detach().requires_grad_()
        h_out = self.trunk(h_in, attention_mask)
        self._pending = (h_in, h_out)
        return h_out.detach()

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        """Back-propagate through the body; return the cut's gradient."""
        if self._pending is None:
            raise RuntimeError("backward without a training forward")
        h_in, h_out = self._pending
        self._pending = None
        torch.autograd.backward(h_out, grad)
        assert h_in.grad is not None  # set by the backward just above
        return h_in.grad if self.all else h_in.grad[:, : self.p]


@dataclass(frozen=True, slots=True)
class SplitSettings:
    """One round's device-side settings (sent by the server)."""

    local_steps: int
    local_loss_steps: int
    batch_size: int
    learning_rate: float
    gamma: float
    seed: int
    server_round: int


@dataclass(frozen=True, slots=True)
class SplitRoundStats:
    """What the device reports after a round."""

    local_loss: float
    split_loss: float
    kept: int
    examples: int


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over target tokens; logits (B, T, V)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
    )


def _local_logits(
    head: DeviceHead, tail: DeviceTail, batch: TrainBatch
) -> torch.Tensor:
    hidden, _ = head(batch.input_ids, batch.attention_mask)
    return tail(hidden[:, head.spec.num_prompts :])  # no LM head on prompt positions


def _mean(values: list[torch.Tensor]) -> float:
    return float(torch.stack(values).mean()) if values else 0.0  # 0: phase skipped


def split_round(
    head: DeviceHead,
    tail: DeviceTail,
    session: TrunkSessionLike,
    examples: Sequence[TokenizedExample],
    settings: SplitSettings,
    *,
    pad_id: int,
    label: str,
) -> SplitRoundStats:
    """Run one SFPrompt round on the device; prompts and tail are updated in place.

    Raises
    ------
    ValueError
        If there are no examples.
    """
    if not examples:
        raise ValueError("the node has no training examples")
    device = head.prompts.device
    params = [p for p in (*head.parameters(), *tail.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    gen = torch.Generator().manual_seed(
        derive_seed(settings.seed, settings.server_round, label, "split")
    )
    local_losses: list[torch.Tensor] = []
    batches = index_batches(len(examples), settings.batch_size, gen)
    for _ in range(settings.local_loss_steps):
        batch = collate_train([examples[i] for i in next(batches)], pad_id).to(device)
        loss = _lm_loss(_local_logits(head, tail, batch), batch.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        local_losses.append(loss.detach())
    kept = _prune(head, tail, examples, settings, pad_id)
    split_losses: list[torch.Tensor] = []
    batches = index_batches(len(kept), settings.batch_size, gen)
    p = head.spec.num_prompts
    for _ in range(settings.local_steps):
        batch = collate_train([kept[i] for i in next(batches)], pad_id).to(device)
        hidden, mask = head(batch.input_ids, batch.attention_mask)  # (B, P+T, D)
        body_out = session.forward(hidden.detach(), mask, train=True).to(device)
        body_out.requires_grad_()
        loss = _lm_loss(tail(body_out[:, p:]), batch.labels)
        loss.backward()  # tail grads, and body_out.grad
        assert body_out.grad is not None
        cut_grad = session.backward(body_out.grad).to(device)
        target = hidden if cut_grad.shape[1] == hidden.shape[1] else hidden[:, :p]
        target.backward(cut_grad)  # into the prompts (and through device blocks)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        split_losses.append(loss.detach())
    return SplitRoundStats(
        local_loss=_mean(local_losses),
        split_loss=_mean(split_losses),
        kept=len(kept),
        examples=len(examples),
    )


@torch.no_grad()
def _prune(
    head: DeviceHead,
    tail: DeviceTail,
    examples: Sequence[TokenizedExample],
    settings: SplitSettings,
    pad_id: int,
) -> list[TokenizedExample]:
    """Keep the hardest fraction gamma of the examples by EL2N (local path)."""
    device = head.prompts.device
    scores = []
    step = settings.batch_size  # scoring memory ~ one training batch's logits
    for start in range(0, len(examples), step):
        batch = collate_train(list(examples[start : start + step]), pad_id).to(device)
        scores.append(el2n_scores(_local_logits(head, tail, batch), batch.labels))
    keep = keep_hardest(torch.cat(scores).cpu(), settings.gamma)
    return [examples[i] for i in keep]
