"""Dataset pruning by EL2N score (SFPrompt's data selection).

EL2N (Paul et al., 2021) scores an example by how wrong the model is on it:
the L2 norm of ``softmax(logits) - onehot(target)``. For a language model we
average it over the example's target tokens. SFPrompt keeps the fraction
gamma of local examples with the *highest* scores (the hardest) for the
expensive split-training phase. Pure torch.
"""

from __future__ import annotations

import math

import torch

from models import IGNORE_INDEX

__all__ = ["el2n_scores", "keep_hardest"]


def el2n_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean EL2N over each example's target tokens.

    Parameters
    ----------
    logits : torch.Tensor
        (B, T, V) next-token logits aligned with ``labels`` (position t
        predicts ``labels[:, t + 1]``).
    labels : torch.Tensor
        (B, T) token ids, ``IGNORE_INDEX`` where there is no target.

    Returns
    -------
    torch.Tensor
        (B,) float32 scores in [0, sqrt(2)]; 0 for an example with no target.
    """
    probs = torch.softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    # ||p - onehot(y)||^2 = sum(p^2) - 2 p_y + 1, without a (B, T, V) one-hot.
    p_y = probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    sq = (probs.square().sum(-1) - 2.0 * p_y + 1.0).clamp_min(0.0)
    err = sq.sqrt() * valid  # (B, T-1)
    return err.sum(dim=1) / valid.sum(dim=1).clamp_min(1)


def keep_hardest(scores: torch.Tensor, gamma: float) -> list[int]:
    """Indices of the ``ceil(gamma * n)`` highest scores, in index order.

    Ties are broken by lower index first, so the choice is deterministic.

    Raises
    ------
    ValueError
        If ``gamma`` is not in (0, 1].
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    n = int(scores.numel())
    keep = max(1, math.ceil(round(gamma * n, 9))) if n else 0
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:keep])
