"""Federated LoRA: bounded aggregation of adapter tensors, optionally private.

``spec.aggregation`` picks the rule. ``fedavg`` (the default) is
example-weighted FedAvg of A and B as below, bit-identical to what it was
before the other rules. ``exact`` (FedEx-LoRA), ``ffa`` (FFA-LoRA),
``hetlora`` and ``flexlora`` run :mod:`strategies.lora_family`: every node
trains the rank it said at hello (:attr:`LoraFedAvg.hello_ranks`) from the
truncation of the global adapter, its reply is decoded at that rank, clipped
in padded canonical space and weight-capped, then combined by
:mod:`strategies.lora_rules`. ``exact`` also returns the round's residual
increment (:attr:`LoraAggregate.residual`), which the driver accumulates and
:meth:`LoraFedAvg.configure` sends back to every node.

A :class:`~strategies.strategy.Strategy`: it builds ``train.lora``
instructions, decodes and validates replies through :mod:`protocols`, and
aggregates the accepted adapters' updates with
:class:`strategies.fedavg.TensorFedAvg` on its device (each update clipped,
each weight capped, then the configured aggregator; see
:mod:`strategies.robust`). A reply that is an error, malformed, of the wrong
layout, or holds NaN/Inf is dropped with a logged reason before anything is
summed, and a non-finite aggregate refuses the round, so the global adapter
is either fully updated from good replies or left exactly as it was.

Differential privacy (:mod:`strategies.privacy`): in ``central`` mode the
server clips and noises the sum (the noise seed is the operator's secret, in
:meth:`LoraFedAvg.privacy_state`); in ``local`` mode every instruction
carries :class:`~protocols.LocalPrivacy` and each client clips and noises
its own update. With ``privacy.clipping = "client"`` (central, Flower's
client-side fixed clipping) every instruction also carries
:class:`~protocols.messages.ClientClip` and each client clips its own update
to C; the server still clips what it sees, and under SecAgg+, where it sees
only the mean, it adds the noise to the unmasked sum (:meth:`_secure_round`).
Either way the strategy's :class:`PrivacyAccount` refuses a
round past the budget in :meth:`LoraFedAvg.configure` and spends one round
per released aggregate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from flwr.app import Message, RecordDict

from protocols import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    MESSAGE_TRAIN_LORA,
    LocalTrainConfig,
    LoraSpec,
    LoraTrainIns,
    TensorLayout,
    decode_lora_train_res,
    encode_lora_train_ins,
)
from protocols.messages import (
    SECURE_MEAN_LABEL,
    ClientClip,
    LocalPrivacy,
    SecureMean,
    put_client_clip,
    put_local_privacy,
)
from strategies.fedavg import TensorFedAvg
from strategies.lora_factors import client_adapter
from strategies.lora_family import decode_replies, family_round
from strategies.privacy import (
    DPSettings,
    PrivacyAccount,
    fresh_noise_seed,
    gaussian_noise,
    noise_generator,
)
from strategies.replies import weighted_loss
from strategies.robust import Bounds
from strategies.secure_mean import (
    SecureMeanError,
    check_secure_mean,
    find_secure_mean,
    lora_update,
    secure_train_loss,
    unflatten,
)
from strategies.server_opt import ServerOptSettings
from strategies.strategy import Aggregate, LabelledReply, Nodes

__all__ = ["LocalTrainSettings", "LoraAggregate", "LoraFedAvg"]

Adapter = Mapping[str, torch.Tensor]
"""Adapter tensors by PEFT parameter name."""

_LORA_A = ".lora_A.weight"


@dataclass(frozen=True, slots=True)
class LocalTrainSettings:
    """Local training settings the strategy sends every round."""

    local_steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float = 0.0
    proximal_mu: float = 0.0  # FedProx's mu, sent to every client (0: off)


@dataclass
class LoraAggregate(Aggregate):
    """Outcome of one round.

    ``adapter`` is the new canonical global adapter (rank ``spec.rank``), or
    ``None`` when no reply was usable (the caller then keeps the previous
    one). ``residual`` is this round's FedEx-LoRA residual increment per
    module prefix (``exact`` only, float32 ``(out, in)``; None otherwise or
    when the round was refused): the caller adds it to its cumulative
    residual.
    """

    adapter: dict[str, torch.Tensor] | None = None
    residual: dict[str, torch.Tensor] | None = None


class LoraFedAvg:
    """Example-weighted FedAvg of LoRA adapters.

    Parameters
    ----------
    spec : LoraSpec
        Sent with every instruction; clients refuse one they cannot honour.
    layout : TensorLayout
        The adapter layout every reply must have.
    train : LocalTrainSettings
        Local steps, batch size and optimiser settings.
    seed : int
        Run seed: the clients derive their batch order from it.
    device : torch.device or str
        Where aggregation runs.
    max_payload_bytes : int
        Largest adapter payload accepted from a client.
    bounds : Bounds, optional
        Clipping, weight caps and aggregator (default: :class:`Bounds`'s).
    dp : DPSettings, optional
        Differential privacy (None: off).
    noise_seed : int, optional
        Central DP's secret noise seed (None: a fresh random one).
    server_opt : ServerOptSettings, optional
        The server optimizer the driver steps with the aggregate (named in
        :meth:`summary` only; the driver owns the optimizer).
    sparsity_weighted : bool
        ``hetlora``: HetLoRA's sparsity-weighted aggregation instead of the
        plain zero-padding average (``lora.sparsity_weighted``).
    """

    def __init__(
        self,
        *,
        spec: LoraSpec,
        layout: TensorLayout,
        train: LocalTrainSettings,
        seed: int = 0,
        device: torch.device | str = "cpu",
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        bounds: Bounds | None = None,
        dp: DPSettings | None = None,
        noise_seed: int | None = None,
        server_opt: ServerOptSettings | None = None,
        sparsity_weighted: bool = False,
    ) -> None:
        self.spec = spec
        self.sparsity_weighted = sparsity_weighted
        self.server_opt = server_opt
        self.train = train
        self.seed = seed
        self.fedavg = TensorFedAvg(
            layout,
            device=device,
            max_payload_bytes=max_payload_bytes,
            bounds=bounds,
            dp=dp,
        )
        self.dp = dp
        self.account = PrivacyAccount(dp) if dp is not None else None
        self.noise_seed: int | None = None
        if dp is not None and dp.mode == "central":
            self.noise_seed = (
                noise_seed if noise_seed is not None else fresh_noise_seed()
            )
        self.hello_counts: dict[str, int] = {}
        # Label -> the LoRA rank its node trains (server.app fills it at hello).
        self.hello_ranks: dict[str, int] = {}
        self._sampled: dict[int, int] = {}

    def rank_of(self, label: str) -> int:
        """The LoRA rank the node ``label`` trains (``spec.rank`` if it did not say)."""
        return self.hello_ranks.get(label, self.spec.rank)

    def budget_allows(self, sampled: int) -> bool:
        """Whether a round of ``sampled`` nodes stays within the privacy budget."""
        return self.account is None or self.account.allows(sampled)

    def configure(
        self,
        server_round: int,
        nodes: Nodes,
        current: Adapter,
        residual: Mapping[str, torch.Tensor] | None = None,
    ) -> list[Message]:
        """The round's ``train.lora`` messages, each node's adapter at its rank.

        A node of rank ``r`` (:meth:`rank_of`) gets
        :func:`strategies.lora_factors.client_adapter` of ``current`` (the
        global adapter itself when ``r == spec.rank``) and ``residual``, the
        cumulative FedEx-LoRA residual (``exact`` only; None or empty: none).

        Raises
        ------
        strategies.privacy.PrivacyBudgetExhausted
            If the round would take epsilon past ``privacy.target_epsilon``.
        """
        if self.account is not None:
            self.account.check(len(nodes))
        self._sampled = {server_round: len(nodes)}
        config = LocalTrainConfig(
            server_round=server_round,
            local_steps=self.train.local_steps,
            batch_size=self.train.batch_size,
            learning_rate=self.train.learning_rate,
            weight_decay=self.train.weight_decay,
            proximal_mu=self.train.proximal_mu,
            seed=self.seed,
        )
        contents: dict[int, RecordDict] = {}  # one per rank, shared by its nodes
        messages = []
        for node, label in nodes.items():
            rank = self.rank_of(label)
            if rank not in contents:
                contents[rank] = self._instruction(config, current, rank, residual)
            messages.append(
                Message(
                    content=contents[rank],
                    dst_node_id=node,
                    message_type=MESSAGE_TRAIN_LORA,
                )
            )
        return messages

    def _instruction(
        self,
        config: LocalTrainConfig,
        current: Adapter,
        rank: int,
        residual: Mapping[str, torch.Tensor] | None,
    ) -> RecordDict:
        """The ``train.lora`` content for a node of ``rank``."""
        adapter = (
            dict(current)
            if rank == self.spec.rank
            else client_adapter(current, self.spec.rank, rank)
        )
        content = encode_lora_train_ins(
            LoraTrainIns(
                spec=self.spec,
                config=config,
                adapter=adapter,
                client_rank=rank,
                residual=dict(residual or {}),
            )
        )
        if self.dp is not None and self.dp.mode == "local":
            put_local_privacy(
                content, LocalPrivacy(self.dp.clip_norm, self.dp.noise_multiplier)
            )
        if self.dp is not None and self.dp.client_clip:
            put_client_clip(content, ClientClip(self.fedavg.central_clip(self.dp)))
        return content

    def aggregate(
        self,
        server_round: int,
        replies: Sequence[LabelledReply],
        current: Adapter | None = None,
    ) -> LoraAggregate:
        """Validate every reply, drop bad ones with a reason, aggregate the rest.

        ``current`` is the global adapter the round started from (None: the
        bounds apply to the replied adapters themselves, as if it were zero).
        A round whose aggregate is released spends privacy budget; its
        ``stats`` carry the bounds used and, with DP, epsilon and delta.
        Under ``privacy.secagg`` the one reply is the SecAgg+ result
        (:func:`_secure_round`).
        """
        secure = find_secure_mean(replies)
        if secure is not None:
            return self._secure_round(server_round, secure, current)
        if self.spec.aggregation != "fedavg":
            return self._family_round(server_round, replies, current)
        r = self.fedavg.round(
            server_round,
            replies,
            decode_lora_train_res,
            lambda res: res.adapter,
            current=current,
            sampled=self._sampled.get(server_round),
            reported=self.hello_counts,
            noise_seed=self.noise_seed,
        )
        stats = dict(r.stats)
        if self.account is not None:
            released = r.mean is not None
            stats.update(
                self.account.release(
                    self._sampled.get(server_round, len(replies)) if released else None
                )
            )
        return LoraAggregate(
            adapter=r.mean,
            accepted=r.accepted,
            rejected=r.rejected,
            train_loss=r.weighted(lambda res: res.train_loss),
            num_examples=r.num_examples,
            stats=stats,
        )

    def _family_round(
        self,
        server_round: int,
        replies: Sequence[LabelledReply],
        current: Adapter | None,
    ) -> LoraAggregate:
        """A round of ``exact``, ``ffa``, ``hetlora`` or ``flexlora``.

        Each reply is decoded at its node's rank and bounded before the rule
        (:mod:`strategies.lora_family`); ``stats`` add ``aggregation`` and
        ``ranks`` (label to the rank of each accepted client).
        """
        if current is None:
            raise ValueError(
                f"lora.aggregation {self.spec.aggregation!r} needs the current "
                "global adapter"
            )
        good, rejected = decode_replies(
            self.fedavg, server_round, replies, self.hello_ranks, self.spec.rank
        )
        sampled = self._sampled.get(server_round, len(good) + len(rejected))
        r = family_round(
            self.fedavg,
            self.spec,
            server_round,
            good,
            rejected,
            ranks=self.hello_ranks,
            current=current,
            sampled=sampled,
            reported=self.hello_counts,
            noise_seed=self.noise_seed,
            sparsity_weighted=self.sparsity_weighted,
        )
        stats = dict(r.stats)
        if self.account is not None:
            released = r.adapter is not None
            stats.update(self.account.release(sampled if released else None))
        losses = [(res.train_loss, res.num_examples) for _, res in r.kept]
        return LoraAggregate(
            adapter=r.adapter,
            residual=r.residual,
            accepted=[who for who, _ in r.kept],
            rejected=r.rejected,
            train_loss=weighted_loss(losses) if losses else None,
            num_examples=sum(n for _, n in losses),
            stats=stats,
        )

    def _secure_round(
        self, server_round: int, secure: SecureMean, current: Adapter | None
    ) -> LoraAggregate:
        """The new adapter from a SecAgg+ round's weighted mean of updates.

        The server sees only the mean: no per-client bound or robust rule can
        run (config validation allows only ``mean``); what is checked is the
        total weight the nodes claimed and that the result is finite
        (:func:`strategies.secure_mean.lora_update`), else the round is refused.

        With central DP (client-side clipping and equal weights, which config
        validation requires) the survivors' sum is ``mean x survivors``, and
        the new adapter is ``current + (sum + N(0, (sigma C)^2)) / m``, ``m``
        the clients sampled, the noise drawn as the server-side path draws it.
        Under ``ffa`` (the only other rule SecAgg+ composes with) the global A
        is kept: the mean's A part is ignored (it is zero from honest clients;
        the server cannot tell who sent a non-zero one) and no noise is drawn
        for it.
        """
        if current is None:
            raise ValueError("a SecAgg+ round needs the current global adapter")
        sampled = self._sampled.get(server_round, len(secure.survivors))
        stats: dict[str, Any] = {"secagg_survivors": len(secure.survivors)}
        try:
            if self.fedavg.central is not None:
                secure, stats["noise_std"] = self._noisy_mean(
                    server_round, secure, current, sampled
                )
            adapter = lora_update(current, secure)
            if self.spec.aggregation == "ffa":  # A is frozen: its part is ignored
                adapter = {
                    k: current[k].clone() if k.endswith(_LORA_A) else t
                    for k, t in adapter.items()
                }
        except SecureMeanError as exc:
            return LoraAggregate(
                rejected={SECURE_MEAN_LABEL: str(exc), **secure.dropped}
            )
        if self.account is not None:
            stats.update(self.account.release(sampled))
        return LoraAggregate(
            adapter=adapter,
            accepted=list(secure.survivors),
            rejected=dict(secure.dropped),
            train_loss=secure_train_loss(secure),
            num_examples=round(sum(secure.weights)),
            stats=stats,
        )

    def _noisy_mean(
        self, server_round: int, secure: SecureMean, current: Adapter, sampled: int
    ) -> tuple[SecureMean, float]:
        """``secure`` with its mean replaced by the central DP release.

        ``(mean x survivors + noise) / m``: the survivors' clipped updates,
        equally weighted, summed; the noise of
        :meth:`strategies.fedavg.TensorFedAvg._central` (same generator, same
        layout order), so the release equals the server-side clipping one up
        to SecAgg+'s quantization. Returns the noise's std on the mean too.

        Raises
        ------
        SecureMeanError
            If the result is refused by :func:`check_secure_mean`, has the
            wrong length, or the weights are not all 1.
        """
        dp, seed = self.fedavg.central, self.noise_seed
        if dp is None or seed is None:
            raise ValueError("central differential privacy needs a noise seed")
        check_secure_mean(secure)
        if any(w != 1 for w in secure.weights):
            raise SecureMeanError(
                "central DP under SecAgg+ needs equal weights (federation.weighting "
                "'equal'): the sum is the mean times the survivors"
            )
        delta = unflatten(secure.mean, current)
        ffa = self.spec.aggregation == "ffa"  # noise on B only, as ffa's own path
        total = {
            k: delta[k] * len(secure.survivors)
            for k in self.fedavg.layout.names
            if not (ffa and k.endswith(_LORA_A))
        }
        std = dp.noise_multiplier * dp.clip_norm
        noise = gaussian_noise(total, std, noise_generator(seed, server_round))
        m = max(sampled, len(secure.survivors))
        noisy = np.concatenate(
            [
                ((total[k] + noise[k]) / m).flatten().numpy()
                if k in total
                else np.zeros(delta[k].numel(), dtype=np.float32)
                for k in current
            ]
        ).astype(np.float64)
        return replace(secure, mean=noisy), std / m

    def privacy_state(self) -> dict[str, Any] | None:
        """The checkpoint's privacy entry (None without DP).

        A resumed run needs it to add the same noise and report the same
        epsilon.
        """
        if self.account is None:
            return None
        return {"noise_seed": self.noise_seed, "account": self.account.state()}

    def load_privacy_state(self, state: Mapping[str, Any] | None) -> None:
        """Restore :meth:`privacy_state`.

        Raises
        ------
        ValueError
            If DP is on and ``state`` is missing or damaged, or was written
            with other privacy settings.
        """
        if self.account is None:
            return
        if not isinstance(state, Mapping) or not isinstance(
            state.get("account"), Mapping
        ):
            raise ValueError("the checkpoint holds no privacy state; was DP off then?")
        self.account.load_state(state["account"])
        if self.noise_seed is not None:
            seed = state.get("noise_seed")
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise ValueError(f"bad central noise seed in the checkpoint: {seed!r}")
            self.noise_seed = seed

    def summary(self) -> str:
        """The strategy's settings in one line."""
        family = self.spec.aggregation != "fedavg" or self.spec.client_ranks
        return (
            f"LoraFedAvg: rank={self.spec.rank} alpha={self.spec.alpha} "
            + (
                f"aggregation={self.spec.aggregation}"
                f"{'(sparsity-weighted)' if self.sparsity_weighted else ''} "
                f"client_ranks={','.join(map(str, self.spec.allowed_ranks()))} "
                if family
                else ""
            )
            + f"targets={','.join(self.spec.target_modules)} "
            f"steps={self.train.local_steps} batch={self.train.batch_size} "
            f"lr={self.train.learning_rate:g} device={self.fedavg.device} "
            f"{self.fedavg.bounds.summary()}"
            + (f" {self.dp.summary()}" if self.dp is not None else "")
            + (" (central DP clips to C)" if self.fedavg.central is not None else "")
            + (f" mu={self.train.proximal_mu:g}" if self.train.proximal_mu else "")
            + (
                f" server_opt={self.server_opt.name}(eta={self.server_opt.server_lr:g})"
                if self.server_opt is not None and self.server_opt.name != "none"
                else ""
            )
        )
