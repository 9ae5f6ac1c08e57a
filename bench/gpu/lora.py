"""LoRA aggregation of one round on the device and the CPU: FedAvg and FlexLoRA.

Times :func:`strategies.lora_rules.aggregate` (what the LoRA strategies call)
on ``clients`` rank-``r`` adapters of q_proj and v_proj in every layer of a
model shaped like the scale's. The adapters start on the CPU, as decoded from
the clients' replies, so the figures include their validation and the copy to
the device. ``fedavg`` averages the factors; ``flexlora`` forms each module's
dense mean update and re-factors it by SVD (one SVD per module). The CPU
reference runs the same round. FlexLoRA is timed on as many layers as fit
the scale's budget and extrapolated per layer when that is not all of them
(labelled).
"""

from __future__ import annotations

from typing import Any

from bench.gpu.figures import figure, timed
from bench.gpu.scales import LoraScale

__all__ = ["section_lora"]

AGGREGATE = "strategies.lora_rules.aggregate"


def _adapters(scale: LoraScale, layers: int) -> list[dict[str, Any]]:
    """One adapter per client on the CPU: A ``(r, in)``, B ``(out, r)`` per module."""
    import torch

    gen = torch.Generator().manual_seed(0)
    shapes = {"q_proj": scale.hidden, "v_proj": scale.v_out}
    out: list[dict[str, Any]] = []
    for _ in range(scale.clients):
        adapter: dict[str, Any] = {}
        for i in range(layers):
            for module, out_dim in shapes.items():
                p = f"base_model.model.model.layers.{i}.self_attn.{module}"
                adapter[f"{p}.lora_A.weight"] = torch.randn(
                    (scale.rank, scale.hidden), generator=gen
                ) * (1.0 / scale.hidden**0.5)
                adapter[f"{p}.lora_B.weight"] = (
                    torch.randn((out_dim, scale.rank), generator=gen) * 1e-3
                )
        out.append(adapter)
    return out


def _aggregate(
    rule: str, adapters: list[dict[str, Any]], scale: LoraScale, device: Any
) -> None:
    from strategies.lora_rules import aggregate

    n = len(adapters)
    aggregate(
        rule,
        adapters,
        [scale.rank] * n,
        [float(100 + 10 * i) for i in range(n)],
        alpha=scale.alpha,
        global_rank=scale.rank,
        device=device,
    )


def _scale_words(scale: LoraScale, layers: int) -> str:
    return (
        f"{scale.clients} clients x rank {scale.rank}, q_proj "
        f"{scale.hidden}x{scale.hidden} + v_proj {scale.v_out}x{scale.hidden} in "
        f"{layers} layers"
    )


def _first_layers(adapters: list[dict[str, Any]], layers: int) -> list[dict[str, Any]]:
    """The adapters restricted to layers ``0 .. layers-1``."""
    keep = tuple(f".layers.{i}." for i in range(layers))
    return [{k: v for k, v in a.items() if any(t in k for t in keep)} for a in adapters]


def _rule_run(
    rule: str,
    scale: LoraScale,
    device: Any,
    every: list[dict[str, Any]],
    label: str,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """Time ``rule`` on one layer (warm-up), then on all layers or those that fit.

    With ``budget_s`` the one-layer time decides how many layers are timed
    (at least one); the round's seconds are then extrapolated per layer.
    """
    one = timed(
        lambda: _aggregate(rule, _first_layers(every, 1), scale, device), device
    )
    layers = scale.layers
    if budget_s is not None and one * scale.layers > budget_s:
        layers = max(1, min(scale.layers, int(budget_s / max(one, 1e-9))))
    adapters = every if layers == scale.layers else _first_layers(every, layers)
    seconds = timed(lambda: _aggregate(rule, adapters, scale, device), device)
    full = seconds * scale.layers / layers
    words = _scale_words(scale, scale.layers)
    if layers != scale.layers:
        words = (
            f"measured on {layers} of {scale.layers} layers; seconds extrapolated "
            f"to {words}"
        )
    return figure(
        f"{AGGREGATE}('{rule}') ({label})",
        device,
        words,
        full,
        1.0 / full,
        "rounds/s",
        extrapolated=layers != scale.layers,
        measured_s=seconds,
        layers_measured=layers,
        one_layer_warm_up_s=one,
        modules=2 * scale.layers,
    )


def section_lora(scale: LoraScale, device: Any) -> dict[str, Any]:
    """Aggregation figures: FedAvg and FlexLoRA on ``device``, then on the CPU.

    Returns
    -------
    dict[str, Any]
        ``function``, ``target`` and ``runs`` (figures).
    """
    import torch

    dev = torch.device(device)
    label = "device" if dev.type != "cpu" else "primary run"
    every = _adapters(scale, scale.layers)
    runs = [
        _rule_run("fedavg", scale, dev, every, label),
        _rule_run("flexlora", scale, dev, every, label, scale.svd_budget_s),
        _rule_run("fedavg", scale, "cpu", every, "CPU"),
        _rule_run("flexlora", scale, "cpu", every, "CPU", scale.cpu_svd_budget_s),
    ]
    return {
        "function": AGGREGATE,
        "target": "seconds per round, to set against a round's training time",
        "runs": runs,
    }
