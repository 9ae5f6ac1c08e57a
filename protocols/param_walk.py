"""Which tensors a seed perturbs, and in what order: the parameter walk.

Rule 7 of the seed protocol (:mod:`protocols.seeds`): the floating-point
parameters of ``model.named_parameters()``, in that order, each tensor once
under its first name (tied weights once), optionally filtered by ``fnmatch``
globs. Both sides build the same walk from the same model and include globs,
and check it by :meth:`ParamWalk.fingerprint`, which travels in the spec.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from protocols.errors import ProtocolError

if TYPE_CHECKING:
    import torch

__all__ = ["ParamWalk"]


@dataclass(frozen=True, slots=True)
class ParamWalk:
    """The fixed, ordered set of parameters a seed perturbs.

    Attributes
    ----------
    names
        Parameter names in walk order (unique).
    shapes
        The shape of each parameter, aligned with ``names``.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes):
            raise ProtocolError(
                f"ParamWalk has {len(self.names)} names but {len(self.shapes)} shapes"
            )
        seen: set[str] = set()
        for name, shape in zip(self.names, self.shapes, strict=True):
            if not isinstance(name, str):
                raise ProtocolError(f"ParamWalk name {name!r} is not a str")
            if name in seen:
                raise ProtocolError(f"ParamWalk lists '{name}' twice")
            seen.add(name)
            if not isinstance(shape, tuple) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
            ):
                raise ProtocolError(
                    f"ParamWalk shape of '{name}' must be a tuple of ints >= 0, "
                    f"got {shape!r}"
                )

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        include: Sequence[str] | None = None,
        *,
        trainable_only: bool = False,
    ) -> ParamWalk:
        """The walk of ``model``'s floating-point parameters.

        Parameters
        ----------
        model
            Any module; its ``named_parameters()`` order is the walk order.
        include
            ``fnmatch`` globs (case-sensitive) on parameter names; a tensor is
            kept if any of its names (tied weights have several) matches any
            glob. ``None`` keeps every floating-point parameter.
        trainable_only
            Keep only parameters with ``requires_grad``.

        Raises
        ------
        ProtocolError
            If ``include`` is a bare string, a glob matches no parameter name,
            or nothing is left to perturb.
        """
        if isinstance(include, str):
            raise ProtocolError(
                f"include must be a sequence of globs, got the string {include!r}"
            )
        patterns = None if include is None else list(include)
        first_name: dict[int, str] = {}
        all_names: dict[int, list[str]] = {}
        tensors: dict[int, torch.Tensor] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            key = id(param)
            if key not in first_name:
                first_name[key] = name
                all_names[key] = []
                tensors[key] = param
            all_names[key].append(name)
        if patterns is not None:
            every = [n for names in all_names.values() for n in names]
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in every):
                    raise ProtocolError(
                        f"include pattern {pattern!r} matches no parameter of "
                        f"{type(model).__name__}"
                    )
        names: list[str] = []
        shapes: list[tuple[int, ...]] = []
        for key, name in first_name.items():
            p = tensors[key]
            if not p.is_floating_point() or (trainable_only and not p.requires_grad):
                continue
            if patterns is not None and not any(
                fnmatch.fnmatchcase(n, pat) for n in all_names[key] for pat in patterns
            ):
                continue
            names.append(name)
            shapes.append(tuple(int(d) for d in p.shape))
        if not names:
            raise ProtocolError(
                f"no floating-point parameter of {type(model).__name__} to perturb "
                f"(include={patterns!r}, trainable_only={trainable_only})"
            )
        return cls(tuple(names), tuple(shapes))

    def params(self, model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
        """The live parameter tensors of ``model`` in walk order.

        Raises
        ------
        ProtocolError
            If ``model`` has no parameter of a walk name, its shape differs, or
            it is not floating point.
        """
        live = dict(model.named_parameters(remove_duplicate=False))
        out: list[tuple[str, torch.Tensor]] = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            p = live.get(name)
            if p is None:
                raise ProtocolError(
                    f"model {type(model).__name__} has no parameter '{name}' "
                    f"(walk {self.fingerprint()})"
                )
            if tuple(p.shape) != shape:
                raise ProtocolError(
                    f"parameter '{name}' has shape {tuple(p.shape)}, the walk "
                    f"expects {shape}"
                )
            if not p.is_floating_point():
                raise ProtocolError(
                    f"parameter '{name}' has dtype {p.dtype}, not floating"
                )
            out.append((name, p))
        return out

    def fingerprint(self) -> str:
        """16 hex digits of SHA-256 over the names and shapes, in order."""
        text = json.dumps(
            [[n, list(s)] for n, s in zip(self.names, self.shapes, strict=True)],
            separators=(",", ":"),
        )
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    @property
    def numel(self) -> int:
        """Total number of perturbed values."""
        return sum(math.prod(s) for s in self.shapes)


# ---------------------------------------------------------------- application
