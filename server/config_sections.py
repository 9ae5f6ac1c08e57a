"""The tables of a run configuration: one frozen model per TOML table.

Each model holds one table's fields, with their defaults, bounds and
descriptions, and the checks that need that table alone (``[run]`` name,
``[zo]`` adapter, ``[split]`` TLS and quotas). Checks across tables, and
reading and writing a whole configuration, live in :mod:`server.config`,
which re-exports every name here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocols.methods import LORA, get_method
from protocols.specs import lora_rank_problem

__all__ = [
    "ATTACK_BEHAVIOURS",
    "AttackBehaviour",
    "AttackSection",
    "DataSection",
    "EvalSection",
    "FederationSection",
    "LoraSection",
    "ModelSection",
    "PrivacySection",
    "RunSection",
    "ServerOptSection",
    "SplitSection",
    "TrainSection",
    "ZOSection",
]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RunSection(_Section):
    """Identity and length of the run."""

    name: str = Field(
        "pollinate",
        min_length=1,
        max_length=200,
        description="Run name, the prefix of the run folder's name (one path part).",
    )
    method: str = Field(
        LORA.name, description="Fine-tuning method (see protocols.methods)."
    )
    rounds: int = Field(5, ge=1, le=100_000, description="Federated rounds.")
    seed: int = Field(0, ge=0, description="Seed of every random draw of the run.")
    output_dir: Path = Field(
        Path("runs"), description="Folder that receives run folders."
    )

    @field_validator("method")
    @classmethod
    def _registered(cls, name: str) -> str:
        get_method(name)  # raises, listing the registered names
        return name

    @field_validator("name")
    @classmethod
    def _one_path_part(cls, name: str) -> str:
        """A run folder is ``<output_dir>/<name>-<time>``: it must stay inside.

        So a name is one ordinary path part on every platform: not blank, not
        ``.`` or ``..``, no slash or backslash (which also rules out absolute
        names), no NUL or other control character, at most 200 characters.
        """
        if not name.strip():
            raise ValueError("must not be blank")
        if name in (".", ".."):
            raise ValueError("must not be '.' or '..'")
        if "/" in name or "\\" in name:
            raise ValueError(
                "must not hold '/' or '\\': the run folder is created inside "
                "run.output_dir, named <name>-<time>"
            )
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
            raise ValueError("must not hold NUL or other control characters")
        return name


class ModelSection(_Section):
    """The base model, named as in :func:`models.load_causal_lm`."""

    name: str = Field(
        "smollm2-135m", min_length=1, description="Built-in name, HF id or path."
    )
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_length: int = Field(96, ge=16, le=8192, description="Tokens per example.")


class DataSection(_Section):
    """Where the examples come from and how clients share them."""

    source: str = Field(
        "builtin:tasks", description="'builtin:tasks' or a JSON/JSONL/CSV path."
    )
    limit: int | None = Field(
        None, ge=10, description="Use a seeded subset of this size."
    )
    eval_examples: int = Field(
        64, ge=1, description="Held-out examples for central evaluation."
    )
    partitioning: Literal["iid", "dirichlet", "task"] = "dirichlet"
    alpha: float = Field(
        0.5, gt=0, description="Dirichlet concentration (smaller = more skew)."
    )
    min_partition_size: int = Field(
        8, ge=1, description="Fewest examples a client holds."
    )


class FederationSection(_Section):
    """How many clients exist and how many train each round."""

    clients: int = Field(4, ge=1, le=100_000, description="Number of clients.")
    fraction: float = Field(
        1.0, gt=0, le=1, description="Share of clients sampled per round."
    )
    min_clients: int = Field(1, ge=1, description="Fewest clients a round samples.")
    min_replies: int = Field(
        1, ge=1, description="Fewest usable replies a round needs; fewer fails the run."
    )
    round_timeout_s: float = Field(
        900.0, gt=0, description="Seconds to wait for replies."
    )
    join_grace_s: float = Field(
        60.0,
        ge=0,
        description="Deployment: once every connected node answered the hello "
        "and fewer than `clients` were accepted (a refused label, no usable "
        "data), seconds to wait for more nodes before going on with those "
        "accepted (0 in simulation, whose nodes all exist from the start).",
    )
    max_payload_mb: float = Field(
        512.0, gt=0, description="Largest update accepted, in MB."
    )
    # How far one client can move the global model (strategies.robust).
    aggregator: Literal[
        "mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan"
    ] = Field(
        "mean",
        description="How the bounded updates are combined: weighted mean, "
        "coordinate-wise median or trimmed mean, (Multi-)Krum or Bulyan "
        "(FedKSeed: a robust statistic per seed; see strategies.robust).",
    )
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="trimmed_mean: share cut at each end."
    )
    byzantine: int = Field(
        1,
        ge=0,
        description="krum, multi_krum, bulyan: hostile clients to tolerate (f).",
    )
    krum_keep: int = Field(
        0, ge=0, description="multi_krum: updates averaged (0 = replies - f)."
    )
    clip: Literal["adaptive", "fixed", "off"] = Field(
        "adaptive",
        description="Bound on each client's update before aggregation: "
        "'adaptive' = clip_multiple x the round's median (LoRA, SFPrompt: "
        "update L2 norm; FedKSeed: each |scalar|), capped by clip_norm / "
        "zo.max_abs_grad when set; 'fixed' = those caps alone; 'off' = none.",
    )
    clip_multiple: float = Field(
        3.0, ge=1, description="adaptive clip: multiple of the round's median."
    )
    clip_norm: float | None = Field(
        None,
        gt=0,
        description="LoRA, SFPrompt: largest L2 norm of one client's update "
        "(needed by clip 'fixed', an upper cap for 'adaptive').",
    )
    weighting: Literal["examples", "equal"] = Field(
        "examples",
        description="A client's weight: its example count (capped, see "
        "weight_multiple, max_examples and the count it reported at hello) "
        "or equal weights.",
    )
    weight_multiple: float = Field(
        3.0,
        ge=1,
        description="examples: a count is capped at this multiple of the "
        "round's median count.",
    )
    max_examples: int | None = Field(
        None, ge=1, description="examples: a count is capped at this (none: no cap)."
    )
    # Simulation: some clients run the edge client (ONNX Runtime, no torch).
    edge_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Simulation, fedkseed/fedkseed-pro: share of clients that "
        "run the edge client on the run's edge bundle: round(share x clients), "
        "half up, drawn from run.seed.",
    )
    edge_clients: tuple[int, ...] = Field(
        (), description="Partition ids of the edge clients (wins over edge_share)."
    )
    lora_ranks: tuple[int, ...] = Field(
        (),
        description="Simulation, lora: the LoRA rank of each client, in "
        "partition order: one per client, or a shorter list cycled over them "
        "(client k trains lora_ranks[k % len]); each one of lora.client_ranks "
        "(or lora.rank). Empty: every client trains lora.rank.",
    )

    def client_lora_ranks(self) -> tuple[int, ...]:
        """The rank of each simulated client (partition id order); empty if unset."""
        if not self.lora_ranks:
            return ()
        n = len(self.lora_ranks)
        return tuple(self.lora_ranks[k % n] for k in range(self.clients))


class TrainSection(_Section):
    """Local training on each client."""

    local_steps: int = Field(8, ge=1, description="Optimizer steps per round.")
    batch_size: int = Field(8, ge=1, description="Examples per step.")
    learning_rate: float = Field(2e-3, gt=0, le=1, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    proximal_mu: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="FedProx's proximal weight mu (Li et al. 2020, 'Federated "
        "Optimization in Heterogeneous Networks'): each client adds (mu / 2) x "
        "||w - w_global||^2 over its trainable tensors to its loss (0 = off). "
        "LoRA only for now.",
    )


class LoraSection(_Section):
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


class ServerOptSection(_Section):
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


class ZOSection(_Section):
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
    adapter_alpha: float = Field(16.0, gt=0, description="Adapter scale numerator.")
    adapter_targets: tuple[str, ...] = Field(
        ("q_proj", "v_proj"), description="Modules that get an adapter."
    )
    adapter_seed: int = Field(
        0, ge=0, lt=1 << 63, description="Seed of the adapter's initial A."
    )

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


class SplitSection(_Section):
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


class EvalSection(_Section):
    """Central evaluation on the server after every round."""

    metric: Literal["auto", "exact_match", "rouge_l", "accuracy"] = Field(
        "auto", description="'auto': exact match for short answers, Rouge-L otherwise."
    )
    max_new_tokens: int = Field(16, ge=1, le=1024)
    batch_size: int = Field(32, ge=1)
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' = CUDA if present."
    )


class PrivacySection(_Section):
    """Client-level differential privacy (LoRA, FedKSeed; strategies.privacy)."""

    mode: Literal["off", "central", "local"] = Field(
        "off",
        description="'central': each update is clipped (see clipping) and the "
        "server adds Gaussian noise to the sum; 'local': each client clips and "
        "noises its own update.",
    )
    noise_multiplier: float = Field(
        1.0, ge=0, description="sigma: noise standard deviation / clip_norm."
    )
    clip_norm: float = Field(
        1.0,
        gt=0,
        description="C: L2 bound of one client's update (LoRA: adapter change; "
        "FedKSeed: its per-seed scalar sums).",
    )
    delta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="delta of the reported (epsilon, delta); none = "
        "1 / (10 x federation.clients).",
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="Stop before a round would take epsilon past this.",
    )
    clipping: Literal["server", "client"] = Field(
        "server",
        description="central: who clips each update to clip_norm. 'server' "
        "(Flower's server-side fixed clipping); 'client' (Flower's client-side "
        "fixed clipping: every client clips its own update, the server adds the "
        "noise and still clips every update it sees; what privacy.secagg needs).",
    )
    noise_seed: int | None = Field(
        None,
        ge=0,
        description="Central noise seed, the operator's secret (never sent to "
        "clients); none = drawn at random and kept in the checkpoint.",
    )

    secagg: bool = Field(
        False,
        description="LoRA, FedKSeed: sum the clients' updates under Flower's "
        "SecAgg+ (the server sees only the weighted mean; server.secure_aggregation).",
    )
    secagg_shares: int = Field(
        5, ge=3, description="SecAgg+ num_shares: each client's neighbours (odd)."
    )
    secagg_threshold: int = Field(
        3,
        ge=2,
        description="SecAgg+ reconstruction_threshold: live neighbours a "
        "client needs (dropouts tolerated = shares - threshold).",
    )
    secagg_clip: float = Field(
        8.0,
        gt=0,
        description="SecAgg+ clipping_range: each weighted update value is "
        "clipped to +-this before quantization (quantization step 2 x clip / 2^22).",
    )

    def resolved_delta(self, clients: int) -> float:
        """``delta``, or the default 1 / (10 x clients)."""
        return self.delta if self.delta is not None else 1.0 / (10 * clients)


AttackBehaviour = Literal[
    "none",
    "scale",
    "sign_flip",
    "gaussian",
    "constant",
    "inflate_examples",
    "label_flip",
    "shuffle_labels",
]
ATTACK_BEHAVIOURS: tuple[str, ...] = get_args(AttackBehaviour)
"""Every ``attack.behaviour`` (simulation.attacks implements them)."""


class AttackSection(_Section):
    """Simulated hostile clients (simulation only; simulation.attacks)."""

    behaviour: AttackBehaviour = Field(
        "none", description="What the malicious clients do."
    )
    fraction: float = Field(
        0.0, ge=0, le=1, description="Share of clients that are malicious."
    )
    clients: tuple[int, ...] = Field(
        (), description="Partition ids of the malicious clients (wins over fraction)."
    )
    scale: float = Field(
        1e6, description="scale: the update is multiplied by this (sign_flip: -1)."
    )
    value: float = Field(1e30, description="constant: every value of the update.")
    noise_std: float = Field(
        1.0, gt=0, description="gaussian: std of the noise the update is replaced by."
    )
    examples: int = Field(
        2**62, ge=1, le=2**63 - 1, description="inflate_examples: the count claimed."
    )
