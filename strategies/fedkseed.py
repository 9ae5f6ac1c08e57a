"""FedKSeed and FedKSeed-Pro: federated zeroth-order tuning over a seed pool.

The strategy never sees a weight. It keeps the round history (one
:class:`~protocols.zo_messages.RoundDelta` per round), the round each node
last synced to, and, for Pro, the per-seed importance statistics. Each round
it sends every sampled node only the history since that node's last sync, and
turns the replies' ``(seed index, scalar)`` pairs into the next round delta.

A reply is rejected, with a logged reason, when it is an error, malformed
(out-of-pool index, NaN scalar, too many steps) or out of sync (its model hash
differs from the global model's): nothing of it reaches the aggregate.

The accepted replies are bounded, combined and (optionally) privatised by the
kernels of :mod:`strategies.seed_pool` (whose docstring gives the rules and
the sensitivity argument): every scalar is clipped and every weight capped
(``[federation]``, :class:`strategies.robust.Bounds`), the configured
aggregator runs in seed space, and with ``privacy.mode = "central"`` each
client's per-seed vector is clipped to ``C`` and Gaussian noise is added to
all K coefficients; with ``"local"`` every instruction asks the client to do
so itself. With ``privacy.clipping = "client"`` (central) every instruction
also asks the client to clip its per-seed vector to ``C`` itself; the server
still clips what it sees, and under SecAgg+ adds the same noise to the
unmasked sum (:meth:`FedKSeed._secure_round`). A round is released whole or
not at all: non-finite coefficients refuse it and nothing (history, Pro
statistics, privacy account) changes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from flwr.app import Error, Message

from protocols import ProtocolError, ZOSpec
from protocols.messages import (
    ERROR_OUT_OF_SYNC,
    ClientClip,
    LocalPrivacy,
    RoundSchedule,
    SecureMean,
)
from protocols.zo_messages import (
    MESSAGE_TRAIN_ZO,
    RoundDelta,
    ZoTrainIns,
    ZoTrainRes,
    decode_zo_train_res,
    encode_zo_train_ins,
)
from strategies.aggregation import AggregationError
from strategies.privacy import (
    DPSettings,
    PrivacyAccount,
    fresh_noise_seed,
    noise_generator,
)
from strategies.replies import triage, weighted_loss
from strategies.robust import Bounds, capped_weights
from strategies.secure_mean import (
    SecureMeanError,
    check_secure_mean,
    find_secure_mean,
    secure_train_loss,
)
from strategies.secure_mean import seed_coefficients as secure_seed_coefficients
from strategies.seed_pool import (
    ProStatistics,
    SeedUpdate,
    bound_scalars,
    central_dp_sum,
    seed_coefficients,
    seed_noise,
    seed_sums,
    sparse_coefficients,
)
from strategies.strategy import Aggregate, LabelledReply, Nodes

__all__ = ["FedKSeed", "ZoAggregate", "ZoGlobal"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ZoGlobal:
    """The global model as FedKSeed's strategy sees it: a round and a hash."""

    round: int
    hash: str


@dataclass
class ZoAggregate(Aggregate):
    """Outcome of one FedKSeed round (``delta`` is None when nothing was usable)."""

    delta: RoundDelta | None = None
    steps: int = 0


@dataclass(frozen=True, slots=True)
class _Release:
    """A round's dense coefficients, its stats and what Pro learns from it."""

    coefficients: torch.Tensor  # (K,) float64
    stats: dict[str, Any]
    pro_indices: torch.Tensor
    pro_scalars: torch.Tensor


def _round_delta(
    server_round: int, indices: torch.Tensor, coefficients: torch.Tensor
) -> RoundDelta:
    """The wire's (NumPy) round delta of the kernels' int32/float32 tensors."""
    return RoundDelta(
        server_round,
        indices.detach().cpu().to(torch.int32).numpy(),
        coefficients.detach().cpu().to(torch.float32).numpy(),
    )


class FedKSeed:
    """Seed-pool zeroth-order federated tuning (uniform or Pro sampling).

    Parameters
    ----------
    spec : ZOSpec
        Sent with every instruction; ``spec.sampling`` picks FedKSeed or -Pro.
    local_steps, batch_size : int
        Local ZO steps per round and examples per step.
    seed : int
        Run seed (the clients' batch and seed draws).
    bounds : Bounds, optional
        Clip, weight caps and aggregator (default: ``Bounds()``, the
        ``[federation]`` defaults).
    privacy : DPSettings, optional
        Differential privacy (None: off). Central DP needs the ``mean``
        aggregator.
    noise_seed : int, optional
        Central DP's secret noise seed (drawn at random when None).

    Raises
    ------
    ValueError
        If central DP is asked for with another aggregator than ``mean``.
    """

    def __init__(
        self,
        *,
        spec: ZOSpec,
        local_steps: int,
        batch_size: int,
        seed: int = 0,
        bounds: Bounds | None = None,
        privacy: DPSettings | None = None,
        noise_seed: int | None = None,
    ) -> None:
        self.spec = spec
        self.local_steps = local_steps
        self.batch_size = batch_size
        self.seed = seed
        self.bounds = bounds if bounds is not None else Bounds()
        self.privacy = privacy
        if privacy is not None and privacy.mode == "central":
            if self.bounds.aggregator != "mean":
                raise ValueError(
                    "central differential privacy needs the 'mean' aggregator, not "
                    f"{self.bounds.aggregator!r}"
                )
            if noise_seed is None:
                noise_seed = fresh_noise_seed()
        self.noise_seed = noise_seed
        self.account = PrivacyAccount(privacy) if privacy is not None else None
        self.hello_counts: dict[str, int] = {}
        self.history: list[RoundDelta] = []
        self.node_rounds: dict[str, int] = {}
        self._sampled: dict[int, int] = {}
        self.pro = (
            ProStatistics(spec.num_seeds, spec.grad_clip)
            if spec.sampling == "pro"
            else None
        )

    @property
    def central_dp(self) -> bool:
        """Whether the server adds the noise (``privacy.mode = "central"``)."""
        return self.privacy is not None and self.privacy.mode == "central"

    def history_since(self, base_round: int) -> tuple[RoundDelta, ...]:
        """The round deltas a node synced at ``base_round`` still has to apply."""
        return tuple(d for d in self.history if d.round > base_round)

    def budget_allows(self, sampled: int) -> bool:
        """Whether a round of ``sampled`` nodes stays within the privacy budget."""
        return self.account is None or self.account.allows(sampled)

    def configure(
        self, server_round: int, nodes: Nodes, current: ZoGlobal
    ) -> list[Message]:
        """The round's ``train.zo`` messages, each with its node's catch-up.

        Raises
        ------
        strategies.privacy.PrivacyBudgetExhausted
            If releasing this round would take epsilon past the target.
        """
        if self.account is not None:
            self.account.check(len(nodes))
        self._sampled = {server_round: len(nodes)}  # central DP's denominator
        # The learning rate travels in the spec only.
        config = RoundSchedule(
            server_round=server_round,
            local_steps=self.local_steps,
            batch_size=self.batch_size,
            seed=self.seed,
        )
        importance = self.pro.quantized().numpy() if self.pro is not None else None
        local_dp = (
            LocalPrivacy(self.privacy.clip_norm, self.privacy.noise_multiplier)
            if self.privacy is not None and self.privacy.mode == "local"
            else None
        )
        client_clip = (
            ClientClip(self.privacy.clip_norm)
            if self.privacy is not None and self.privacy.client_clip
            else None
        )
        messages = []
        for node, label in nodes.items():
            base = self.node_rounds.get(label, 0)
            ins = ZoTrainIns(
                spec=self.spec,
                config=config,
                base_round=base,
                target_round=current.round,
                target_hash=current.hash,
                history=self.history_since(base),
                importance=importance,
                local_privacy=local_dp,
                client_clip=client_clip,
            )
            messages.append(
                Message(
                    encode_zo_train_ins(ins),
                    dst_node_id=node,
                    message_type=MESSAGE_TRAIN_ZO,
                )
            )
        return messages

    def aggregate(
        self, server_round: int, replies: Sequence[LabelledReply], current: ZoGlobal
    ) -> ZoAggregate:
        """Validate replies, then build and record the round delta.

        The delta, the Pro statistics and the privacy account change together,
        only for a round whose coefficients are all finite. Under
        ``privacy.secagg`` the one reply is the SecAgg+ result
        (:meth:`_secure_round`).
        """
        secure = find_secure_mean(replies)
        if secure is not None:
            return self._secure_round(server_round, secure, current)

        def decode(reply: Message) -> ZoTrainRes:
            res = decode_zo_train_res(
                reply.content, num_seeds=self.spec.num_seeds, max_steps=self.local_steps
            )
            if (res.synced_round, res.synced_hash) != (current.round, current.hash):
                raise ProtocolError(
                    f"out of sync: trained from round {res.synced_round} hash "
                    f"{res.synced_hash}, global is round {current.round} hash "
                    f"{current.hash}"
                )
            return res

        def on_error(who: str, error: Error) -> None:
            if error.code == ERROR_OUT_OF_SYNC:
                self.node_rounds[who] = 0  # it lost its state: full history next time

        good, rejected = triage(server_round, replies, decode, on_error)
        if not good:
            return ZoAggregate(rejected=rejected)
        for who, _ in good:
            self.node_rounds[who] = current.round
        labels = [who for who, _ in good]
        updates = [
            SeedUpdate(
                torch.from_numpy(r.indices), torch.from_numpy(r.scalars), r.num_examples
            )
            for _, r in good
        ]
        sampled = max(self._sampled.get(server_round, len(replies)), len(good))

        def refuse(reason: str) -> ZoAggregate:
            log.warning("round %d refused: %s", server_round, reason)
            return ZoAggregate(rejected={**rejected, **dict.fromkeys(labels, reason)})

        try:
            release = self._release(server_round, labels, updates, sampled)
        except AggregationError as exc:
            return refuse(str(exc))
        indices, coefficients = sparse_coefficients(release.coefficients)
        if not bool(torch.isfinite(coefficients).all()):
            # Only reachable with learning_rate * local_steps beyond ~3e8 and
            # the clip off: refuse the round, keep the model.
            return refuse("the round's seed coefficients overflow float32")
        if self.pro is not None:
            self.pro.update(release.pro_indices, release.pro_scalars)
        stats = release.stats
        if self.account is not None:
            stats.update(self.account.release(sampled))
        delta = _round_delta(server_round, indices, coefficients)
        self.history.append(delta)
        return ZoAggregate(
            delta=delta,
            accepted=labels,
            rejected=rejected,
            train_loss=weighted_loss([(r.train_loss, r.num_examples) for _, r in good]),
            num_examples=sum(u.num_examples for u in updates),
            steps=sum(int(u.indices.numel()) for u in updates),
            stats=stats,
        )

    def _secure_round(
        self, server_round: int, secure: SecureMean, current: ZoGlobal
    ) -> ZoAggregate:
        """The round delta from a SecAgg+ mean of the clients' per-seed sums.

        Every survivor must have trained from the global model (its clear
        sync proof): an update out of sync is already inside the mean and
        cannot be taken out, so the whole round is refused. The total weight
        and finiteness are checked by
        :func:`strategies.secure_mean.seed_coefficients`. FedKSeed-Pro's
        statistics learn from the released mean (each node's scalars stay
        hidden), as under central DP.

        With central DP (client-side clipping and equal weights, which config
        validation requires) the released mean is
        ``(mean x survivors + N(0, (sigma C)^2 I_K)) / m``, ``m`` the clients
        sampled, with the noise of the server-side path
        (:func:`strategies.seed_pool.seed_noise`, same generator).
        """
        for who, reason in secure.dropped.items():
            if f"code {ERROR_OUT_OF_SYNC}" in reason:
                self.node_rounds[who] = 0  # lost its state: full history next time

        def refuse(reason: str) -> ZoAggregate:
            log.warning("round %d refused: %s", server_round, reason)
            return ZoAggregate(
                rejected={**secure.dropped, **dict.fromkeys(secure.survivors, reason)}
            )

        for who in secure.survivors:
            proof = secure.metrics.get(who, {})
            if (proof.get("synced-round"), proof.get("synced-hash")) != (
                current.round,
                current.hash,
            ):
                return refuse(
                    f"{who} trained out of sync (round {proof.get('synced-round')!r}, "
                    f"global is {current.round}): its update cannot be taken out "
                    "of a secure sum"
                )
        sampled = self._sampled.get(server_round, len(secure.survivors))
        stats: dict[str, Any] = {"secagg_survivors": len(secure.survivors)}
        try:
            if self.central_dp:
                secure, stats["noise_std"] = self._noisy_mean(
                    server_round, secure, sampled
                )
            indices, coefficients = secure_seed_coefficients(
                secure,
                num_seeds=self.spec.num_seeds,
                learning_rate=self.spec.learning_rate,
            )
        except SecureMeanError as exc:
            return refuse(str(exc))
        for who in secure.survivors:
            self.node_rounds[who] = current.round
        if self.pro is not None:
            # Learns from the released mean (scalars = -c / lr per seed).
            self.pro.update(indices, (coefficients.double() / -self.spec.learning_rate))
        if self.account is not None:
            stats.update(self.account.release(sampled))
        delta = _round_delta(server_round, indices, coefficients)
        self.history.append(delta)
        return ZoAggregate(
            delta=delta,
            accepted=list(secure.survivors),
            rejected=dict(secure.dropped),
            train_loss=secure_train_loss(secure),
            num_examples=round(sum(secure.weights)),
            steps=0,
            stats=stats,
        )

    def _noisy_mean(
        self, server_round: int, secure: SecureMean, sampled: int
    ) -> tuple[SecureMean, float]:
        """``secure`` with its mean replaced by the central DP release.

        Returns it and the noise's std on the mean.

        Raises
        ------
        SecureMeanError
            If :func:`check_secure_mean` refuses the result, it is not K
            long, or the weights are not all 1.
        """
        if self.privacy is None or self.noise_seed is None:
            raise ValueError("central differential privacy needs a noise seed")
        check_secure_mean(secure)
        k = self.spec.num_seeds
        if secure.mean.shape != (k,):
            raise SecureMeanError(
                f"secure mean has {secure.mean.size} values, FedKSeed has {k} seeds"
            )
        if any(w != 1 for w in secure.weights):
            raise SecureMeanError(
                "central DP under SecAgg+ needs equal weights (federation.weighting "
                "'equal'): the sum is the mean times the survivors"
            )
        c = self.privacy.clip_norm
        std = self.privacy.noise_multiplier * c
        noise = seed_noise(
            k, noise_std=std, generator=noise_generator(self.noise_seed, server_round)
        )
        m = max(sampled, len(secure.survivors))
        total = torch.from_numpy(secure.mean * len(secure.survivors))
        noisy = ((total + noise) / m).numpy()
        return replace(secure, mean=noisy), std / m

    def _release(
        self,
        server_round: int,
        labels: Sequence[str],
        updates: Sequence[SeedUpdate],
        sampled: int,
    ) -> _Release:
        """Bound, combine and (central DP) noise the round's updates.

        Under central DP the per-scalar bound is the fixed ``zo.max_abs_grad``
        only, never the adaptive one: that is computed from every client's
        scalars, so one client's presence would change how the others are
        clamped and the sum's sensitivity would exceed C (the L2 clip to C
        bounds each client anyway).
        """
        central = (
            self.central_dp and self.privacy is not None and self.noise_seed is not None
        )
        scalar_bounds = self.bounds
        if central:
            fixed = self.bounds.fixed_bound if self.bounds.clip != "off" else None
            scalar_bounds = replace(
                self.bounds,
                clip="off" if fixed is None else "fixed",
                fixed_bound=fixed,
            )
        bounded, bound, clipped = bound_scalars(updates, scalar_bounds)
        sums, reported = seed_sums(bounded, self.spec.num_seeds)
        lr = self.spec.learning_rate
        stats: dict[str, Any] = {"clip_bound": bound, "clipped": clipped}
        if central and self.privacy is not None and self.noise_seed is not None:
            c = self.privacy.clip_norm
            noisy, dp_clipped = central_dp_sum(
                sums,
                clip_norm=c,
                noise_std=self.privacy.noise_multiplier * c,
                generator=noise_generator(self.noise_seed, server_round),
            )
            mean = noisy / sampled
            stats.update(
                dp_clipped=dp_clipped,
                sampled=sampled,
                weights_capped=0,
                aggregator_used=list(labels),
            )
            # Pro learns from the released values only (post-processing).
            every = torch.arange(self.spec.num_seeds, dtype=torch.int32)
            return _Release(mean * -lr, stats, every, mean)
        claimed = [u.num_examples for u in updates]
        weights = capped_weights(
            claimed, self.bounds, [self.hello_counts.get(who) for who in labels]
        )
        result = seed_coefficients(
            sums, reported, weights, self.bounds, learning_rate=lr
        )
        stats["weights_capped"] = (
            sum(w < n for w, n in zip(weights, claimed, strict=True))
            if self.bounds.weighting == "examples"
            else 0
        )
        stats["aggregator_used"] = [labels[i] for i in result.used]
        return _Release(
            result.coefficients,
            stats,
            torch.cat([u.indices for u in bounded]),
            torch.cat([u.scalars for u in bounded]),
        )

    def state(self) -> dict[str, object]:
        """Everything needed to continue exactly.

        History, node rounds, Pro statistics, and with DP the privacy account
        and the central noise seed.
        """
        return {
            "history": [
                {
                    "round": d.round,
                    "indices": d.indices.tolist(),
                    "coefficients": d.coefficients.tolist(),
                }
                for d in self.history
            ],
            "node_rounds": dict(self.node_rounds),
            "pro": {k: v.tolist() for k, v in self.pro.state().items()}
            if self.pro
            else None,
            "privacy": self.account.state() if self.account is not None else None,
            "noise_seed": self.noise_seed,
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state` (node rounds reset).

        Nodes are assumed to hold nothing after a restart: each gets the full
        history at its next round, which keeps the replay exact. The privacy
        account and the central noise seed continue where they stopped, so
        epsilon and the noise of later rounds are those of an uninterrupted run.

        Raises
        ------
        ValueError
            If the run uses DP and the state has no privacy account (or one
            made with other settings).
        """
        self.history = [
            RoundDelta(
                int(d["round"]),
                np.array(d["indices"], dtype=np.int32),
                np.array(d["coefficients"], dtype=np.float32),
            )
            for d in state["history"]
        ]
        self.node_rounds = {}
        pro = state.get("pro")
        if self.pro is not None and pro:
            self.pro.load_state(
                {k: torch.tensor(v, dtype=torch.float64) for k, v in pro.items()}
            )
        if self.account is not None:
            account = state.get("privacy")
            if not account:
                raise ValueError(
                    "the checkpoint has no privacy account: it was saved without "
                    "differential privacy, so its epsilon is unknown"
                )
            self.account.load_state(account)
        if self.central_dp and state.get("noise_seed") is not None:
            self.noise_seed = int(state["noise_seed"])

    def summary(self) -> str:
        """The strategy's settings in one line."""
        return (
            f"FedKSeed{'-Pro' if self.pro else ''}: K={self.spec.num_seeds} "
            f"eps={self.spec.eps:g} lr={self.spec.learning_rate:g} "
            f"steps={self.local_steps} batch={self.batch_size} "
            f"{self.bounds.summary()}"
            + (f" {self.privacy.summary()}" if self.privacy is not None else "")
        )
