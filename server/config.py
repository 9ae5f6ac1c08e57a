"""The run configuration: one typed, frozen schema parsed once at the edge.

A run is described by a TOML file whose tables mirror :class:`RunConfig`
(``[run]``, ``[model]``, ``[data]``, ``[federation]``, ``[train]``,
``[lora]``, ``[server_opt]``, ``[zo]``, ``[split]``, ``[eval]``, ``[privacy]``,
``[attack]``) plus command-line overrides written as dotted keys
(``federation.clients=8``). Every table's fields and defaults live in
:mod:`server.config_sections` and :mod:`server.config_method_sections`
(re-exported here); this module owns the whole
run: the checks across tables, reading and writing. Parsing collects every
problem at once and raises :class:`ConfigError`, whose message names each bad
field, the value given and what is allowed.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from server.config_method_sections import (
    LoraSection,
    ServerOptSection,
    SplitSection,
    ZOSection,
)
from server.config_sections import (
    ATTACK_BEHAVIOURS,
    AttackSection,
    DataSection,
    EvalSection,
    FederationSection,
    ModelSection,
    PrivacySection,
    RunSection,
    TrainSection,
)

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
    "ServerOptSection",
    "SplitSection",
    "TrainSection",
    "ZOSection",
    "config_to_toml",
    "load_config",
    "sampled_per_round",
    "simulated_lora_ranks",
]


class ConfigError(ValueError):
    """A configuration is invalid; the message lists every offending field."""


class RunConfig(BaseModel):
    """A whole run: every table of the TOML file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    federation: FederationSection = FederationSection()
    train: TrainSection = TrainSection()
    lora: LoraSection = LoraSection()
    server_opt: ServerOptSection = ServerOptSection()
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
        problems += _edge_problems(self)
        problems += _lora_rank_problems(self)
        problems += _lora_only_problems(self)
        problems += _lora_aggregation_problems(self)
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
    """Held-out settings that exclude each other; sizes no split can meet.

    Sizes are checked here when ``data.limit`` fixes them; otherwise
    ``pollinate validate`` checks them against the data.
    """
    problems: list[str] = []
    if data.heldout_groups and data.heldout_group_count:
        problems.append(
            f"data.heldout_groups ({list(data.heldout_groups)}) and "
            f"data.heldout_group_count ({data.heldout_group_count}) exclude each "
            "other: give one"
        )
    if len(set(data.heldout_groups)) != len(data.heldout_groups):
        problems.append(
            f"data.heldout_groups {list(data.heldout_groups)} names a group twice"
        )
    if data.limit is None:
        return problems
    from corpora.examples import eval_size  # the one rule; light, no torch

    n_eval = eval_size(data.eval_examples, data.limit)
    if n_eval >= data.limit:
        return problems + [
            f"data.eval_examples ({data.eval_examples}) must be smaller than "
            f"data.limit ({data.limit}): the held-out set is taken from them"
        ]
    if data.heldout_groups or data.heldout_group_count:
        return problems  # the training set is the other groups': data decides
    train = data.limit - n_eval
    need = fed.clients * data.min_partition_size
    if train < need:
        problems.append(
            f"data.limit ({data.limit}) minus data.eval_examples "
            f"({n_eval}) leaves {train} training examples, fewer than "
            f"data.min_partition_size ({data.min_partition_size}) x "
            f"federation.clients ({fed.clients}) = {need}"
        )
    return problems


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


def _lora_rank_problems(config: RunConfig) -> list[str]:
    """Simulated clients' LoRA ranks the run does not allow (or does not use)."""
    fed, lora = config.federation, config.lora
    if not fed.lora_ranks:
        return []
    if config.run.method != "lora":
        return [
            f"federation.lora_ranks: per-client ranks are for lora, not "
            f"{config.run.method!r}"
        ]
    if len(fed.lora_ranks) > fed.clients:
        return [
            f"federation.lora_ranks has {len(fed.lora_ranks)} ranks for "
            f"{fed.clients} clients (federation.clients): give one per client "
            "or fewer, cycled"
        ]
    bad = sorted({r for r in fed.lora_ranks if r not in lora.allowed_ranks()})
    if bad:
        return [
            f"federation.lora_ranks {bad} are not allowed: lora.client_ranks "
            f"(or lora.rank) allows {list(lora.allowed_ranks())}"
        ]
    return []


def _lora_aggregation_problems(config: RunConfig) -> list[str]:
    """LoRA aggregation rules that cannot compose with the robust/DP settings.

    ``exact`` and ``flexlora`` combine each client's product ``B_i A_i``:
    only with the ``mean`` aggregator, without central DP (which releases
    only a noisy sum of factors), without SecAgg+ (the server sees only a
    sum) and without a server optimizer (their global factors are
    re-factorised each round, so a factor-space pseudo-gradient is
    meaningless). ``hetlora`` pads factors before the combine, which SecAgg+'s
    sum of unpadded updates cannot do.
    """
    if config.run.method != "lora" or config.lora.aggregation == "fedavg":
        return []
    rule = f"lora.aggregation {config.lora.aggregation!r}"
    problems: list[str] = []
    products = config.lora.aggregation in ("exact", "flexlora")
    if products and config.federation.aggregator != "mean":
        problems.append(
            f"{rule} needs federation.aggregator 'mean', not "
            f"{config.federation.aggregator!r}: it combines each client's "
            "product B_i A_i, which a robust rule of the factors does not bound"
        )
    if products and config.privacy.mode == "central":
        problems.append(
            f"{rule} cannot run with privacy.mode 'central': the products need "
            "each client's factors, central DP releases only a noisy sum"
        )
    if config.privacy.secagg and config.lora.aggregation not in ("ffa",):
        problems.append(
            f"{rule} cannot run with privacy.secagg: the server sees only the sum "
            "of the updates (SecAgg+ composes with 'fedavg' and 'ffa')"
        )
    if config.lora.sparsity_weighted and config.federation.aggregator != "mean":
        problems.append(
            "lora.sparsity_weighted needs federation.aggregator 'mean', not "
            f"{config.federation.aggregator!r}: its weights are per module"
        )
    if config.lora.sparsity_weighted and config.privacy.mode == "central":
        problems.append(
            "lora.sparsity_weighted cannot run with privacy.mode 'central': "
            "weights taken from the updates' norms would change the sum's sensitivity"
        )
    if products and config.server_opt.name != "none":
        problems.append(
            f"{rule} cannot run with server_opt.name {config.server_opt.name!r}: "
            "its adapter is re-factorised each round, so a factor-space "
            "pseudo-gradient is meaningless"
        )
    return problems


def simulated_lora_ranks(config: RunConfig) -> tuple[int, ...]:
    """Each simulated client's LoRA rank, in partition order; empty: none said.

    Client ``k`` gets ``federation.lora_ranks[k % len]``. With no
    ``federation.lora_ranks`` the clients say no rank and train ``lora.rank``.

    Raises
    ------
    ConfigError
        If no ranks are given but ``lora.client_ranks`` does not allow
        ``lora.rank`` (every client would be refused at hello).
    """
    lora = config.lora
    if config.run.method != "lora" or config.federation.lora_ranks:
        return config.federation.client_lora_ranks()
    if lora.rank not in lora.allowed_ranks():
        raise ConfigError(
            f"federation.lora_ranks is empty, so every simulated client trains "
            f"lora.rank ({lora.rank}), which lora.client_ranks "
            f"{list(lora.client_ranks)} does not allow: give federation.lora_ranks"
        )
    return ()


def _edge_problems(config: RunConfig) -> list[str]:
    """Edge clients of a method without a bundle, or that do not exist."""
    fed = config.federation
    if not fed.edge_clients and fed.edge_share == 0:
        return []
    if config.run.method not in ("fedkseed", "fedkseed-pro"):
        return [
            f"federation.edge_share/edge_clients: edge clients train "
            f"fedkseed and fedkseed-pro, not {config.run.method!r}"
        ]
    bad = [c for c in fed.edge_clients if not 0 <= c < fed.clients]
    if bad:
        return [
            f"federation.edge_clients {bad}: partition ids run from 0 to "
            f"{fed.clients - 1} (federation.clients {fed.clients})"
        ]
    if not fed.edge_clients and math.floor(fed.edge_share * fed.clients + 0.5) == 0:
        return [
            f"federation.edge_share {fed.edge_share:g} of {fed.clients} clients "
            "rounds to no edge client"
        ]
    if config.privacy.secagg:
        return [
            "federation.edge_share/edge_clients: the onnx runtime does not run "
            "SecAgg+ yet (privacy.secagg = true)"
        ]
    return []


def _lora_only_problems(config: RunConfig) -> list[str]:
    """Server optimizers and FedProx's proximal term wired for LoRA alone."""
    method = config.run.method
    if method == "lora":
        return []
    problems: list[str] = []
    if config.server_opt.name != "none":
        problems.append(
            f"server_opt.name {config.server_opt.name!r}: server optimizers "
            f"cover lora, not {method!r} (set server_opt.name 'none')"
        )
    if config.train.proximal_mu > 0:
        problems.append(
            f"train.proximal_mu {config.train.proximal_mu:g}: FedProx's proximal "
            f"term covers lora, not {method!r} (set it to 0)"
        )
    return problems


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
