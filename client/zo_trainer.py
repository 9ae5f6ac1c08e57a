"""Local zeroth-order (MeZO) steps over a seed pool, in place.

One step on a batch, for a pool seed ``s`` (z = z(s), regenerated, never stored):

    w += eps z;  L+ = loss     (1st pass over the parameters)
    w -= 2 eps z; L- = loss    (2nd pass)
    g = (L+ - L-) / (2 eps)
    w += (eps - lr g) z        (3rd pass: restore and update fused)

Three generated perturbations per step instead of MeZO's four; no gradients,
no optimiser state and no copy of the weights, so memory stays close to
inference. A step whose losses are not finite is undone and skipped (nothing
recorded), as in the reference code. Forward passes run in ``inference_mode``
with the model in eval mode (dropout off).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from client.batches import derive_seed, index_batches
from models import TokenizedExample, TrainBatch, answer_loss, collate_train
from protocols.messages import RoundSchedule
from protocols.seeds import perturb_

__all__ = ["ZoStats", "zo_local_steps"]


@dataclass(frozen=True, slots=True)
class ZoStats:
    """What a node reports: per-step (seed index, scalar) pairs and its loss."""

    indices: torch.Tensor  # (T,) int32
    scalars: torch.Tensor  # (T,) float32
    mean_loss: float
    skipped: int


def _loss(model: PreTrainedModel, batch: TrainBatch) -> float:
    with torch.inference_mode():
        loss = answer_loss(model, batch)  # logits at the answer positions only
    # Host sync: the scalar gradient scales the next in-place update.
    return float(loss)


def zo_local_steps(
    model: PreTrainedModel,
    params: Sequence[tuple[str, torch.Tensor]],
    examples: Sequence[TokenizedExample],
    config: RoundSchedule,
    *,
    seeds: Sequence[int],
    eps: float,
    learning_rate: float,
    probabilities: torch.Tensor | None,
    pad_id: int,
    label: str,
    device: torch.device,
) -> ZoStats:
    """Run ``config.local_steps`` MeZO steps; the model ends locally trained.

    Parameters
    ----------
    model : PreTrainedModel
        The synced global model (modified in place).
    params : Sequence[tuple[str, torch.Tensor]]
        The perturbed parameters in walk order (:class:`protocols.seeds.ParamWalk`).
    examples : Sequence[TokenizedExample]
        The node's tokenized examples.
    config : RoundSchedule
        Steps, batch size, run seed and round.
    seeds : Sequence[int]
        The candidate pool (K seeds).
    eps : float
        Perturbation scale.
    learning_rate : float
        eta of ``w -= eta * g * z`` (the spec's).
    probabilities : torch.Tensor, optional
        FedKSeed-Pro sampling probabilities over the pool; uniform when None.
    pad_id : int
        Padding token id.
    label : str
        The node's stable label (part of its seed).
    device : torch.device
        Where the model lives.

    Raises
    ------
    ValueError
        If there are no examples.
    """
    if not examples:
        raise ValueError("the node has no training examples")
    generator = torch.Generator().manual_seed(
        derive_seed(config.seed, config.server_round, label, "zo")
    )
    steps = config.local_steps
    if probabilities is None:
        draws = torch.randint(len(seeds), (steps,), generator=generator)
    else:
        draws = torch.multinomial(
            probabilities.double(), steps, replacement=True, generator=generator
        )
    batches = index_batches(len(examples), config.batch_size, generator)
    model.eval()
    kept_idx: list[int] = []
    kept_g: list[float] = []
    losses: list[float] = []
    skipped = 0
    for j in draws.tolist():
        batch = collate_train([examples[i] for i in next(batches)], pad_id).to(device)
        seed = seeds[j]
        perturb_(params, seed, eps)
        loss_plus = _loss(model, batch)
        perturb_(params, seed, -2.0 * eps)
        loss_minus = _loss(model, batch)
        if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
            perturb_(params, seed, eps)
            skipped += 1
            continue
        g = (loss_plus - loss_minus) / (2.0 * eps)
        perturb_(params, seed, eps - learning_rate * g)
        kept_idx.append(j)
        kept_g.append(g)
        losses.append(0.5 * (loss_plus + loss_minus))
    return ZoStats(
        indices=torch.tensor(kept_idx, dtype=torch.int32),
        scalars=torch.tensor(kept_g, dtype=torch.float32),
        mean_loss=sum(losses) / len(losses) if losses else float("nan"),
        skipped=skipped,
    )
