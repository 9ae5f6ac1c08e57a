"""The tables of the methods' settings: ``[lora]``, ``[server_opt]``, ``[zo]``, ``[split]``.

One frozen model per TOML table, like :mod:`server.config_sections` (which
holds the run-wide tables); :mod:`server.config` re-exports every name here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from protocols.specs import lora_rank_problem
from server.config_sections import Section

__all__ = ["LoraSection", "ServerOptSection", "SplitSection", "ZOSection"]


class LoraSection(Section):
    """LoRA adapter shape, the ranks clients may train and how they are combined."""

    rank: int = Field(
        8,
        ge=1,
        le=1024,
        description="Global rank r_max: the server's adapter has it, and so "
        "does every client unless client_ranks allows others.",
    )
    alpha: float = Field(
        16.0,
        gt=0,
        description="Scaling numerator shared by every rank: a rank-r adapter's "
        "update is (alpha / r) B A.",
    )
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = Field(("q_proj", "v_proj"), min_length=1)
    client_ranks: tuple[int, ...] = Field(
        (),
        description="Ranks a client may train (sorted, distinct, each in "
        "1..rank); empty: rank alone. Mixed ranks need aggregation 'hetlora' "
        "or 'flexlora'. A node says its rank with `pollinate client join "
        "--lora-rank N` (none: rank); simulated nodes get federation.lora_ranks.",
    )
    aggregation: Literal["fedavg", "exact", "ffa", "hetlora", "flexlora"] = Field(
        "fedavg",
        description="How the server combines adapters: 'fedavg' (mean of A and "
        "of B), 'exact' (FedEx-LoRA), 'ffa' (FFA-LoRA: A frozen), 'hetlora' "
        "(zero-padding to rank), 'flexlora' (SVD of the mean update).",
    )
    sparsity_weighted: bool = Field(
        False,
        description="hetlora only: HetLoRA's sparsity-weighted aggregation (Cho "
        "et al. 2024): per module, each client's weight is multiplied by the "
        "Frobenius norm of its update (alpha/r) B A, then renormalised; off: plain "
        "zero-padding average. Needs federation.aggregator 'mean', no central DP.",
    )

    @model_validator(mode="after")
    def _ranks_fit(self) -> LoraSection:
        problem = lora_rank_problem(self.rank, self.client_ranks, self.aggregation)
        if problem is not None:
            raise ValueError(problem)
        if self.sparsity_weighted and self.aggregation != "hetlora":
            raise ValueError(
                "lora.sparsity_weighted is HetLoRA's weighting: it needs "
                f"lora.aggregation 'hetlora', not {self.aggregation!r}"
            )
        return self

    def allowed_ranks(self) -> tuple[int, ...]:
        """The ranks a client may train: ``client_ranks``, or ``(rank,)``."""
        return self.client_ranks or (self.rank,)


class ServerOptSection(Section):
    """A server optimizer on the round's aggregate (strategies.server_opt); LoRA.

    The aggregate the round released (bounded, robustly combined, DP-noised,
    or SecAgg+'s mean) gives the pseudo-gradient ``aggregate - global`` and
    the server takes one optimizer step with Flower's update rules (Reddi et
    al. 2021, 'Adaptive Federated Optimization': FedAdam, FedYogi, FedAdagrad;
    Hsu et al. 2019: FedAvgM). With central DP the step is post-processing of
    the private release, so the privacy guarantee is unchanged.
    """

    name: Literal["none", "fedadam", "fedyogi", "fedadagrad", "fedavgm"] = Field(
        "none",
        description="'none' keeps the aggregate (FedAvg); fedadam, fedyogi, "
        "fedadagrad (Reddi et al. 2021), fedavgm (Hsu et al. 2019).",
    )
    eta: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Server learning rate; none = the optimizer's default "
        "(1e-2 fedadam/fedyogi/fedadagrad, 1.0 fedavgm).",
    )
    beta_1: float = Field(
        0.9, ge=0, lt=1, description="fedadam, fedyogi: first-moment decay."
    )
    beta_2: float = Field(
        0.99, ge=0, lt=1, description="fedadam, fedyogi: second-moment decay."
    )
    tau: float = Field(
        1e-3,
        gt=0,
        allow_inf_nan=False,
        description="fedadam, fedyogi, fedadagrad: adaptivity (Reddi et al.: 1e-3).",
    )
    momentum: float = Field(
        0.9, ge=0, lt=1, description="fedavgm: server momentum (Hsu et al.: 0.9)."
    )


class ZOSection(Section):
    """Seed-based zeroth-order tuning (FedKSeed, FedKSeed-Pro); paper defaults."""

    num_seeds: int = Field(4096, ge=1, le=1 << 20, description="K, candidate seeds.")
    eps: float = Field(5e-4, gt=0, description="Perturbation scale.")
    learning_rate: float = Field(3e-7, gt=0, description="eta of w -= eta * g * z.")
    include: tuple[str, ...] = Field(
        (), description="Globs of perturbed parameter names (empty = all)."
    )
    grad_clip: float = Field(1000.0, gt=0, description="Clip of |g| in Pro statistics.")
    max_abs_grad: float | None = Field(
        None,
        gt=0,
        description="Largest |scalar gradient| aggregated (needed by "
        "federation.clip 'fixed', an upper cap for 'adaptive').",
    )
    adapter_rank: int = Field(
        0,
        ge=0,
        le=256,
        description="Rank of a LoRA adapter whose A and B are the perturbed "
        "parameters (0 = perturb the base model's, all or zo.include).",
    )
    adapter_alpha: float = Field(
        16.0,
        gt=0,
        description="Adapter scale numerator; unset: 2 x zo.adapter_rank (scale "
        "alpha / r = 2 at every rank, the measured setting).",
    )
    adapter_targets: tuple[str, ...] = Field(
        ("q_proj", "v_proj"), description="Modules that get an adapter."
    )
    adapter_seed: int = Field(
        0, ge=0, lt=1 << 63, description="Seed of the adapter's initial A."
    )

    @model_validator(mode="before")
    @classmethod
    def _alpha_follows_rank(cls, data: Any) -> Any:
        """Unset ``adapter_alpha`` is twice the rank: the adapter's scale stays 2.

        A fixed 16 would scale a rank-2 adapter by 8, and its steps by as much.
        """
        if isinstance(data, dict) and "adapter_alpha" not in data:
            rank = data.get("adapter_rank")
            if isinstance(rank, int) and not isinstance(rank, bool) and rank > 0:
                return {**data, "adapter_alpha": 2.0 * rank}
        return data

    @model_validator(mode="after")
    def _adapter_fits(self) -> ZOSection:
        if self.adapter_rank == 0:
            return self
        problems = []
        if self.include:
            problems.append(
                f"zo.include ({list(self.include)}) cannot be combined with "
                f"zo.adapter_rank {self.adapter_rank}: with an adapter only its "
                "A and B matrices are perturbed"
            )
        if not self.adapter_targets or not all(self.adapter_targets):
            problems.append(
                f"zo.adapter_targets ({list(self.adapter_targets)}) must name at "
                f"least one module when zo.adapter_rank is {self.adapter_rank}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class SplitSection(Section):
    """Split learning (SFPrompt): where the model is cut, what the device trains."""

    num_prompts: int = Field(8, ge=1, le=4096, description="Soft prompt vectors.")
    client_blocks: int = Field(
        0, ge=0, description="Decoder blocks kept on the device."
    )
    tail: Literal["norm", "norm+head"] = Field(
        "norm+head", description="Train the final norm and LM head, or the norm only."
    )
    gamma: float = Field(0.5, gt=0, le=1, description="Share of examples kept by EL2N.")
    local_loss_steps: int = Field(2, ge=0, description="Local-loss steps per round.")
    host: str = Field("127.0.0.1", description="Interface the trunk service binds.")
    port: int = Field(0, ge=0, le=65535, description="Trunk service port (0 = free).")
    max_message_mb: float = Field(64.0, gt=0, description="Largest trunk message, MB.")
    tls_certfile: Path | None = Field(
        None, description="Trunk TLS certificate chain (PEM)."
    )
    tls_keyfile: Path | None = Field(None, description="Trunk TLS private key (PEM).")
    tls_ca_certfile: Path | None = Field(
        None, description="CA that signed the certificate, sent to devices (PEM)."
    )
    # Trunk quotas (defaults = server.trunk_sessions.TrunkLimits, where the
    # table explains each) and its gRPC pool (server.trunk_service).
    max_sessions: int = Field(64, ge=1, description="Open trunk sessions in all.")
    sessions_per_node: int = Field(2, ge=1, description="Open sessions per node.")
    pending_per_node: int = Field(
        1, ge=1, description="Graphs per node awaiting their Backward."
    )
    calls_per_node: int = Field(2, ge=1, description="Calls per node served at once.")
    node_memory_mb: float = Field(
        2048.0, gt=0, description="Activation memory one node may hold, MiB."
    )
    memory_budget_mb: float = Field(
        6144.0, gt=0, description="Activation memory of all sessions, MiB."
    )
    idle_timeout_s: float = Field(
        120.0, gt=0, description="Close a session unused this long, seconds."
    )
    pending_timeout_s: float = Field(
        60.0, gt=0, description="Free a graph whose Backward is this late, seconds."
    )
    workers: int = Field(32, ge=1, description="Trunk threads (= concurrent calls).")
    max_concurrent_streams: int = Field(
        4, ge=1, description="Calls one connection may have open at once."
    )
    max_connection_age_s: float = Field(
        600.0, gt=0, description="Connections are recycled after this, seconds."
    )

    @model_validator(mode="after")
    def _tls_all_or_nothing(self) -> SplitSection:
        given = [self.tls_certfile, self.tls_keyfile, self.tls_ca_certfile]
        if any(given) and not all(given):
            raise ValueError(
                "split.tls_certfile, split.tls_keyfile and split.tls_ca_certfile "
                "go together: give all three or none"
            )
        if self.node_memory_mb > self.memory_budget_mb:
            raise ValueError(
                f"split.node_memory_mb ({self.node_memory_mb:g}) exceeds "
                f"split.memory_budget_mb ({self.memory_budget_mb:g})"
            )
        if self.max_concurrent_streams > self.workers:
            raise ValueError(
                f"split.max_concurrent_streams ({self.max_concurrent_streams}) "
                f"exceeds split.workers ({self.workers})"
            )
        return self
