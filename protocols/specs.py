"""Method specs: the settings both sides must agree on, versioned and checked.

A spec is a frozen dataclass with a schema version and a fingerprint. The
server sends it with every round inside a ``ConfigRecord``; the client rebuilds
it with :meth:`LoraSpec.from_config_record`, which rejects unknown keys, wrong
types, out-of-range values, unsupported schema versions and a fingerprint that
does not match the fields (a corrupted or hand-edited spec).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from flwr.app import ConfigRecord

from protocols.errors import ProtocolError, SpecMismatchError

__all__ = ["LoraSpec"]

_FINGERPRINT_KEY = "fingerprint"
_SCHEMA_KEY = "schema-version"


@dataclass(frozen=True, slots=True)
class LoraSpec:
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
    """

    SCHEMA_VERSION: ClassVar[int] = 1

    model: str
    model_dtype: str = "float32"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    max_length: int = 128

    def __post_init__(self) -> None:
        if not self.model:
            raise ProtocolError("LoraSpec.model must not be empty")
        if self.rank <= 0:
            raise ProtocolError(f"LoraSpec.rank must be > 0, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ProtocolError(f"LoraSpec.alpha must be > 0, got {self.alpha}")
        if not (math.isfinite(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ProtocolError(
                f"LoraSpec.dropout must be in [0, 1), got {self.dropout}"
            )
        if not self.target_modules:
            raise ProtocolError("LoraSpec.target_modules must name at least one module")
        if self.max_length < 8:
            raise ProtocolError(
                f"LoraSpec.max_length must be >= 8, got {self.max_length}"
            )
        if self.model_dtype not in ("float32", "float16", "bfloat16"):
            raise ProtocolError(
                f"LoraSpec.model_dtype must be float32, float16 or bfloat16, "
                f"got {self.model_dtype!r}"
            )

    def _fields(self) -> dict[str, Any]:
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of the schema version and every field."""
        text = json.dumps([self.SCHEMA_VERSION, self._fields()], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_config_record(self) -> ConfigRecord:
        """Encode for the wire, with schema version and fingerprint."""
        record = ConfigRecord(self._fields())
        record[_SCHEMA_KEY] = self.SCHEMA_VERSION
        record[_FINGERPRINT_KEY] = self.fingerprint()
        return record

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> LoraSpec:
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
                f"LoRA spec schema version {version!r} is not supported "
                f"(this side speaks {cls.SCHEMA_VERSION})"
            )
        fingerprint = data.pop(_FINGERPRINT_KEY, None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ProtocolError(f"LoRA spec has unknown keys {sorted(unknown)}")
        missing = names - set(data)
        if missing:
            raise ProtocolError(f"LoRA spec lacks keys {sorted(missing)}")
        try:
            spec = cls(
                model=str(data["model"]),
                model_dtype=str(data["model_dtype"]),
                rank=_as_int(data["rank"], "rank"),
                alpha=float(data["alpha"]),
                dropout=float(data["dropout"]),
                target_modules=tuple(str(m) for m in data["target_modules"]),
                max_length=_as_int(data["max_length"], "max_length"),
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ProtocolError):
                raise
            raise ProtocolError(f"LoRA spec has a badly typed field: {exc}") from exc
        if fingerprint != spec.fingerprint():
            raise SpecMismatchError(
                f"LoRA spec fingerprint {fingerprint!r} does not match its fields "
                f"({spec.fingerprint()}): the spec was altered in transit"
            )
        return spec


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"LoRA spec field '{name}' must be an int, got {value!r}")
    return value
