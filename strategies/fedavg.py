"""Bounded FedAvg of tensor payloads: the round LoRA and SFPrompt share.

Both methods send the global tensors out and get each client's trained
tensors back. :class:`TensorFedAvg` is the server's step, composed into each
method's strategy:

1. **Triage.** Every reply is decoded against the expected layout and size
   limit on the aggregation device; a bad one is dropped with a reason
   (:func:`strategies.replies.triage`). The rest are taken in a fixed order
   (sorted by node label), so a round is bitwise reproducible.
2. **Updates.** A client's update is its tensors minus the current global
   ones, in float32; one that overflows float32 is dropped.
3. **Bounds** (:mod:`strategies.robust`). Each update is clipped to the
   round's bound (by default 3 x the round's median update norm), each
   client's weight is its example count capped by what the server can check,
   and the bounded updates are combined by the configured aggregator
   (``mean`` by default: with no clip binding, this is exactly today's
   example-weighted FedAvg, ``current + sum w_i (x_i - current) / sum w``).
4. **Central DP** (``privacy.mode = "central"``, :mod:`strategies.privacy`):
   instead of step 3's weights and aggregator, every update is clipped to
   ``C`` (or the fixed bound ``federation.clip_norm`` when smaller), and the
   result is ``(sum of the clipped updates + N(0, (sigma C)^2)) / m`` with
   ``m`` the number of clients the round *sampled*, the noise drawn from the
   round's seeded generator. The adaptive bound is not used here: it is
   computed from every client's update, so adding or removing one client
   would change how the others are clipped, and the sum's sensitivity would
   no longer be ``C``; ``C`` already bounds each client to ``C / m``. With
   client-side clipping (``privacy.clipping = "client"``) the clients have
   clipped already and this clip is a no-op on an honest reply; it still
   bounds a hostile one.
5. **All or nothing.** The new global tensors are ``current + combined``; if
   any value is not finite the round is refused whole (every accepted client
   is listed as rejected, the new state is None) and the caller keeps its
   state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch
from flwr.app import RecordDict

from protocols import DEFAULT_MAX_PAYLOAD_BYTES, TensorLayout
from strategies.aggregation import AggregationError
from strategies.privacy import DPSettings, gaussian_noise, noise_generator
from strategies.replies import triage, weighted_loss
from strategies.robust import (
    Bounds,
    capped_weights,
    clip_bound,
    clip_to_norm,
    combine,
    is_finite,
    update_norm,
)
from strategies.strategy import LabelledReply

__all__ = ["FedAvgRound", "TensorFedAvg", "TensorReply"]

log = logging.getLogger(__name__)

OVERFLOW = "its update overflows float32"
NOT_FINITE = "the aggregate is not finite"

Tensors = Mapping[str, torch.Tensor]


class TensorReply(Protocol):
    """What a decoded reply of a tensor method carries."""

    @property
    def num_examples(self) -> int:
        """Examples the client trained on (its weight)."""

    @property
    def train_loss(self) -> float:
        """Its mean training loss."""


R = TypeVar("R", bound=TensorReply)

Decoder = Callable[..., R]
"""``decode(content, *, expected, max_bytes, device)`` of a method's reply."""


@dataclass
class FedAvgRound(Generic[R]):
    """One round's outcome: the decoded replies, the rejections, the new state.

    ``mean`` is the new global tensors, or None when no reply was usable or
    the round was refused (nothing is half-applied). ``stats`` says what
    bounded the round (see :class:`strategies.strategy.Aggregate`).
    """

    good: list[tuple[str, R]]
    rejected: dict[str, str] = field(default_factory=dict)
    mean: dict[str, torch.Tensor] | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> list[str]:
        """Labels of the aggregated clients, in summation order."""
        return [who for who, _ in self.good]

    @property
    def num_examples(self) -> int:
        """Examples behind the new state (as the clients claim them)."""
        return sum(r.num_examples for _, r in self.good)

    def weighted(self, value: Callable[[R], float]) -> float | None:
        """Example-weighted mean of ``value`` over the accepted replies."""
        if not self.good:
            return None
        return weighted_loss([(value(r), r.num_examples) for _, r in self.good])


class TensorFedAvg:
    """Validate, bound and aggregate tensor replies of one layout.

    Parameters
    ----------
    layout : TensorLayout
        The layout every reply's tensors must have.
    device : torch.device or str
        Where decoding and aggregation run.
    max_payload_bytes : int
        Largest payload accepted from a client.
    bounds : Bounds, optional
        Clipping, weight caps and aggregator (default: :class:`Bounds`'s).
    dp : DPSettings, optional
        Differential privacy; only ``central`` changes the aggregation here
        (``local`` noise is the clients'; the bounds still apply).
    """

    def __init__(
        self,
        layout: TensorLayout,
        *,
        device: torch.device | str = "cpu",
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        bounds: Bounds | None = None,
        dp: DPSettings | None = None,
    ) -> None:
        self.layout = layout
        self.device = torch.device(device)
        self.max_payload_bytes = max_payload_bytes
        self.bounds = bounds if bounds is not None else Bounds()
        self.dp = dp

    @property
    def central(self) -> DPSettings | None:
        """The DP settings when the server adds the noise, else None."""
        return self.dp if self.dp is not None and self.dp.mode == "central" else None

    def central_clip(self, dp: DPSettings) -> float:
        """The L2 bound central DP clips every update to (step 4).

        ``C``, or the fixed bound ``federation.clip_norm`` when smaller; with
        client-side clipping it is also the bound each client is told.
        """
        # Not the adaptive bound: it depends on the other clients' updates, so
        # one client's presence would move every clipped update and the sum's
        # sensitivity would exceed C. A fixed bound is data-independent.
        fixed = self.bounds.fixed_bound if self.bounds.clip != "off" else None
        return dp.clip_norm if fixed is None else min(fixed, dp.clip_norm)

    def round(
        self,
        server_round: int,
        replies: Sequence[LabelledReply],
        decode: Decoder[R],
        tensors: Callable[[R], Tensors],
        *,
        current: Tensors | None = None,
        sampled: int | None = None,
        reported: Mapping[str, int] | None = None,
        noise_seed: int | None = None,
    ) -> FedAvgRound[R]:
        """Decode, triage, bound and aggregate one round's replies.

        Parameters
        ----------
        server_round : int
            The round (names the noise generator).
        replies : Sequence[LabelledReply]
            The round's labelled replies.
        decode : Decoder
            The method's reply decoder.
        tensors : Callable
            A decoded reply's tensors.
        current : Mapping[str, torch.Tensor], optional
            The global tensors the clients started from (None: zeros, so the
            bounds apply to the replies' tensors themselves).
        sampled : int, optional
            Clients the round sampled (central DP's denominator; default:
            the number of clients that replied).
        reported : Mapping[str, int], optional
            Example counts the nodes reported at hello, by label.
        noise_seed : int, optional
            Central DP's secret seed (required in that mode).

        Raises
        ------
        ValueError
            In central DP mode without ``noise_seed``.
        """

        def decode_one(content: RecordDict) -> R:
            return decode(
                content,
                expected=self.layout,
                max_bytes=self.max_payload_bytes,
                device=self.device,
            )

        good, rejected = triage(server_round, replies, lambda m: decode_one(m.content))
        if not good:
            return FedAvgRound(good, rejected)
        replied = len(good) + len(rejected)
        base = self._base(current, tensors(good[0][1]))
        kept, deltas = self._updates(server_round, good, tensors, base, rejected)
        if not kept:
            return FedAvgRound([], rejected)
        try:
            combined, stats = self.combine_updates(
                server_round,
                kept,
                deltas,
                sampled=sampled or replied,
                reported=reported or {},
                noise_seed=noise_seed,
            )
        except AggregationError as exc:
            return self._refuse(
                server_round, kept, rejected, f"aggregation failed: {exc}", {}
            )
        new = {
            k: (base[k].float() + combined[k].float()).to(base[k].dtype)
            for k in self.layout.names
        }
        if not is_finite(new):
            return self._refuse(server_round, kept, rejected, NOT_FINITE, stats)
        return FedAvgRound(kept, rejected, new, stats)

    def _base(self, current: Tensors | None, like: Tensors) -> dict[str, torch.Tensor]:
        """The current global tensors on the device (zeros when unknown)."""
        if current is None:
            return {
                k: torch.zeros_like(like[k], device=self.device)
                for k in self.layout.names
            }
        return {k: current[k].to(self.device) for k in self.layout.names}

    def _updates(
        self,
        server_round: int,
        good: Sequence[tuple[str, R]],
        tensors: Callable[[R], Tensors],
        base: Tensors,
        rejected: dict[str, str],
    ) -> tuple[list[tuple[str, R]], list[dict[str, torch.Tensor]]]:
        """Each reply's float32 update; one that overflows goes to ``rejected``."""
        kept: list[tuple[str, R]] = []
        deltas: list[dict[str, torch.Tensor]] = []
        for who, reply in good:
            got = tensors(reply)
            delta = {k: got[k].float() - base[k].float() for k in self.layout.names}
            if is_finite(delta):
                kept.append((who, reply))
                deltas.append(delta)
            else:
                rejected[who] = OVERFLOW
                log.warning(
                    "round %d: rejected update from %s: %s", server_round, who, OVERFLOW
                )
        return kept, deltas

    def combine_updates(
        self,
        server_round: int,
        kept: Sequence[tuple[str, R]],
        deltas: Sequence[Tensors],
        *,
        sampled: int,
        reported: Mapping[str, int],
        noise_seed: int | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Steps 3 or 4 over computed updates: the combined update and its stats.

        ``deltas`` (one per kept reply, float32) may hold any subset of the
        layout's tensors (e.g. only LoRA's B factors); the result has those.
        ``sampled`` is central DP's denominator (at least ``len(kept)`` is used).

        Raises
        ------
        ValueError
            In central DP mode without ``noise_seed``.
        AggregationError
            If the aggregator cannot combine them.
        """
        dp = self.central
        if dp is not None and noise_seed is None:
            raise ValueError("central differential privacy needs a noise seed")
        if dp is not None and noise_seed is not None:
            m = max(sampled, len(kept))
            return self._central(dp, server_round, kept, deltas, m, noise_seed)
        return self._bounded(kept, deltas, reported)

    def weigh(
        self, kept: Sequence[tuple[str, R]], reported: Mapping[str, int]
    ) -> tuple[list[float], int]:
        """The kept replies' capped weights, and how many caps bound (step 3)."""
        counts = [r.num_examples for _, r in kept]
        weights = capped_weights(
            counts, self.bounds, [reported.get(who) for who, _ in kept]
        )
        capped = (
            sum(w < c for w, c in zip(weights, counts, strict=True))
            if self.bounds.weighting == "examples"
            else 0
        )
        return weights, capped

    def _bounded(
        self,
        kept: Sequence[tuple[str, R]],
        deltas: Sequence[Tensors],
        reported: Mapping[str, int],
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Clip, cap the weights, combine (module docstring, step 3)."""
        bounds = self.bounds
        bound = clip_bound([update_norm(d) for d in deltas], bounds)
        clipped = [clip_to_norm(d, bound) for d in deltas]
        weights, capped = self.weigh(kept, reported)
        combined = combine([c for c, _ in clipped], weights, bounds, device=self.device)
        stats = {
            "clip_bound": bound,
            "clipped": sum(f < 1.0 for _, f in clipped),
            "weights_capped": capped,
            "aggregator_used": [kept[i][0] for i in combined.used],
        }
        return combined.tensors, stats

    def _central(
        self,
        dp: DPSettings,
        server_round: int,
        kept: Sequence[tuple[str, R]],
        deltas: Sequence[Tensors],
        sampled: int,
        noise_seed: int,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Central DP's noisy mean over the sampled clients (module docstring, step 4)."""
        clip = self.central_clip(dp)
        clipped = [clip_to_norm(d, clip) for d in deltas]
        total = {
            k: torch.zeros(t.shape, dtype=torch.float32, device=self.device)
            for k, t in deltas[0].items()
        }
        for update, _ in clipped:
            for k, t in total.items():
                t.add_(update[k])
        std = dp.noise_multiplier * dp.clip_norm
        noise = gaussian_noise(total, std, noise_generator(noise_seed, server_round))
        combined = {k: (t + noise[k]) / sampled for k, t in total.items()}
        stats = {
            "clip_bound": clip,
            "clipped": sum(f < 1.0 for _, f in clipped),
            "weights_capped": 0,
            "aggregator_used": [who for who, _ in kept],
            "noise_std": std / sampled,
        }
        return combined, stats

    def _refuse(
        self,
        server_round: int,
        kept: Sequence[tuple[str, R]],
        rejected: dict[str, str],
        reason: str,
        stats: dict[str, Any],
    ) -> FedAvgRound[R]:
        """Refuse the round whole: every accepted client becomes rejected."""
        log.error(
            "round %d: refused, %s; the global state is kept (%d updates)",
            server_round,
            reason,
            len(kept),
        )
        for who, _ in kept:
            rejected[who] = reason
        return FedAvgRound([], rejected, None, stats)
