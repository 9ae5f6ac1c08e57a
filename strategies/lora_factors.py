"""LoRA factors: pairing A with B, moving between ranks, folding residuals.

Adapters are mappings of PEFT state-dict names to tensors: for every adapted
module ``<prefix>`` a pair ``<prefix>.lora_A.weight`` of shape ``(r, in)`` and
``<prefix>.lora_B.weight`` of shape ``(out, r)``. Nothing else may be in them.
Pure torch, no Flower, no files: the aggregation rules
(:mod:`strategies.lora_rules`), the LoRA strategies and the client's handler
share these.

Rank and scaling convention
---------------------------
PEFT's effective update of a module is ``dW = (alpha / r) * B @ A``, shape
``(out, in)`` (``nn.Linear`` layout). ``alpha`` is shared by all clients; the
rank ``r`` may differ per client. The server's canonical global adapter has the
global rank ``r_max`` and scale ``alpha / r_max``.

- :func:`pad_to` lifts a rank-``r_i`` pair to ``r_max``: zero rows of ``A``,
  zero columns of ``B``, and ``B`` multiplied by ``r_max / r_i``, so that
  ``(alpha/r_max) B' A' == (alpha/r_i) B A``.
- :func:`truncate_to` (and :func:`client_adapter`) lowers a canonical pair to
  ``r_i``: the first ``r_i`` rows of ``A`` and columns of ``B``, ``B``
  multiplied by ``r_i / r_max``, so the kept components' ``dW`` is unchanged.
  A client that sends its truncation back unchanged is padded back to the same
  ``dW`` contribution.
- :func:`pad_adapter` applies :func:`pad_to` to every module of an adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from models.lora import BaseWeights

__all__ = [
    "LORA_A",
    "LORA_B",
    "Adapter",
    "LoraRuleError",
    "Pairs",
    "acc_dtype",
    "check_rank",
    "client_adapter",
    "effective_delta",
    "fold_residual",
    "fold_residuals",
    "pad_adapter",
    "pad_to",
    "pair_factors",
    "truncate_to",
]

LORA_A = ".lora_A.weight"
"""The name suffix of a module's A factor."""
LORA_B = ".lora_B.weight"
"""The name suffix of a module's B factor."""

Adapter = Mapping[str, torch.Tensor]
Pairs = dict[str, tuple[torch.Tensor, torch.Tensor]]


class LoraRuleError(ValueError):
    """Adapters, ranks or weights given to a LoRA rule cannot be aggregated."""


def check_rank(rank: int, what: str) -> None:
    """Refuse a rank that is not an int >= 1 (``what`` names it)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoraRuleError(f"{what} must be an integer >= 1, got {rank!r}")


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype sums of ``t`` run in: float64 for float64, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def pair_factors(adapter: Adapter, rank: int, *, who: str = "adapter") -> Pairs:
    """Pair the A and B tensors of an adapter by module prefix and check them.

    Parameters
    ----------
    adapter : Mapping[str, torch.Tensor]
        ``<prefix>.lora_A.weight`` ``(rank, in)`` and ``<prefix>.lora_B.weight``
        ``(out, rank)`` tensors, floating point and finite.
    rank : int
        The adapter's LoRA rank.
    who : str
        Names the adapter in error messages (e.g. ``"client 2"``).

    Returns
    -------
    dict[str, tuple[torch.Tensor, torch.Tensor]]
        ``prefix -> (A, B)`` in the order the prefixes first appear.

    Raises
    ------
    LoraRuleError
        On an empty adapter, a name that is not a LoRA factor, a missing
        partner, a non-float or non-2-D tensor, a shape that does not match
        ``rank``, mismatched A/B dtypes or non-finite values.
    """
    check_rank(rank, f"{who} rank")
    if not adapter:
        raise LoraRuleError(f"{who} has no LoRA tensors")
    pairs: Pairs = {}
    for name in adapter:
        if name.endswith(LORA_A):
            prefix = name[: -len(LORA_A)]
        elif name.endswith(LORA_B):
            prefix = name[: -len(LORA_B)]
        else:
            raise LoraRuleError(
                f"{who} tensor '{name}' is not a LoRA factor "
                f"(names must end in {LORA_A} or {LORA_B})"
            )
        if prefix in pairs:
            continue
        a_name, b_name = prefix + LORA_A, prefix + LORA_B
        for need in (a_name, b_name):
            if need not in adapter:
                raise LoraRuleError(f"{who} tensor '{need}' is missing")
        a, b = adapter[a_name], adapter[b_name]
        for n, t in ((a_name, a), (b_name, b)):
            if not t.is_floating_point() or t.ndim != 2:
                raise LoraRuleError(
                    f"{who} tensor '{n}' must be a 2-D float tensor, got "
                    f"{t.ndim}-D {t.dtype}"
                )
        if a.shape[0] != rank or b.shape[1] != rank:
            raise LoraRuleError(
                f"{who} tensors '{a_name}' {tuple(a.shape)} / '{b_name}' "
                f"{tuple(b.shape)} do not have rank {rank}"
            )
        if a.dtype != b.dtype:
            raise LoraRuleError(
                f"{who} tensor '{b_name}' is {b.dtype} but '{a_name}' is {a.dtype}"
            )
        for n, t in ((a_name, a), (b_name, b)):
            if not bool(torch.isfinite(t).all()):  # sync point: one per tensor
                raise LoraRuleError(f"{who} tensor '{n}' has NaN or Inf values")
        pairs[prefix] = (a, b)
    return pairs


def _check_pair(a: torch.Tensor, b: torch.Tensor, rank: int, r_max: int) -> None:
    check_rank(rank, "rank")
    check_rank(r_max, "r_max")
    if rank > r_max:
        raise LoraRuleError(f"rank {rank} is above r_max {r_max}")
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
        raise LoraRuleError(
            f"factors A {tuple(a.shape)} and B {tuple(b.shape)} do not have rank {rank}"
        )


def pad_to(
    a: torch.Tensor, b: torch.Tensor, r_i: int, r_max: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lift ``A`` ``(r_i, in)``, ``B`` ``(out, r_i)`` to rank ``r_max``, same ``dW``.

    Returns ``A'`` ``(r_max, in)`` (zero rows appended) and ``B'``
    ``(out, r_max)`` (``B * r_max / r_i``, zero columns appended) in the input
    dtype, so ``(alpha/r_max) B' A' == (alpha/r_i) B A``. Raises
    :class:`LoraRuleError` unless ``1 <= r_i <= r_max`` match the shapes.
    """
    _check_pair(a, b, r_i, r_max)
    a_out = a.new_zeros((r_max, a.shape[1]))
    b_out = b.new_zeros((b.shape[0], r_max))
    a_out[:r_i] = a
    b_out[:, :r_i] = (b.to(acc_dtype(b)) * (r_max / r_i)).to(b.dtype)
    return a_out, b_out


def truncate_to(
    a: torch.Tensor, b: torch.Tensor, r_max: int, r_i: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower canonical ``A`` ``(r_max, in)``, ``B`` ``(out, r_max)`` to rank ``r_i``.

    Returns ``A[:r_i]`` and ``B[:, :r_i] * r_i / r_max`` in the input dtype, so
    ``(alpha/r_i) B' A'`` equals the first ``r_i`` components of
    ``(alpha/r_max) B A``. Raises :class:`LoraRuleError` unless
    ``1 <= r_i <= r_max`` match the shapes.
    """
    check_rank(r_i, "r_i")
    _check_pair(a, b, r_max, r_max)
    _check_pair(a[:r_i], b[:, :r_i], r_i, r_max)
    b_out = (b[:, :r_i].to(acc_dtype(b)) * (r_i / r_max)).to(b.dtype)
    return a[:r_i].clone(), b_out


def client_adapter(
    global_adapter: Adapter, r_max: int, r_i: int
) -> dict[str, torch.Tensor]:
    """The adapter a rank-``r_i`` client starts from: :func:`truncate_to` per module.

    Returns the global adapter's names with A ``(r_i, in)`` and B
    ``(out, r_i)``. Raises :class:`LoraRuleError` on a malformed adapter or
    bad ranks.
    """
    pairs = pair_factors(global_adapter, r_max, who="global adapter")
    out: dict[str, torch.Tensor] = {}
    for prefix, (a, b) in pairs.items():
        out[prefix + LORA_A], out[prefix + LORA_B] = truncate_to(a, b, r_max, r_i)
    return {name: out[name] for name in global_adapter}


def effective_delta(
    adapter: Adapter, rank: int, alpha: float
) -> dict[str, torch.Tensor]:
    """PEFT's effective update ``(alpha / rank) * B @ A`` per module prefix.

    Returns ``prefix -> dW`` of shape ``(out, in)`` in float32 (float64 for
    float64 inputs). Raises :class:`LoraRuleError` on a malformed adapter.
    """
    out: dict[str, torch.Tensor] = {}
    for prefix, (a, b) in pair_factors(adapter, rank).items():
        acc = acc_dtype(a)
        out[prefix] = (alpha / rank) * (b.to(acc) @ a.to(acc))
    return out


def fold_residual(
    base_weight: torch.Tensor, residual: torch.Tensor, *, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """Add an ``exact`` residual to a frozen base weight (a new tensor).

    Parameters
    ----------
    base_weight : torch.Tensor
        The module's frozen weight, ``(out, in)`` like ``nn.Linear``, or
        ``(in, out)`` for PEFT's ``fan_in_fan_out`` layers (GPT-2 ``Conv1D``).
    residual : torch.Tensor
        ``RuleResult.residual[prefix]``, ``(out, in)``.
    fan_in_fan_out : bool
        Transpose the residual for ``(in, out)`` weights.

    Returns
    -------
    torch.Tensor
        ``base_weight + residual`` summed in float32 (float64 for float64) and
        cast to the base weight's dtype and device. In bf16 the fold rounds.

    Raises
    ------
    LoraRuleError
        On a shape mismatch.
    """
    r = residual.T if fan_in_fan_out else residual
    if r.shape != base_weight.shape:
        raise LoraRuleError(
            f"residual {tuple(r.shape)} does not fit base weight "
            f"{tuple(base_weight.shape)}"
        )
    wide = torch.float64 in (base_weight.dtype, r.dtype)
    acc = torch.float64 if wide else torch.float32
    total = base_weight.to(acc) + r.to(base_weight.device, acc)
    return total.to(base_weight.dtype)


def fold_residuals(
    bases: BaseWeights, residual: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``pristine + residual`` per module: from pristine copies, so no rounding piles up."""
    return {
        prefix: fold_residual(
            bases.pristine(prefix), r, fan_in_fan_out=bases.fan_in_fan_out(prefix)
        )
        for prefix, r in residual.items()
    }


def pad_adapter(adapter: Adapter, rank: int, r_max: int) -> dict[str, torch.Tensor]:
    """An adapter (or update) of ``rank`` lifted to ``r_max``: :func:`pad_to` per module.

    Keeps the adapter's names and order; returns a copy unchanged at ``r_max``.
    """
    if rank == r_max:
        return dict(adapter)
    out: dict[str, torch.Tensor] = {}
    for name in adapter:
        if name.endswith(LORA_A):
            prefix = name[: -len(LORA_A)]
            out[name], out[prefix + LORA_B] = pad_to(
                adapter[name], adapter[prefix + LORA_B], rank, r_max
            )
    return {name: out[name] for name in adapter}
