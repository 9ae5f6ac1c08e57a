"""Local LoRA training: E AdamW steps over the node's examples.

Pure torch over an already-built model: no Flower, no files. Batches are drawn
without replacement from a permutation that is reshuffled each pass, from a
generator seeded by (run seed, round, node label), and dropout runs under a
private RNG seeded the same way, so a node's round is reproducible.

With ``config.proximal_mu > 0`` the objective is FedProx's (Li et al. 2020,
"Federated Optimization in Heterogeneous Networks"): task loss plus
(mu / 2) * sum ||w - w0||^2 over the trainable (adapter) tensors, w0 being
their values when the call starts (the global adapter just loaded). The
squared norm is the paper's and Flower's FedProx docstring formula (its code
sketch sums unsquared norms). The reported loss stays the task loss, so
losses compare across mu. With mu == 0 the step is exactly the plain one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel

from client.batches import derive_seed, index_batches
from models import TokenizedExample, answer_loss, collate_train
from protocols import LocalTrainConfig

__all__ = ["TrainStats", "proximal_term", "train_lora"]


@dataclass(frozen=True, slots=True)
class TrainStats:
    """Mean loss over the steps taken, and how many examples were seen."""

    mean_loss: float
    steps: int
    examples_seen: int


def proximal_term(
    params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx's (mu / 2) * sum_i ||params_i - anchors_i||^2, differentiable in params.

    Its gradient with respect to ``params_i`` is ``mu * (params_i - anchors_i)``.
    ``anchors`` are detached snapshots of ``params``, one per tensor.
    """
    total = torch.zeros((), dtype=torch.float32, device=params[0].device)
    for p, p0 in zip(params, anchors, strict=True):
        total = total + (p.float() - p0.float()).pow(2).sum()
    return total * (mu / 2.0)


def train_lora(
    model: PeftModel,
    examples: Sequence[TokenizedExample],
    config: LocalTrainConfig,
    *,
    pad_id: int,
    label: str,
    device: torch.device,
    freeze_a: bool = False,
) -> TrainStats:
    """Train the adapter of ``model`` in place for ``config.local_steps`` steps.

    Parameters
    ----------
    model : PeftModel
        Base frozen, adapters trainable, already holding the global adapter.
    examples : Sequence[TokenizedExample]
        The node's tokenized examples (at least one).
    config : LocalTrainConfig
        Steps, batch size, optimiser settings, run seed and round; its
        ``proximal_mu`` > 0 adds FedProx's proximal term to the loss (the
        reported ``mean_loss`` is still the task loss).
    pad_id : int
        Token id used for padding.
    label : str
        The node's stable label (part of its seed).
    device : torch.device
        Where the model lives.
    freeze_a : bool
        FFA-LoRA (``lora.aggregation = "ffa"``): the ``lora_A`` matrices are
        left out of the optimiser and get no gradient, so they come back
        bit-identical and only B trains.

    Raises
    ------
    ValueError
        If there are no examples or no trainable parameters.
    """
    if not examples:
        raise ValueError("the node has no training examples")
    frozen = [
        p
        for name, p in model.named_parameters()
        if freeze_a and p.requires_grad and ".lora_A." in name
    ]
    held = {id(p) for p in frozen}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in held]
    if not params:
        raise ValueError("the model has no trainable (adapter) parameters")
    for p in frozen:
        p.requires_grad_(False)
    try:
        return _train(model, params, examples, config, pad_id, label, device)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _train(
    model: PeftModel,
    params: list[torch.Tensor],
    examples: Sequence[TokenizedExample],
    config: LocalTrainConfig,
    pad_id: int,
    label: str,
    device: torch.device,
) -> TrainStats:
    """:func:`train_lora`'s loop over the trainable ``params``."""
    seed = derive_seed(config.seed, config.server_round, label)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    mu = config.proximal_mu
    anchors = [p.detach().clone() for p in params] if mu > 0 else None
    losses: list[torch.Tensor] = []
    batches = index_batches(len(examples), config.batch_size, generator)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout draws, private to this call
        for _ in range(config.local_steps):
            batch = collate_train([examples[i] for i in next(batches)], pad_id).to(
                device
            )
            loss = answer_loss(model, batch)  # logits at the answer positions only
            if anchors is None:
                loss.backward()
            else:
                (loss + proximal_term(params, anchors, mu)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            del loss
    model.eval()
    mean = float(torch.stack(losses).mean())  # the one host sync of the call
    seen = config.local_steps * min(config.batch_size, len(examples))
    return TrainStats(mean_loss=mean, steps=config.local_steps, examples_seen=seen)
