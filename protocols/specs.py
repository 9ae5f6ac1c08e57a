"""Method specs: the settings both sides must agree on, versioned and checked.

A spec is a frozen dataclass with a schema version and a fingerprint. The
server sends it with every round inside a ``ConfigRecord``; the client rebuilds
it with ``from_config_record``, which rejects unknown keys, missing keys, wrong
types, out-of-range values, an unsupported schema version, and a fingerprint
that does not match the fields (a corrupted or hand-edited spec).

:class:`LoraSpec` describes a LoRA federation; :class:`ZOSpec` a seed-based
zeroth-order (FedKSeed) federation; :class:`SplitSpec` the split point of a
split-learning (SFPrompt) federation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from flwr.app import ConfigRecord

from protocols.errors import ProtocolError, SpecMismatchError

__all__ = [
    "LORA_AGGREGATIONS",
    "LORA_SAME_RANK_AGGREGATIONS",
    "LoraSpec",
    "SplitSpec",
    "ZOSpec",
    "lora_rank_problem",
]

_FINGERPRINT_KEY = "fingerprint"
_SCHEMA_KEY = "schema-version"
_DTYPES = ("float32", "float16", "bfloat16")

S = TypeVar("S", bound="_Spec")


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Check a wire value against a field's declared type."""
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"{where} must be an int, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProtocolError(f"{where} must be a float, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ProtocolError(f"{where} must be a str, got {value!r}")
        return value
    if kind == tuple[str, ...]:
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, str) for v in value
        ):
            raise ProtocolError(f"{where} must be a list of str, got {value!r}")
        return tuple(value)
    if kind == tuple[int, ...]:
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ProtocolError(f"{where} must be a list of int, got {value!r}")
        return tuple(value)
    raise ProtocolError(f"{where} has an unsupported type {kind!r}")  # pragma: no cover


class _Spec:
    """Wire encoding shared by all specs (int/float/str/tuple[str]/tuple[int] fields)."""

    SCHEMA_VERSION: ClassVar[int]
    KIND: ClassVar[str]
    # Fields added after the schema version shipped: left out of the record
    # and the fingerprint while at their default, so records and fingerprints
    # of specs that do not use them are those of the earlier revision.
    LATE_FIELDS: ClassVar[frozenset[str]] = frozenset()
    # Declared, not set: @dataclass sets it on each spec. Declaring it makes a
    # spec a typeshed ``DataclassInstance``, which dataclasses.fields() takes.
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def _fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name not in self.LATE_FIELDS or v != f.default:
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of the kind, schema version and every field."""
        text = json.dumps(
            [self.KIND, self.SCHEMA_VERSION, self._fields()], sort_keys=True
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_config_record(self) -> ConfigRecord:
        """Encode for the wire, with schema version and fingerprint."""
        record = ConfigRecord(self._fields())
        record[_SCHEMA_KEY] = self.SCHEMA_VERSION
        record[_FINGERPRINT_KEY] = self.fingerprint()
        return record

    @classmethod
    def from_config_record(cls: type[S], record: Mapping[str, Any]) -> S:
        """Decode and validate a spec received from the wire.

        Raises
        ------
        SpecMismatchError
            On an unsupported schema version or a fingerprint that does not
            match the fields.
        ProtocolError
            On unknown or missing keys, wrong types or bad values.
        """
        data = dict(record)
        version = data.pop(_SCHEMA_KEY, None)
        if version != cls.SCHEMA_VERSION:
            raise SpecMismatchError(
                f"{cls.KIND} spec schema version {version!r} is not supported "
                f"(this side speaks {cls.SCHEMA_VERSION})"
            )
        fingerprint = data.pop(_FINGERPRINT_KEY, None)
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = set(data) - set(names)
        if unknown:
            raise ProtocolError(f"{cls.KIND} spec has unknown keys {sorted(unknown)}")
        missing = set(names) - set(data) - cls.LATE_FIELDS
        if missing:
            raise ProtocolError(f"{cls.KIND} spec lacks keys {sorted(missing)}")
        values = {
            n: _coerce(data[n], hints[n], f"{cls.KIND} spec field '{n}'")
            for n in names
            if n in data
        }
        spec = cls(**values)
        if fingerprint != spec.fingerprint():
            raise SpecMismatchError(
                f"{cls.KIND} spec fingerprint {fingerprint!r} does not match its "
                f"fields ({spec.fingerprint()}): the spec was altered in transit"
            )
        return spec


def _require(ok: bool, kind: str, field: str, value: Any, rule: str) -> None:
    if not ok:
        raise ProtocolError(f"{kind}.{field} must be {rule}, got {value!r}")


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


LORA_AGGREGATIONS = ("fedavg", "exact", "ffa", "hetlora", "flexlora")
"""The LoRA aggregation rules a spec may name (``strategies.lora_rules.RULES``)."""

LORA_SAME_RANK_AGGREGATIONS = ("fedavg", "exact", "ffa")
"""Rules that need every client at the global rank (mixed ranks: hetlora, flexlora)."""


def lora_rank_problem(
    rank: int, client_ranks: tuple[int, ...], aggregation: str
) -> str | None:
    """Why these LoRA rank settings cannot work together, or None if they can.

    ``client_ranks`` (the ranks clients may train; empty: ``rank`` alone)
    must be distinct, sorted and each in ``1..rank``; ``aggregation`` one of
    :data:`LORA_AGGREGATIONS`, and one of :data:`LORA_SAME_RANK_AGGREGATIONS`
    only if every client trains ``rank``. The spec and the run config both ask
    here; the message names the config keys.
    """
    if aggregation not in LORA_AGGREGATIONS:
        return f"lora.aggregation {aggregation!r} is not one of {LORA_AGGREGATIONS}"
    if list(client_ranks) != sorted(set(client_ranks)):
        return f"lora.client_ranks {list(client_ranks)} must be sorted and distinct"
    bad = [r for r in client_ranks if not 1 <= r <= rank]
    if bad:
        return f"lora.client_ranks {bad} must each be in 1..lora.rank ({rank})"
    mixed = bool(client_ranks) and tuple(client_ranks) != (rank,)
    if mixed and aggregation in LORA_SAME_RANK_AGGREGATIONS:
        return (
            f"lora.aggregation {aggregation!r} needs every client at lora.rank "
            f"({rank}), but lora.client_ranks is {list(client_ranks)}: mixed ranks "
            "need 'hetlora' or 'flexlora'"
        )
    return None


@dataclass(frozen=True, slots=True)
class LoraSpec(_Spec):
    """What a LoRA federation agrees on.

    Attributes
    ----------
    model : str
        Base model name (a built-in alias, a Hugging Face id or a local path).
    model_dtype : str
        Dtype the base model and adapters are held in ("float32", "bfloat16", ...).
    rank : int
        LoRA rank r (> 0).
    alpha : float
        LoRA scaling numerator; the update is scaled by alpha / r.
    dropout : float
        Dropout on the LoRA input, in [0, 1).
    target_modules : tuple[str, ...]
        Names of the linear modules that get adapters.
    max_length : int
        Token budget of one example (prompt plus response).
    client_ranks : tuple[int, ...]
        The ranks clients may train (sorted, distinct, each in ``1..rank``);
        empty: ``rank`` alone. ``rank`` stays the global rank ``r_max`` the
        server's adapter has.
    aggregation : str
        How the server combines adapters (:data:`LORA_AGGREGATIONS`); the
        same-rank rules (:data:`LORA_SAME_RANK_AGGREGATIONS`) refuse mixed
        ``client_ranks``.

    Rank and scale convention: ``alpha`` is shared by every rank, and a
    rank-``r`` adapter's update is ``(alpha / r) * B @ A`` (PEFT's scaling),
    so a client of rank ``r`` trains :meth:`at_rank` ``(r)``. The rank fields
    came after schema version 1 shipped: at their defaults a spec encodes
    (and fingerprints) exactly as before them.
    """

    SCHEMA_VERSION: ClassVar[int] = 1
    KIND: ClassVar[str] = "LoraSpec"
    LATE_FIELDS: ClassVar[frozenset[str]] = frozenset({"client_ranks", "aggregation"})

    model: str
    model_dtype: str = "float32"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    max_length: int = 128
    client_ranks: tuple[int, ...] = ()
    aggregation: str = "fedavg"

    def __post_init__(self) -> None:
        k = self.KIND
        _require(bool(self.model), k, "model", self.model, "a non-empty name")
        _require(self.rank > 0, k, "rank", self.rank, "> 0")
        problem = lora_rank_problem(self.rank, self.client_ranks, self.aggregation)
        if problem is not None:
            raise ProtocolError(f"{k}: {problem}")
        _require(_positive(self.alpha), k, "alpha", self.alpha, "> 0")
        ok = math.isfinite(self.dropout) and 0.0 <= self.dropout < 1.0
        _require(ok, k, "dropout", self.dropout, "in [0, 1)")
        _require(bool(self.target_modules), k, "target_modules", (), "non-empty")
        _require(self.max_length >= 8, k, "max_length", self.max_length, ">= 8")
        _require(
            self.model_dtype in _DTYPES,
            k,
            "model_dtype",
            self.model_dtype,
            f"one of {_DTYPES}",
        )

    def allowed_ranks(self) -> tuple[int, ...]:
        """The ranks a client may train: ``client_ranks``, or ``(rank,)``."""
        return self.client_ranks or (self.rank,)

    def at_rank(self, rank: int) -> LoraSpec:
        """The spec a rank-``rank`` client builds its adapter from.

        Same model, ``alpha``, dropout and targets; ``rank`` replaced and
        ``client_ranks`` dropped (a client trains one rank).

        Raises
        ------
        ProtocolError
            If ``rank`` is not one of :meth:`allowed_ranks`.
        """
        if rank not in self.allowed_ranks():
            raise ProtocolError(
                f"{self.KIND}: rank {rank} is not one of the allowed ranks "
                f"{list(self.allowed_ranks())}"
            )
        return dataclasses.replace(self, rank=rank, client_ranks=())


@dataclass(frozen=True, slots=True)
class ZOSpec(_Spec):
    """What a seed-based zeroth-order (FedKSeed) federation agrees on.

    Every party rebuilds the same model from the same seeds, so everything that
    shapes a perturbation or an update is here.

    Attributes
    ----------
    model : str
        Base model name; its parameters are w0.
    walk_fingerprint : str
        Fingerprint of the ordered list of perturbed parameters (names and
        shapes): the revision hash of the parameter list.
    include : tuple[str, ...]
        Glob patterns selecting the perturbed parameters (empty = all).
    num_seeds : int
        K, the size of the candidate seed pool.
    master_seed : int
        The pool is derived from it (see :func:`protocols.seeds.candidate_seeds`).
    eps : float
        Perturbation scale of the two-point estimate.
    learning_rate : float
        eta: the local step is ``w -= eta * g * z`` and the server folds eta
        into the round's per-seed coefficients.
    generator : str
        :data:`protocols.seeds.GENERATOR_VERSION` of the seed -> z map.
    sampling : str
        "uniform" (FedKSeed) or "pro" (FedKSeed-Pro probabilities).
    grad_clip : float
        Scalars with ``|g| > grad_clip`` are clipped to it in the Pro
        importance statistics (the paper's bias_loss_clip).
    max_length : int
        Token budget of one example.
    adapter_rank : int
        0: the base model's parameters are perturbed (all, or those ``include``
        selects). r > 0: a LoRA adapter of rank r is attached to the frozen
        base and only its A and B matrices are perturbed (the walk is theirs).
    adapter_alpha : float
        The adapter's scaling numerator (its update is scaled by alpha / r).
    adapter_targets : tuple[str, ...]
        Module names that get adapters, as PEFT's ``target_modules`` takes them.
    adapter_seed : int
        Seed of the adapter's initial A matrices (B starts at zero); see
        :func:`models.zo_model.init_adapter_`.

    The adapter fields came after schema version 1 shipped: a spec without an
    adapter encodes (and fingerprints) exactly as before them.
    """

    SCHEMA_VERSION: ClassVar[int] = 1
    KIND: ClassVar[str] = "ZOSpec"
    LATE_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"adapter_rank", "adapter_alpha", "adapter_targets", "adapter_seed"}
    )

    model: str
    walk_fingerprint: str
    generator: str
    include: tuple[str, ...] = ()
    num_seeds: int = 1024
    master_seed: int = 0
    eps: float = 5e-4
    learning_rate: float = 3e-7
    sampling: str = "uniform"
    grad_clip: float = 1000.0
    max_length: int = 128
    adapter_rank: int = 0
    adapter_alpha: float = 16.0
    adapter_targets: tuple[str, ...] = ()
    adapter_seed: int = 0

    def __post_init__(self) -> None:
        k = self.KIND
        _require(bool(self.model), k, "model", self.model, "a non-empty name")
        _require(bool(self.walk_fingerprint), k, "walk_fingerprint", "", "non-empty")
        self._check_adapter()
        _require(bool(self.generator), k, "generator", "", "non-empty")
        _require(
            1 <= self.num_seeds <= 1 << 20,
            k,
            "num_seeds",
            self.num_seeds,
            "in [1, 2^20]",
        )
        _require(
            0 <= self.master_seed < 1 << 63,
            k,
            "master_seed",
            self.master_seed,
            "in [0, 2^63)",
        )
        _require(_positive(self.eps), k, "eps", self.eps, "> 0")
        _require(
            _positive(self.learning_rate), k, "learning_rate", self.learning_rate, "> 0"
        )
        _require(
            self.sampling in ("uniform", "pro"),
            k,
            "sampling",
            self.sampling,
            "'uniform' or 'pro'",
        )
        _require(_positive(self.grad_clip), k, "grad_clip", self.grad_clip, "> 0")
        _require(self.max_length >= 8, k, "max_length", self.max_length, ">= 8")

    def _check_adapter(self) -> None:
        k, rank = self.KIND, self.adapter_rank
        _require(0 <= rank <= 256, k, "adapter_rank", rank, "in [0, 256]")
        alpha = self.adapter_alpha
        _require(_positive(alpha), k, "adapter_alpha", alpha, "> 0")
        seed = self.adapter_seed
        _require(0 <= seed < 1 << 63, k, "adapter_seed", seed, "in [0, 2^63)")
        targets = self.adapter_targets
        if rank == 0:
            _require(not targets, k, "adapter_targets", targets, "empty (no adapter)")
            return
        _require(bool(targets), k, "adapter_targets", targets, "non-empty")
        _require(all(targets), k, "adapter_targets", targets, "non-empty names")
        _require(
            not self.include,
            k,
            "include",
            self.include,
            "empty with an adapter (the adapter's A and B are what is perturbed)",
        )

    @property
    def has_adapter(self) -> bool:
        """Whether a LoRA adapter's A and B are what is perturbed."""
        return self.adapter_rank > 0


@dataclass(frozen=True, slots=True)
class SplitSpec(_Spec):
    """Where a decoder LM is cut between device and server (SFPrompt).

    The device holds the token embedding, ``num_prompts`` trainable soft
    prompt vectors (prepended to the embedded tokens), the first
    ``client_blocks`` decoder blocks (frozen) and the tail: the final norm and
    an untied copy of the LM head (both trainable). The server holds the
    remaining blocks, frozen. Both sides check this spec when a session opens.

    Attributes
    ----------
    model : str
        Base model name.
    num_prompts : int
        Soft prompt vectors P (>= 1).
    client_blocks : int
        Decoder blocks kept on the device (>= 0).
    num_blocks : int
        Decoder blocks of the whole model (the server holds the rest).
    hidden_size : int
        Width D of the activations crossing the cut.
    activation_dtype : str
        Dtype of the activations on the wire.
    max_length : int
        Token budget of one example (prompts not included).
    tail : str
        What of the tail trains: ``"norm+head"`` (final norm and LM head, as
        in SFPrompt) or ``"norm"`` (the head stays frozen: far fewer bytes
        per round for large vocabularies).
    """

    SCHEMA_VERSION: ClassVar[int] = 1
    KIND: ClassVar[str] = "SplitSpec"

    model: str
    num_prompts: int
    client_blocks: int
    num_blocks: int
    hidden_size: int
    activation_dtype: str = "float32"
    max_length: int = 128
    tail: str = "norm+head"

    def __post_init__(self) -> None:
        k = self.KIND
        _require(
            self.tail in ("norm", "norm+head"),
            k,
            "tail",
            self.tail,
            "'norm' or 'norm+head'",
        )
        _require(bool(self.model), k, "model", self.model, "a non-empty name")
        _require(
            1 <= self.num_prompts <= 4096,
            k,
            "num_prompts",
            self.num_prompts,
            "in [1, 4096]",
        )
        _require(self.num_blocks >= 1, k, "num_blocks", self.num_blocks, ">= 1")
        ok = 0 <= self.client_blocks < self.num_blocks
        _require(
            ok, k, "client_blocks", self.client_blocks, f"in [0, {self.num_blocks})"
        )
        _require(self.hidden_size >= 1, k, "hidden_size", self.hidden_size, ">= 1")
        dt = self.activation_dtype
        _require(dt in _DTYPES, k, "activation_dtype", dt, f"one of {_DTYPES}")
        _require(self.max_length >= 8, k, "max_length", self.max_length, ">= 8")

    @property
    def server_blocks(self) -> int:
        """Decoder blocks run by the server."""
        return self.num_blocks - self.client_blocks

    @property
    def returns_all_positions(self) -> bool:
        """Whether the server returns gradients for every position.

        With no block on the device, only the prompt positions' gradients are
        needed (the embedding is frozen); otherwise the device back-propagates
        through its own blocks and needs all of them.
        """
        return self.client_blocks > 0
