"""The run configuration: one typed, frozen schema parsed once at the edge.

A run is described by a TOML file whose tables mirror :class:`RunConfig`
(``[run]``, ``[model]``, ``[data]``, ``[federation]``, ``[train]``,
``[lora]``, ``[zo]``, ``[split]``, ``[eval]``, ``[privacy]``, ``[attack]``) plus command-line overrides written as dotted keys
(``federation.clients=8``). Every default lives here. Parsing collects every
problem at once and raises :class:`ConfigError`, whose message names each bad
field, the value given and what is allowed.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from protocols.methods import LORA, get_method

__all__ = [
    "ConfigError",
    "DataSection",
    "ATTACK_BEHAVIOURS",
    "AttackSection",
    "EvalSection",
    "FederationSection",
    "LoraSection",
    "ModelSection",
    "PrivacySection",
    "RunConfig",
    "RunSection",
    "SplitSection",
    "TrainSection",
    "ZOSection",
    "config_to_toml",
    "load_config",
    "sampled_per_round",
]


class ConfigError(ValueError):
    """A configuration is invalid; the message lists every offending field."""


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


class TrainSection(_Section):
    """Local training on each client."""

    local_steps: int = Field(8, ge=1, description="Optimizer steps per round.")
    batch_size: int = Field(8, ge=1, description="Examples per step.")
    learning_rate: float = Field(2e-3, gt=0, le=1, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")


class LoraSection(_Section):
    """LoRA adapter shape."""

    rank: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = Field(("q_proj", "v_proj"), min_length=1)


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


class RunConfig(_Section):
    """A whole run: every table of the TOML file."""

    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    federation: FederationSection = FederationSection()
    train: TrainSection = TrainSection()
    lora: LoraSection = LoraSection()
    zo: ZOSection = ZOSection()
    split: SplitSection = SplitSection()
    eval: EvalSection = EvalSection()
    privacy: PrivacySection = PrivacySection()
    attack: AttackSection = AttackSection()

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        """Settings that are each valid but cannot work together, all at once."""
        problems = _federation_problems(self.federation)
        problems += _data_problems(self.data, self.federation)
        problems += _robust_problems(self)
        problems += _privacy_problems(self)
        problems += _attack_problems(self.attack, self.federation)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def sampled_per_round(federation: FederationSection) -> int:
    """How many clients a round samples from a full federation.

    The count :func:`strategies.sampling.sample_nodes` draws, from the one
    place that computes it (:func:`strategies.sampling.round_size`).
    """
    from strategies.sampling import round_size  # numpy: not at CLI start

    return round_size(
        federation.clients,
        fraction=federation.fraction,
        min_nodes=federation.min_clients,
    )


def _federation_problems(fed: FederationSection) -> list[str]:
    """Federation settings that no round can satisfy."""
    if fed.min_clients > fed.clients:
        return [
            f"federation.min_clients ({fed.min_clients}) exceeds "
            f"federation.clients ({fed.clients})"
        ]
    sampled = sampled_per_round(fed)
    if fed.min_replies > sampled:
        return [
            f"federation.min_replies ({fed.min_replies}) exceeds the {sampled} "
            f"clients a round samples (federation.clients {fed.clients}, "
            f"federation.fraction {fed.fraction}, federation.min_clients "
            f"{fed.min_clients}): every round would fail"
        ]
    return []


def _data_problems(data: DataSection, fed: FederationSection) -> list[str]:
    """Data sizes that cannot be split as configured (``data.limit`` known)."""
    if data.limit is None:
        return []  # the data's own size is checked by ``pollinate validate``
    if data.eval_examples >= data.limit:
        return [
            f"data.eval_examples ({data.eval_examples}) must be smaller than "
            f"data.limit ({data.limit}): the held-out set is taken from them"
        ]
    train = data.limit - data.eval_examples
    need = fed.clients * data.min_partition_size
    if train < need:
        return [
            f"data.limit ({data.limit}) minus data.eval_examples "
            f"({data.eval_examples}) leaves {train} training examples, fewer than "
            f"data.min_partition_size ({data.min_partition_size}) x "
            f"federation.clients ({fed.clients}) = {need}"
        ]
    return []


def _robust_problems(config: RunConfig) -> list[str]:
    """Bounds that cannot be computed as configured."""
    fed, problems = config.federation, []
    if fed.clip == "fixed":
        if config.run.method in ("fedkseed", "fedkseed-pro"):
            if config.zo.max_abs_grad is None:
                problems.append(
                    "federation.clip 'fixed' needs zo.max_abs_grad for "
                    f"{config.run.method} (the largest |scalar gradient| kept)"
                )
        elif fed.clip_norm is None:
            problems.append(
                "federation.clip 'fixed' needs federation.clip_norm (the largest "
                "L2 norm of one client's update)"
            )
    sampled = sampled_per_round(fed)
    if fed.aggregator == "bulyan" and sampled < 4 * fed.byzantine + 3:
        problems.append(
            f"federation.aggregator 'bulyan' needs at least 4 x byzantine + 3 = "
            f"{4 * fed.byzantine + 3} clients per round, a round samples {sampled}"
        )
    if fed.aggregator == "multi_krum" and fed.krum_keep > sampled:
        problems.append(
            f"federation.krum_keep ({fed.krum_keep}) exceeds the {sampled} clients "
            "a round samples"
        )
    return problems


def _privacy_problems(config: RunConfig) -> list[str]:
    """Differential privacy and secure aggregation settings that make no sense."""
    dp, fed = config.privacy, config.federation
    problems = _secagg_problems(config)
    if dp.clipping == "client" and dp.mode != "central":
        problems.append(
            f"privacy.clipping 'client' is a variant of privacy.mode 'central', "
            f"not {dp.mode!r}"
        )
    if dp.mode == "off":
        return problems
    if config.run.method not in ("lora", "fedkseed", "fedkseed-pro"):
        problems.append(
            f"privacy.mode {dp.mode!r}: differential privacy covers lora, fedkseed "
            f"and fedkseed-pro, not {config.run.method!r} (split learning sends "
            "activations every step)"
        )
    if dp.noise_multiplier == 0:
        problems.append(
            f"privacy.noise_multiplier is 0 with privacy.mode {dp.mode!r}"
            + (
                f" and target_epsilon {dp.target_epsilon:g}"
                if dp.target_epsilon
                else ""
            )
            + ": without noise epsilon is infinite (set privacy.mode 'off')"
        )
    delta = dp.resolved_delta(fed.clients)
    if delta >= 1.0 / fed.clients:
        problems.append(
            f"privacy.delta ({delta:g}) must be below 1 / federation.clients "
            f"({1.0 / fed.clients:g}): a larger delta allows releasing a whole "
            "client's update"
        )
    if dp.mode == "central" and fed.aggregator != "mean":
        problems.append(
            f"privacy.mode 'central' needs federation.aggregator 'mean', not "
            f"{fed.aggregator!r}: the noise is calibrated to a clipped sum"
        )
    return problems


SECAGG_QUANTIZATION = 1 << 22
"""SecAgg+ quantization range (Flower's default), values per coordinate."""
SECAGG_MODULUS = 1 << 32
"""SecAgg+ modulus range (Flower's default): sums of quantized values wrap at it."""


def _secagg_problems(config: RunConfig) -> list[str]:
    """Secure aggregation needs a mean, and a sum that cannot wrap around."""
    dp, fed = config.privacy, config.federation
    if not dp.secagg:
        return []
    problems = []
    if config.run.method not in ("lora", "fedkseed", "fedkseed-pro"):
        problems.append(
            f"privacy.secagg covers lora, fedkseed and fedkseed-pro, not "
            f"{config.run.method!r}"
        )
    if fed.aggregator != "mean":
        problems.append(
            f"privacy.secagg needs federation.aggregator 'mean', not "
            f"{fed.aggregator!r}: a robust rule needs each update, the server sees "
            "only their sum"
        )
    central = dp.mode == "central"
    if central and dp.clipping != "client":
        problems.append(
            "privacy.secagg with privacy.mode 'central' needs privacy.clipping "
            "'client': the server cannot clip updates it never sees"
        )
    if central and fed.weighting != "equal":
        problems.append(
            "privacy.secagg with privacy.mode 'central' needs federation.weighting "
            f"'equal', not {fed.weighting!r}: the noise is calibrated to a sum, "
            "which equal weights recover from the mean"
        )
    if central and dp.clip_norm > dp.secagg_clip:
        problems.append(
            f"privacy.secagg with privacy.mode 'central': privacy.clip_norm "
            f"({dp.clip_norm:g}) must be <= privacy.secagg_clip "
            f"({dp.secagg_clip:g}), or SecAgg+ clips a clipped update again"
        )
    sampled = sampled_per_round(fed)
    if sampled * SECAGG_QUANTIZATION >= SECAGG_MODULUS:
        problems.append(
            f"privacy.secagg: {sampled} clients per round overflow the SecAgg+ "
            f"modulus (at most {SECAGG_MODULUS // SECAGG_QUANTIZATION - 1})"
        )
    if dp.secagg_threshold >= dp.secagg_shares:
        problems.append(
            f"privacy.secagg_threshold ({dp.secagg_threshold}) must be below "
            f"privacy.secagg_shares ({dp.secagg_shares}) (Flower's SecAgg+)"
        )
    if config.run.method in ("fedkseed", "fedkseed-pro") and not central:
        # Central DP: each client clips its per-seed vector to clip_norm
        # itself, which bounds every value (checked above).
        cap = config.zo.max_abs_grad
        need = None if cap is None else config.train.local_steps * cap
        if need is None or dp.secagg_clip < need:
            problems.append(
                "privacy.secagg with FedKSeed needs zo.max_abs_grad and "
                "privacy.secagg_clip >= train.local_steps x zo.max_abs_grad "
                f"({'unset' if need is None else f'{need:g}'}): a per-seed sum "
                "beyond the clip is silently clipped by SecAgg+"
            )
    if dp.secagg_threshold > sampled:
        problems.append(
            f"privacy.secagg_threshold ({dp.secagg_threshold}) exceeds the {sampled} "
            "clients a round samples: no round could unmask"
        )
    return problems


def _attack_problems(attack: AttackSection, fed: FederationSection) -> list[str]:
    """Malicious clients that do not exist."""
    bad = [c for c in attack.clients if not 0 <= c < fed.clients]
    if bad:
        return [
            f"attack.clients {bad}: partition ids run from 0 to "
            f"{fed.clients - 1} (federation.clients {fed.clients})"
        ]
    return []


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {dotted!r} must look like 'section.field'")
    section, key = parts
    node = tree.setdefault(section, {})
    if not isinstance(node, dict):
        raise ConfigError(f"override key {dotted!r}: '{section}' is not a table")
    node[key] = value


def _format_errors(exc: ValidationError, origin: str) -> str:
    """Every problem on one line: ``origin: N invalid setting(s): a: ...; b: ...``."""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        given = err.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        msg = err["msg"].removeprefix("Value error, ")
        problems.append(f"{loc}: {msg}{shown}" if loc else msg)
    return f"{origin}: {exc.error_count()} invalid setting(s): " + "; ".join(problems)


def _read_toml(path: Path) -> dict[str, Any]:
    """The TOML file's tables; every way it cannot be read is a ConfigError."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a TOML config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
            f"{exc.start}); a TOML file is UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(
    path: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> RunConfig:
    """Parse a TOML file (or the defaults) and apply dotted-key overrides.

    Parameters
    ----------
    path : Path, optional
        A TOML file; ``None`` starts from the defaults.
    overrides : Mapping[str, Any], optional
        ``{"section.field": value}``; these win over the file.

    Raises
    ------
    ConfigError
        On a missing or unparsable file, a bad override key, or invalid values
        (all of them listed, each with its field).
    """
    tree: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        tree = _read_toml(Path(path))
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin)) from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    # TOML basic strings cannot hold control characters raw: escape them.
    text = "".join(
        f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in text
    )
    return f'"{text}"'


def config_to_toml(config: RunConfig) -> str:
    """Write a config as TOML that :func:`load_config` reads back to an equal config."""
    out: list[str] = []
    for section, values in config.model_dump(mode="json").items():
        out.append(f"[{section}]")
        out.extend(
            f"{key} = {_toml_value(value)}"
            for key, value in values.items()
            if value is not None
        )
        out.append("")
    return "\n".join(out)
