"""The tables of a run configuration: one frozen model per TOML table.

Each model holds one table's fields, with their defaults, bounds and
descriptions, and the checks that need that table alone (``[run]`` name,
``[zo]`` adapter, ``[split]`` TLS and quotas). Checks across tables, and
reading and writing a whole configuration, live in :mod:`server.config`,
which re-exports every name here. The tables of the methods (``[lora]``,
``[server_opt]``, ``[zo]``, ``[split]``) are in
:mod:`server.config_method_sections`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocols.methods import LORA, get_method
from server.tracking import TrackerName, tracker_problem, tracking_uri_problem

__all__ = [
    "ATTACK_BEHAVIOURS",
    "AttackBehaviour",
    "AttackSection",
    "DataSection",
    "EvalSection",
    "FederationSection",
    "ModelSection",
    "PrivacySection",
    "RunSection",
    "TrainSection",
]


class Section(BaseModel):
    """A TOML table: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class RunSection(Section):
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
    tracking: tuple[TrackerName, ...] = Field(
        (),
        description="Trackers that also log each metrics row, offline, into the "
        "run folder's tracking/: tensorboard, mlflow (server.tracking).",
    )
    tracking_uri: str | None = Field(
        None,
        description="One MLflow store for many runs, so one MLflow UI compares "
        "them: sqlite:////absolute/path.db or an MLflow server http(s)://host:port. "
        "Default: each run folder's own tracking/mlflow.db. Needs 'mlflow' in "
        "tracking.",
    )

    @field_validator("tracking")
    @classmethod
    def _trackers(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        """No repeats; each tracker's library installed (the error names the extra)."""
        problem = tracker_problem(names)
        if problem is not None:
            raise ValueError(problem)
        return names

    @field_validator("tracking_uri")
    @classmethod
    def _store(cls, uri: str | None) -> str | None:
        """A SQLite file in an existing folder, or an http(s) MLflow server."""
        problem = None if uri is None else tracking_uri_problem(uri)
        if problem is not None:
            raise ValueError(problem)
        return uri

    @model_validator(mode="after")
    def _store_needs_mlflow(self) -> RunSection:
        if self.tracking_uri is not None and "mlflow" not in self.tracking:
            raise ValueError(
                f"tracking_uri {self.tracking_uri!r} is for MLflow, but tracking "
                f"{list(self.tracking)} does not list mlflow"
            )
        return self

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


class ModelSection(Section):
    """The base model, named as in :func:`models.load_causal_lm`."""

    name: str = Field(
        "smollm2-135m", min_length=1, description="Built-in name, HF id or path."
    )
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_length: int | Literal["auto"] = Field(
        "auto",
        description="Tokens per example; 'auto': when the run is prepared, the "
        "smallest multiple of 32 that fits 99% of its examples, in [64, 1024] "
        "(the run folder's config.toml holds the number).",
    )

    @field_validator("max_length", mode="before")
    @classmethod
    def _max_length(cls, value: object) -> object:
        """'auto' or an integer in [16, 8192], refused in one message."""
        if value == "auto" or (type(value) is int and 16 <= value <= 8192):
            return value
        raise ValueError("must be 'auto' or an integer from 16 to 8192")


class DataSection(Section):
    """Where the examples come from and how clients share them."""

    source: str = Field(
        "builtin:tasks", description="'builtin:tasks' or a JSON/JSONL/CSV path."
    )
    limit: int | None = Field(
        None, ge=10, description="Use a seeded subset of this size."
    )
    eval_examples: int | None = Field(
        None,
        ge=1,
        description="Held-out examples for central evaluation; unset: "
        "min(256, a quarter of the examples), fixed when the run is prepared.",
    )
    heldout_groups: tuple[str, ...] = Field(
        (),
        description="Groups (NI tasks, Dolly categories) held out whole: no "
        "client trains on them and the evaluation set is drawn from them alone.",
    )
    heldout_group_count: int = Field(
        0,
        ge=0,
        description="Hold out this many groups, drawn with run.seed "
        "(exclusive with heldout_groups).",
    )
    partitioning: Literal["iid", "dirichlet", "task"] = "dirichlet"
    alpha: float = Field(
        0.5, gt=0, description="Dirichlet concentration (smaller = more skew)."
    )
    min_partition_size: int = Field(
        8, ge=1, description="Fewest examples a client holds."
    )


class FederationSection(Section):
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


class TrainSection(Section):
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


class EvalSection(Section):
    """Central evaluation on the server: round 0, every ``every`` rounds, the last."""

    metric: Literal[
        "auto", "exact_match", "rouge_l", "rouge_l_fedkseed", "accuracy"
    ] = Field(
        "auto",
        description="'auto': exact match for short answers, Rouge-L otherwise. "
        "'rouge_l': the rouge-score package's Rouge-L F on the whole answer "
        "(Super-NaturalInstructions); 'rouge_l_fedkseed': the rouge 1.0.1 "
        "package's, as FedKSeed's code scores.",
    )
    every: int = Field(
        1,
        ge=1,
        description="Evaluate rounds that are multiples of this, plus round 0 and "
        "the last round (also one the privacy budget makes the last); other "
        "rounds' eval fields are null.",
    )
    max_new_tokens: int = Field(16, ge=1, le=1024)
    batch_size: int = Field(32, ge=1)
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' = CUDA if present."
    )


class PrivacySection(Section):
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


class AttackSection(Section):
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
