"""LoRA aggregation rules: pure torch kernels over PEFT adapter tensors.

No Flower, no files, no config: tensors and numbers in, tensors out. The
server's LoRA strategy picks a rule by name (:data:`RULES`, :func:`aggregate`)
and does the plumbing (replies, clipping, checkpoints) around it.

Adapters, their factors and the rank convention (``alpha / r`` scaling,
padding and truncation between ranks, residual folding) are
:mod:`strategies.lora_factors`.

Rules (weights are non-negative, normalised here; sums run in float32, or
float64 for float64 inputs, in the given client order, so equal inputs give
bit-identical outputs):

- ``fedavg``: weighted mean of ``A`` and of ``B`` separately (equal ranks).
- ``exact``: FedEx-LoRA (Singhal et al. 2024). Means of ``A`` and ``B`` plus a
  dense residual per module ``R = (alpha/r) (sum_i w_i B_i A_i - B A)`` (``B``,
  ``A`` the returned means), folded into the frozen base weight
  (:func:`~strategies.lora_factors.fold_residual`): ``base + R + (alpha/r) B A`` equals
  ``base + sum_i w_i dW_i``.
- ``ffa``: FFA-LoRA (Sun et al. 2024). ``A`` is frozen and must equal the
  current global ``A`` bit for bit; ``B`` is the weighted mean. Exact.
- ``hetlora``: HetLoRA (Cho et al. 2024). Pad every client to ``r_max``, then
  the weighted mean of the padded factors. With ``sparsity_weighted`` each
  module's weights are multiplied by the Frobenius norm of that client's
  ``dW`` of that module and renormalised (plain weights if all norms are 0).
- ``flexlora``: FlexLoRA (Bai et al. 2024). ``dW = sum_i w_i dW_i`` per module,
  ``dW = U S V^T`` (SVD, signs fixed so each column of ``U`` has its largest
  entry positive), and ``B = U_k sqrt(S_k / c)``, ``A = sqrt(S_k / c) V_k^T``
  with ``c = alpha / r_max``, ``k = min(r_max, out, in)``: the square root of
  the singular values is split evenly between the factors, so
  ``c B A`` is the best rank-``r_max`` approximation of ``dW`` and, since
  components are ordered by singular value, ``truncate_to`` ``r_i`` gives the
  best rank-``r_i`` one. Components beyond ``k`` are zero in both factors.

The global adapter keeps the first client's tensor names and dtypes; the
residual stays in the accumulation dtype (float32 or float64).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from strategies.lora_factors import (
    LORA_A,
    LORA_B,
    Adapter,
    LoraRuleError,
    acc_dtype,
    check_rank,
    pad_to,
    pair_factors,
)

__all__ = ["RULES", "RuleResult", "aggregate"]

RULES = ("fedavg", "exact", "ffa", "hetlora", "flexlora")


@dataclass(frozen=True)
class RuleResult:
    """What a rule returns.

    Attributes
    ----------
    adapter : dict[str, torch.Tensor]
        The new global adapter, canonical at the global rank.
    residual : dict[str, torch.Tensor]
        Per module prefix, a dense ``(out, in)`` tensor to add to the frozen
        base weight (``exact`` only; empty for the other rules).
    """

    adapter: dict[str, torch.Tensor]
    residual: dict[str, torch.Tensor] = field(default_factory=dict)


def _normalise(weights: Sequence[float], n: int) -> list[float]:
    if len(weights) != n:
        raise LoraRuleError(f"{n} adapters but {len(weights)} weights")
    ws = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in ws) or sum(ws) <= 0:
        raise LoraRuleError(f"weights must be finite, >= 0 and sum > 0: {ws}")
    total = sum(ws)
    return [w / total for w in ws]


@dataclass(frozen=True)
class _Round:
    """Validated inputs: per module prefix, each client's (A, B) on device."""

    modules: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
    dtypes: dict[str, torch.dtype]
    names: list[str]  # client 0's tensor names, the output order
    ranks: list[int]
    weights: list[float]
    alpha: float
    global_rank: int
    device: torch.device | str


def _prepare(
    adapters: Sequence[Adapter],
    ranks: Sequence[int],
    weights: Sequence[float],
    alpha: float,
    global_rank: int,
    device: torch.device | str,
) -> _Round:
    if not adapters:
        raise LoraRuleError("no adapters to aggregate")
    if len(ranks) != len(adapters):
        raise LoraRuleError(f"{len(adapters)} adapters but {len(ranks)} ranks")
    if isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise LoraRuleError(f"alpha must be finite and > 0, got {alpha!r}")
    check_rank(global_rank, "global_rank")
    ws = _normalise(weights, len(adapters))
    per_client = [
        pair_factors(ad, r, who=f"client {i}")
        for i, (ad, r) in enumerate(zip(adapters, ranks, strict=True))
    ]
    for i, r in enumerate(ranks):
        if r > global_rank:
            raise LoraRuleError(f"client {i} rank {r} > global_rank {global_rank}")
    first = per_client[0]
    modules: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for prefix, (a0, b0) in first.items():
        dtypes[prefix] = a0.dtype
        acc = acc_dtype(a0)
        col: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, pairs in enumerate(per_client):
            if prefix not in pairs:
                raise LoraRuleError(f"client {i} tensor '{prefix}{LORA_A}' is missing")
            a, b = pairs[prefix]
            if a.shape[1] != a0.shape[1] or b.shape[0] != b0.shape[0]:
                raise LoraRuleError(
                    f"client {i} tensor '{prefix}{LORA_B}' module shape "
                    f"({b.shape[0]}, {a.shape[1]}) != client 0's "
                    f"({b0.shape[0]}, {a0.shape[1]})"
                )
            if a.dtype != a0.dtype:
                raise LoraRuleError(
                    f"client {i} tensor '{prefix}{LORA_A}' is {a.dtype}, client 0's "
                    f"is {a0.dtype}"
                )
            col.append((a.to(device, acc), b.to(device, acc)))
        modules[prefix] = col
    for i, pairs in enumerate(per_client):
        extra = set(pairs) - set(first)
        if extra:
            raise LoraRuleError(
                f"client {i} tensor '{sorted(extra)[0]}{LORA_A}' is not in client 0"
            )
    names = list(adapters[0])
    return _Round(
        modules, dtypes, names, list(ranks), ws, float(alpha), global_rank, device
    )


def _wsum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights, strict=True):
        out.add_(t, alpha=w)
    return out


def _emit(
    rnd: _Round, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for prefix, (a, b) in factors.items():
        out[prefix + LORA_A] = a.to(rnd.dtypes[prefix])
        out[prefix + LORA_B] = b.to(rnd.dtypes[prefix])
    return {name: out[name] for name in rnd.names}


# -- rules ----------------------------------------------------------------------------


def _same_rank(rnd: _Round, rule: str) -> float:
    if any(r != rnd.global_rank for r in rnd.ranks):
        raise LoraRuleError(
            f"rule '{rule}' needs every client at global rank {rnd.global_rank}, got "
            f"ranks {rnd.ranks}: use 'hetlora' or 'flexlora' for mixed ranks"
        )
    return rnd.alpha / rnd.global_rank


def _fedavg(rnd: _Round) -> RuleResult:
    """Weighted mean of A and of B separately (equal ranks)."""
    _same_rank(rnd, "fedavg")
    out = {
        p: (
            _wsum([a for a, _ in c], rnd.weights),
            _wsum([b for _, b in c], rnd.weights),
        )
        for p, c in rnd.modules.items()
    }
    return RuleResult(_emit(rnd, out))


def _exact(rnd: _Round) -> RuleResult:
    """FedEx-LoRA: the mean factors plus the residual that makes it exact."""
    scale = _same_rank(rnd, "exact")
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    residual: dict[str, torch.Tensor] = {}
    for prefix, col in rnd.modules.items():
        dtype = rnd.dtypes[prefix]
        # Cast the means first: the residual is taken against what is returned.
        a_mean = _wsum([a for a, _ in col], rnd.weights).to(dtype)
        b_mean = _wsum([b for _, b in col], rnd.weights).to(dtype)
        products = _wsum([b @ a for a, b in col], rnd.weights)  # (out, in)
        acc = products.dtype
        residual[prefix] = scale * (products - b_mean.to(acc) @ a_mean.to(acc))
        out[prefix] = (a_mean, b_mean)
    return RuleResult(_emit(rnd, out), residual)


def _ffa(rnd: _Round, adapters: Sequence[Adapter], current: Adapter) -> RuleResult:
    """FFA-LoRA: every client's A must be the current global A; B averaged."""
    _same_rank(rnd, "ffa")
    glob = pair_factors(current, rnd.global_rank, who="current global adapter")
    if set(glob) != set(rnd.modules):
        raise LoraRuleError("current global adapter has other modules than client 0")
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for prefix, col in rnd.modules.items():
        a_glob = glob[prefix][0].to(rnd.device)
        for i, adapter in enumerate(adapters):
            a_i = adapter[prefix + LORA_A].to(rnd.device)
            if a_i.dtype != a_glob.dtype or not torch.equal(a_i, a_glob):
                raise LoraRuleError(
                    f"ffa: client {i} changed the frozen A of module '{prefix}'"
                )
        out[prefix] = (a_glob.clone(), _wsum([b for _, b in col], rnd.weights))
    return RuleResult(_emit(rnd, out))


def _hetlora(rnd: _Round, sparsity_weighted: bool) -> RuleResult:
    """HetLoRA: pad every client to the global rank, then average the factors."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for prefix, col in rnd.modules.items():
        pairs = list(zip(col, rnd.ranks, strict=True))
        padded = [pad_to(a, b, r, rnd.global_rank) for (a, b), r in pairs]
        ws = rnd.weights
        if sparsity_weighted:
            # sync point: one norm per client and module
            norms = [
                float(torch.linalg.matrix_norm((rnd.alpha / r) * (b @ a)))
                for (a, b), r in pairs
            ]
            scaled = [w * n for w, n in zip(ws, norms, strict=True)]
            if sum(scaled) > 0:
                ws = [x / sum(scaled) for x in scaled]
        out[prefix] = (
            _wsum([a for a, _ in padded], ws),
            _wsum([b for _, b in padded], ws),
        )
    return RuleResult(_emit(rnd, out))


def _svd_factors(
    delta: torch.Tensor, rank: int, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    # Fix SVD's sign freedom: the largest-magnitude entry of each U column > 0.
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u.gather(0, idx[None, :]))[0]
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    u, vh = u * signs, vh * signs[:, None]
    k = min(rank, s.numel())
    root = torch.sqrt(s[:k] / (alpha / rank))  # (k,): sqrt(S/c) on each factor
    a = delta.new_zeros((rank, delta.shape[1]))
    b = delta.new_zeros((delta.shape[0], rank))
    a[:k] = root[:, None] * vh[:k]
    b[:, :k] = u[:, :k] * root
    return a, b


def _flexlora(rnd: _Round) -> RuleResult:
    """FlexLoRA: mean of the full-size updates, re-factored by SVD."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for prefix, col in rnd.modules.items():
        deltas = [
            (rnd.alpha / r) * (b @ a) for (a, b), r in zip(col, rnd.ranks, strict=True)
        ]
        delta = _wsum(deltas, rnd.weights)  # (out, in)
        out[prefix] = _svd_factors(delta, rnd.global_rank, rnd.alpha)
    return RuleResult(_emit(rnd, out))


def aggregate(
    rule: str,
    adapters: Sequence[Adapter],
    ranks: Sequence[int],
    weights: Sequence[float],
    *,
    alpha: float,
    global_rank: int,
    current: Adapter | None = None,
    sparsity_weighted: bool = False,
    device: torch.device | str = "cpu",
) -> RuleResult:
    """Aggregate client adapters with the rule named ``rule`` (see the module doc).

    Parameters
    ----------
    rule : str
        One of :data:`RULES`: ``"fedavg"``, ``"exact"``, ``"ffa"``, ``"hetlora"``
        or ``"flexlora"``.
    adapters : Sequence[Mapping[str, torch.Tensor]]
        One adapter per client, in a fixed order, with the same modules,
        module shapes ``(out, in)`` and dtype.
    ranks : Sequence[int]
        Each client's rank, at most ``global_rank``; ``fedavg``, ``exact`` and
        ``ffa`` need every rank equal to ``global_rank``.
    weights : Sequence[float]
        Non-negative client weights (e.g. example counts), normalised here.
    alpha : float
        LoRA alpha, shared by all clients and the server.
    global_rank : int
        The rank ``r_max`` of the canonical global adapter.
    current : Mapping[str, torch.Tensor] or None
        The global adapter the clients started from; required by ``ffa``.
    sparsity_weighted : bool
        HetLoRA's norm-weighted aggregation; only with ``hetlora``.
    device : torch.device or str
        Where the sums run and the results live.

    Returns
    -------
    RuleResult
        The new global adapter (client 0's names and dtype, rank
        ``global_rank``) and, for ``exact``, the residual per module prefix.

    Raises
    ------
    LoraRuleError
        On an unknown rule, malformed adapters (the message names the client
        and tensor), bad ranks or weights, mixed ranks under ``fedavg``,
        ``exact`` or ``ffa``, a missing ``current`` or a changed frozen A
        under ``ffa``.
    """
    if rule not in RULES:
        raise LoraRuleError(f"unknown LoRA rule {rule!r}; choose one of {RULES}")
    if sparsity_weighted and rule != "hetlora":
        raise LoraRuleError(f"sparsity_weighted applies to 'hetlora', not {rule!r}")
    rnd = _prepare(adapters, ranks, weights, alpha, global_rank, device)
    if rule == "ffa":
        if current is None:
            raise LoraRuleError("rule 'ffa' needs the current global adapter")
        return _ffa(rnd, adapters, current)
    if rule == "hetlora":
        return _hetlora(rnd, sparsity_weighted)
    return {"fedavg": _fedavg, "exact": _exact, "flexlora": _flexlora}[rule](rnd)
