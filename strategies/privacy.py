"""Client-level differential privacy: Gaussian noise and its accountant.

The mechanism is DP-FedAvg's (McMahan et al. 2018, "Learning Differentially
Private Recurrent Language Models"), as Flower's DP wrappers implement it:
every client's update is clipped to L2 norm ``C`` (``privacy.clip_norm``),
and Gaussian noise of standard deviation ``sigma * C``
(``privacy.noise_multiplier``) is added either once to the sum on the server
(``central``) or by every client to its own update (``local``).

Why not Flower's wrappers themselves
------------------------------------
``DifferentialPrivacyServerSideFixedClipping`` and its siblings wrap a
Flower ``Strategy`` whose global model is an ``ArrayRecord``, and the client
mods require messages with exactly one ``ArrayRecord`` and one
``ConfigRecord``; Pollinate's strategies and messages are neither (see
:mod:`strategies.strategy`). What is Flower's here: the noise scale
(:func:`flwr.supercore.differential_privacy.compute_stdv`) and the accountant
(:class:`flwr.serverapp.RdpAccountant`, Flower's wrapper of Google's
``dp-accounting`` RDP accountant), with Flower's ``PrivacyConfig`` and
``GaussianPrivacyEvent``. What differs, on purpose:

* **The server always clips what it sees.** Flower's client-side clipping
  variant (``privacy.clipping = "client"``) trusts each client to have
  clipped; a Pollinate server trusts no client, so it still clips every update
  it can see (an honest client's clipped update is unchanged). Only under
  SecAgg+, where it sees the sum alone, does it rely on the clients' clip,
  which is all an honest client's privacy needs (its own contribution is
  bounded by its own clip), not a bound on a hostile one.
* **Seeded noise.** Flower draws from NumPy's global generator; Pollinate draws
  from a generator seeded by ``(noise seed, round)``, so a DP run is
  reproducible and a resumed run adds the same noise. The central noise seed
  is the operator's secret (``privacy.noise_seed``, or drawn at random and
  kept in the checkpoint): it never travels, since a client that knew it
  could subtract the noise.
* **Fixed denominator.** The noisy sum is divided by the number of clients the
  round *sampled*, not the number that replied, so one client's presence
  changes the mean by at most ``C / m`` (add/remove-one sensitivity).

Accounting
----------
Node sampling is seeded from the run seed, which is not secret, so no
amplification by sampling is claimed: the accountant composes one Gaussian
mechanism per round with ``sampling_method = NO_AMPLIFICATION`` and the
add-or-remove-one-client relation. Central: noise multiplier ``sigma``
(sensitivity ``C`` of the clipped sum). Local: a client's release is its own
clipped update plus noise; two of its possible datasets can give updates
``2 C`` apart, so each round it takes part in is a Gaussian mechanism of
noise multiplier ``sigma / 2``, composed over every round (the worst case: a
client sampled each round). The reported epsilon is at ``privacy.delta``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DPSettings",
    "PrivacyAccount",
    "PrivacyBudgetExhausted",
    "gaussian_noise",
    "noise_generator",
    "noise_std",
]

Tensors = Mapping[str, torch.Tensor]


class PrivacyBudgetExhausted(RuntimeError):
    """The next round would take epsilon past ``privacy.target_epsilon``."""


@dataclass(frozen=True, slots=True)
class DPSettings:
    """A run's differential privacy settings (``[privacy]``, resolved).

    Attributes
    ----------
    mode : str
        ``"central"`` or ``"local"``.
    noise_multiplier : float
        sigma (> 0).
    clip_norm : float
        C (> 0).
    delta : float
        The delta epsilon is reported at.
    target_epsilon : float or None
        Refuse a round that would go past it.
    population : int
        Clients in the federation (``federation.clients``).
    clipping : str
        Central DP: who clips to C, ``"server"`` (Flower's server-side fixed
        clipping) or ``"client"`` (Flower's client-side fixed clipping: each
        client clips, the server still clips what it can see; what SecAgg+
        needs).
    """

    mode: str
    noise_multiplier: float
    clip_norm: float
    delta: float
    target_epsilon: float | None
    population: int
    clipping: str = "server"

    def __post_init__(self) -> None:
        if self.mode not in ("central", "local"):
            raise ValueError(f"unknown privacy mode {self.mode!r}")
        if self.clipping not in ("server", "client"):
            raise ValueError(f"unknown privacy clipping {self.clipping!r}")
        if self.clipping == "client" and self.mode != "central":
            raise ValueError("client-side clipping is a variant of central privacy")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError("privacy needs a positive, finite noise multiplier")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError("privacy needs a positive, finite clip norm")
        if not 0 < self.delta < 1.0 / self.population:
            raise ValueError(
                f"privacy delta {self.delta:g} must be in (0, 1/{self.population})"
            )

    @classmethod
    def from_config(cls, config: Any) -> DPSettings | None:
        """The settings of a ``server.config.RunConfig``; None when DP is off."""
        dp = config.privacy
        if dp.mode == "off":
            return None
        clients = config.federation.clients
        return cls(
            mode=dp.mode,
            noise_multiplier=dp.noise_multiplier,
            clip_norm=dp.clip_norm,
            delta=dp.resolved_delta(clients),
            target_epsilon=dp.target_epsilon,
            population=clients,
            clipping=dp.clipping,
        )

    @property
    def accounted_multiplier(self) -> float:
        """The noise multiplier the accountant composes (module docstring)."""
        return (
            self.noise_multiplier
            if self.mode == "central"
            else self.noise_multiplier / 2
        )

    def summary(self) -> str:
        """One line for a strategy's summary."""
        return (
            f"dp={self.mode} sigma={self.noise_multiplier:g} C={self.clip_norm:g} "
            f"delta={self.delta:g}"
            + (f" target_eps={self.target_epsilon:g}" if self.target_epsilon else "")
            + (" clipping=client" if self.clipping == "client" else "")
        )

    @property
    def client_clip(self) -> bool:
        """Whether every client is told to clip its own update to C."""
        return self.mode == "central" and self.clipping == "client"


def noise_std(settings: DPSettings, sampled: int) -> float:
    """Standard deviation of the central noise on the mean of ``sampled`` updates.

    Flower's :func:`~flwr.supercore.differential_privacy.compute_stdv`:
    ``sigma * C / m``.
    """
    from flwr.supercore.differential_privacy import compute_stdv

    return compute_stdv(settings.noise_multiplier, settings.clip_norm, sampled)


def noise_generator(
    seed: int, server_round: int, stream: str = "central"
) -> torch.Generator:
    """A CPU generator for one round's noise, from ``(seed, round, stream)``.

    The generator depends on nothing else, so the noise of a round is the same
    whether the run was resumed or not, on any device.
    """
    digest = hashlib.sha256(f"{stream}:{seed}:{server_round}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def gaussian_noise(
    like: Tensors, std: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """``N(0, std^2)`` noise shaped like ``like``, drawn in name order on the CPU.

    Drawn in float32 on the CPU (the same bits on every machine), then moved to
    each tensor's device and cast to its dtype.
    """
    out = {}
    for name, t in like.items():
        z = torch.randn(t.shape, generator=generator, dtype=torch.float32)
        out[name] = (z * std).to(device=t.device, dtype=t.dtype)
    return out


def fresh_noise_seed() -> int:
    """A secret 63-bit seed (for a central noise seed left unset)."""
    return secrets.randbits(63)


class PrivacyAccount:
    """Cumulative (epsilon, delta) of a run, by Flower's RDP accountant.

    One :meth:`spend` per released round. :meth:`state` / :meth:`load_state`
    round-trip through the checkpoint, so a resumed run reports the same
    epsilon as an uninterrupted one.
    """

    def __init__(self, settings: DPSettings) -> None:
        from flwr.serverapp import PrivacyConfig, RdpAccountant
        from flwr.supercore.privacy_accounting import (
            NeighboringRelation,
            SamplingMethod,
        )

        # dp-accounting logs, through absl, every RDP order it skips.
        logging.getLogger("absl").setLevel(logging.ERROR)
        self.settings = settings
        self._accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=settings.delta,
                population_size=settings.population,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
                max_epsilon=settings.target_epsilon,
            )
        )

    def _event(self, sampled: int) -> Any:
        from flwr.serverapp import GaussianPrivacyEvent

        return GaussianPrivacyEvent(
            noise_multiplier=self.settings.accounted_multiplier,
            sample_size=max(1, min(sampled, self.settings.population)),
            population_size=self.settings.population,
        )

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at the settings' delta (0 before any round)."""
        if self._accountant.num_releases == 0:
            return 0.0
        return self._accountant.get_epsilon(self.settings.delta)

    @property
    def rounds(self) -> int:
        """Rounds released so far."""
        return self._accountant.num_releases

    def allows(self, sampled: int) -> bool:
        """Whether a round of ``sampled`` clients stays within the target epsilon."""
        target = self.settings.target_epsilon
        return target is None or not self._accountant.would_exceed(self._event(sampled))

    def check(self, sampled: int) -> None:
        """Refuse a round that would take epsilon past the target.

        Raises
        ------
        PrivacyBudgetExhausted
            If releasing one more round of ``sampled`` clients would exceed
            ``target_epsilon``.
        """
        if not self.allows(sampled):
            raise PrivacyBudgetExhausted(
                f"privacy budget spent: one more round would take epsilon past "
                f"privacy.target_epsilon {self.settings.target_epsilon:g} "
                f"(spent {self.epsilon:.4g} at delta {self.settings.delta:g} "
                f"after {self.rounds} rounds)"
            )

    def spend(self, sampled: int) -> float:
        """Compose one released round of ``sampled`` clients; the new epsilon."""
        self._accountant.compose(self._event(sampled))
        return self.epsilon

    def release(self, sampled: int | None) -> dict[str, float]:
        """A round's privacy columns; with ``sampled``, spend that round first.

        ``sampled`` is None for a round whose aggregate was not released (it
        spends nothing). Returns ``{"epsilon", "delta"}`` for the round's stats.
        """
        if sampled is not None:
            self.spend(sampled)
        return {"epsilon": self.epsilon, "delta": self.settings.delta}

    def state(self) -> dict[str, object]:
        """JSON-able state for the checkpoint."""
        return self._accountant.state_dict()

    def load_state(self, state: Mapping[str, object]) -> None:
        """Restore :meth:`state`.

        Raises
        ------
        ValueError
            If the state is damaged or was made with other privacy settings
            (Flower checks the accounting config; the noise multiplier of
            every recorded round, which tells central from local, is checked
            here).
        """
        compositions = state.get("compositions")
        if isinstance(compositions, list):
            want = self.settings.accounted_multiplier
            for item in compositions:
                event = item.get("event", {}) if isinstance(item, dict) else {}
                got = event.get("noise_multiplier") if isinstance(event, dict) else None
                if not isinstance(got, int | float) or not math.isclose(got, want):
                    raise ValueError(
                        f"the recorded rounds were accounted with noise multiplier "
                        f"{got!r}, this run's privacy settings give {want:g}"
                    )
        self._accountant.load_state_dict(dict(state))
