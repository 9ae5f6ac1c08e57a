"""Rank-aware LoRA rounds: bounds first, then the configured rule.

The plumbing between :class:`strategies.lora.LoraFedAvg` and the pure kernels
of :mod:`strategies.lora_rules` for every ``lora.aggregation`` but plain
``fedavg`` (which stays :class:`strategies.fedavg.TensorFedAvg`'s round).

1. **Decode per node.** A node of rank ``r`` must reply with the adapter
   layout at ``r`` (:func:`layout_at`); any other is dropped with the
   decoder's one-line reason.
2. **Updates in the node's rank.** The node started from the truncation of
   the global adapter (:func:`~strategies.lora_factors.client_adapter`); its
   update is what it returned minus that start, in float32. ``ffa`` first
   drops a reply whose A is not bit-identical to the global A.
3. **Bounds before the rule.** Each update is clipped on its *padded
   canonical* form (:func:`~strategies.lora_factors.pad_to`: B scaled by
   ``r_max / r``, so the padded update has the same ``dW`` as the client's,
   but a larger factor norm than the unpadded one). Clipping scales by one
   factor, so clipping the padded update and padding the clipped update are
   the same; the bound (adaptive or fixed, :func:`strategies.robust.clip_bound`)
   is computed over the padded norms, so clients of different ranks are
   measured in one space. Weights are capped as
   :meth:`TensorFedAvg.weigh` caps them.
4. **The rule.**

   - ``ffa``: the clipped B updates only, combined by the configured robust
     rule (or central DP's noisy sum, noise on B only); A stays the global A.
   - ``hetlora``: each clipped client adapter (start + clipped update) padded
     to ``r_max``; the configured robust rule combines the padded adapters
     (mean, median, trimmed mean and Krum all work in padded factor space).
     Under central DP the new adapter is ``base + (sum of clipped padded
     updates + noise) / m``, ``base`` the equal-weight mean of the accepted
     clients' padded starts (a function of their public ranks).
   - ``exact`` and ``flexlora``: the clipped adapters, at their ranks, and the
     capped weights go to :func:`strategies.lora_rules.aggregate`
     (config validation allows only the ``mean`` aggregator and no central
     DP: both need each client's product ``B_i A_i``).

5. **All or nothing.** A non-finite adapter or residual, or a rule that
   fails, refuses the round whole (the adapter and residual stay as they
   were), as :class:`TensorFedAvg` does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Message

from protocols import LoraSpec, LoraTrainRes, TensorLayout, decode_lora_train_res
from protocols.codecs import TensorEntry
from strategies.aggregation import AggregationError
from strategies.fedavg import OVERFLOW, TensorFedAvg
from strategies.lora_factors import (
    LORA_A,
    LORA_B,
    Adapter,
    LoraRuleError,
    client_adapter,
    pad_adapter,
)
from strategies.lora_rules import aggregate
from strategies.replies import triage
from strategies.robust import clip_bound, combine, is_finite, update_norm
from strategies.strategy import LabelledReply

__all__ = ["FamilyRound", "decode_replies", "family_round", "layout_at"]

log = logging.getLogger(__name__)


Reply = tuple[str, LoraTrainRes]


@dataclass
class FamilyRound:
    """A rank-aware round's outcome (see :class:`strategies.lora.LoraAggregate`)."""

    kept: list[Reply]
    rejected: dict[str, str]
    adapter: dict[str, torch.Tensor] | None = None
    residual: dict[str, torch.Tensor] | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def layout_at(layout: TensorLayout, rank: int) -> TensorLayout:
    """``layout`` with every ``lora_A`` ``(rank, in)`` and ``lora_B`` ``(out, rank)``."""
    entries = []
    for e in layout.entries:
        shape = e.shape
        if e.name.endswith(LORA_A) and len(shape) == 2:
            shape = (rank, shape[1])
        elif e.name.endswith(LORA_B) and len(shape) == 2:
            shape = (shape[0], rank)
        entries.append(TensorEntry(e.name, e.dtype, shape))
    return TensorLayout(tuple(entries))


def decode_replies(
    fedavg: TensorFedAvg,
    server_round: int,
    replies: Sequence[LabelledReply],
    rank_of: Mapping[str, int],
    global_rank: int,
) -> tuple[list[Reply], dict[str, str]]:
    """Triage ``replies``, each decoded against its node's rank layout."""
    owner = {id(message): who for who, message in replies}
    layouts: dict[int, TensorLayout] = {}

    def decode(message: Message) -> LoraTrainRes:
        rank = rank_of.get(owner[id(message)], global_rank)
        if rank not in layouts:
            layouts[rank] = layout_at(fedavg.layout, rank)
        return decode_lora_train_res(
            message.content,
            expected=layouts[rank],
            max_bytes=fedavg.max_payload_bytes,
            device=fedavg.device,
        )

    return triage(server_round, replies, decode)


def _scaled(
    start: Adapter, delta: Adapter, factor: float, like: Adapter
) -> dict[str, torch.Tensor]:
    """``start + factor * delta`` in the dtypes of ``like`` (the reply)."""
    return {
        k: (start[k].double() + delta[k].double() * factor).to(like[k].dtype)
        for k in like
    }


def family_round(
    fedavg: TensorFedAvg,
    spec: LoraSpec,
    server_round: int,
    good: Sequence[Reply],
    rejected: dict[str, str],
    *,
    ranks: Mapping[str, int],
    current: Adapter,
    sampled: int,
    reported: Mapping[str, int],
    noise_seed: int | None,
    sparsity_weighted: bool = False,
) -> FamilyRound:
    """Bound the decoded replies and apply ``spec.aggregation`` (module docstring).

    Parameters
    ----------
    fedavg : TensorFedAvg
        The strategy's bounds, weights, DP and device (canonical layout).
    spec : LoraSpec
        The rule (``aggregation``), the global rank and ``alpha``.
    server_round : int
        The round (names the noise generator).
    good : Sequence[tuple[str, LoraTrainRes]]
        Decoded replies, sorted by label, each at its node's rank.
    rejected : dict[str, str]
        Rejections so far; this round's are added.
    ranks : Mapping[str, int]
        Label to the rank the node trains (absent: ``spec.rank``).
    current : Mapping[str, torch.Tensor]
        The canonical global adapter the round started from.
    sampled, reported, noise_seed
        As :meth:`TensorFedAvg.combine_updates` takes them.
    sparsity_weighted : bool
        ``hetlora`` with the ``mean`` aggregator: HetLoRA's sparsity-weighted
        aggregation (:func:`strategies.lora_rules.aggregate`).
    """
    rule, r_max = spec.aggregation, spec.rank
    cur = {k: current[k].to(fedavg.device) for k in fedavg.layout.names}
    starts: dict[int, dict[str, torch.Tensor]] = {r_max: cur}
    kept: list[Reply] = []
    deltas: list[dict[str, torch.Tensor]] = []
    for who, res in good:
        reason = _ffa_problem(res.adapter, cur) if rule == "ffa" else None
        r = ranks.get(who, r_max)
        if r not in starts:
            starts[r] = client_adapter(cur, r_max, r)
        delta = {k: t.float() - starts[r][k].float() for k, t in res.adapter.items()}
        if reason is None and not is_finite(delta):
            reason = OVERFLOW
        if reason is not None:
            rejected[who] = reason
            log.warning(
                "round %d: rejected update from %s: %s", server_round, who, reason
            )
            continue
        kept.append((who, res))
        deltas.append(delta)
    if not kept:
        return FamilyRound([], rejected)
    rank_list = [ranks.get(who, r_max) for who, _ in kept]
    padded = [pad_adapter(d, r, r_max) for d, r in zip(deltas, rank_list, strict=True)]
    stats: dict[str, Any] = {}
    residual: dict[str, torch.Tensor] | None = None
    try:
        if rule == "ffa" or (rule == "hetlora" and fedavg.central is not None):
            if rule == "ffa":
                padded = [
                    {k: t for k, t in p.items() if k.endswith(LORA_B)} for p in padded
                ]
            combined, stats = fedavg.combine_updates(
                server_round,
                kept,
                padded,
                sampled=sampled,
                reported=reported,
                noise_seed=noise_seed,
            )
            base = cur if rule == "ffa" else _padded_mean(starts, rank_list, r_max)
            new = {
                k: base[k].clone()
                if k not in combined
                else (base[k].float() + combined[k].float()).to(cur[k].dtype)
                for k in cur
            }
        else:
            new, residual, stats = _clipped_rule(
                fedavg,
                spec,
                kept,
                deltas,
                padded,
                starts,
                rank_list,
                reported,
                sparsity_weighted,
            )
    except (AggregationError, LoraRuleError) as exc:
        return _refuse(server_round, kept, rejected, f"aggregation failed: {exc}", {})
    stats["aggregation"] = rule
    stats["ranks"] = {who: r for (who, _), r in zip(kept, rank_list, strict=True)}
    if not is_finite(new) or (residual is not None and not is_finite(residual)):
        return _refuse(
            server_round, kept, rejected, "the aggregate is not finite", stats
        )
    return FamilyRound(kept, rejected, new, residual, stats)


def _ffa_problem(adapter: Adapter, cur: Adapter) -> str | None:
    """Why an ``ffa`` reply is refused (its A is not the global A), or None."""
    for name, t in adapter.items():
        if name.endswith(LORA_A) and not torch.equal(t, cur[name]):
            return (
                f"ffa: it changed the frozen A of module '{name[: -len(LORA_A)]}' "
                "(A must equal the global A bit for bit)"
            )
    return None


def _padded_mean(
    starts: Mapping[int, Adapter], ranks: Sequence[int], r_max: int
) -> dict[str, torch.Tensor]:
    """Equal-weight mean of the kept clients' padded starts, in float32."""
    distinct = sorted(set(ranks))
    if distinct == [r_max]:
        return {k: t.float() for k, t in starts[r_max].items()}
    total: dict[str, torch.Tensor] = {}
    for r in distinct:
        share = ranks.count(r) / len(ranks)
        for k, t in pad_adapter(starts[r], r, r_max).items():
            total[k] = total.get(k, torch.zeros_like(t, dtype=torch.float32))
            total[k].add_(t.float(), alpha=share)
    return total


def _clipped_rule(
    fedavg: TensorFedAvg,
    spec: LoraSpec,
    kept: Sequence[Reply],
    deltas: Sequence[Adapter],
    padded: Sequence[Adapter],
    starts: Mapping[int, Adapter],
    ranks: Sequence[int],
    reported: Mapping[str, int],
    sparsity_weighted: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """``hetlora`` (no central DP), ``exact``, ``flexlora``: clip, weigh, the rule."""
    bound = clip_bound([update_norm(p) for p in padded], fedavg.bounds)
    clipped: list[dict[str, torch.Tensor]] = []
    factors: list[float] = []
    for (_, res), delta, p, r in zip(kept, deltas, padded, ranks, strict=True):
        norm = update_norm(p)
        f = 1.0 if bound is None or norm <= bound else bound / norm
        factors.append(f)
        clipped.append(
            dict(res.adapter) if f == 1.0 else _scaled(starts[r], delta, f, res.adapter)
        )
    weights, capped = fedavg.weigh(kept, reported)
    stats: dict[str, Any] = {
        "clip_bound": bound,
        "clipped": sum(f < 1.0 for f in factors),
        "weights_capped": capped,
    }
    dtypes = {k: t.dtype for k, t in starts[spec.rank].items()}
    residual = None
    if spec.aggregation == "hetlora" and not sparsity_weighted:
        lifted = [
            pad_adapter({k: t.float() for k, t in c.items()}, r, spec.rank)
            for c, r in zip(clipped, ranks, strict=True)
        ]
        got = combine(lifted, weights, fedavg.bounds, device=fedavg.device)
        out = got.tensors
        stats["aggregator_used"] = [kept[i][0] for i in got.used]
    else:
        result = aggregate(
            spec.aggregation,
            clipped,
            ranks,
            weights,
            alpha=spec.alpha,
            global_rank=spec.rank,
            sparsity_weighted=sparsity_weighted,
            device=fedavg.device,
        )
        out = result.adapter
        if spec.aggregation == "exact":
            residual = {k: t.float() for k, t in result.residual.items()}
        stats["aggregator_used"] = [who for who, _ in kept]
    new = {k: out[k].to(fedavg.device, dtypes[k]) for k in fedavg.layout.names}
    return new, residual, stats


def _refuse(
    server_round: int,
    kept: Sequence[Reply],
    rejected: dict[str, str],
    reason: str,
    stats: dict[str, Any],
) -> FamilyRound:
    """Refuse the round whole: every accepted client becomes rejected."""
    log.error(
        "round %d: refused, %s; the global adapter is kept (%d updates)",
        server_round,
        reason,
        len(kept),
    )
    for who, _ in kept:
        rejected[who] = reason
    return FamilyRound([], rejected, None, None, stats)
