"""The model a :class:`~protocols.ZOSpec` perturbs, built in one place.

Server, torch clients and the edge export all build FedKSeed's model here, so
they agree on its parameters and on w0:

- without an adapter (``adapter_rank == 0``) it is the base model in float32
  and the walk is its floating-point parameters (those ``include`` selects);
- with an adapter it is the base model, frozen, wrapped by PEFT with LoRA
  adapters (dropout 0, no bias) on the ``adapter_targets`` modules; the walk
  is the adapters' A and B matrices only, and their initial values are set by
  :func:`init_adapter_`, which draws from the protocol's own generator and
  never touches torch's RNG, so every party gets the same w0 bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.loading import load_causal_lm
from models.lora import attach_lora
from protocols import LoraSpec, ProtocolError, ZOSpec
from protocols.param_walk import ParamWalk
from protocols.philox import gaussian_numpy

__all__ = [
    "ADAPTER_INIT_PREFIX",
    "AdapterShape",
    "ZoModel",
    "adapter_init_values",
    "attach_zo_adapter",
    "init_adapter_",
    "load_zo_model",
    "write_w0_",
    "zo_model_for",
    "zo_walk",
]

ADAPTER_INIT_PREFIX = "lora-init/"
"""Prefix of the generator stream names of the initial A matrices: streams
``(adapter_seed, ADAPTER_INIT_PREFIX + name)`` never coincide with a
perturbation's ``(seed, name)``."""


@dataclass(frozen=True, slots=True)
class AdapterShape:
    """A LoRA adapter perturbed by FedKSeed: shape and initialisation.

    Attributes
    ----------
    rank : int
        LoRA rank r (> 0).
    alpha : float
        Scaling numerator (the update is scaled by alpha / r).
    targets : tuple[str, ...]
        Module names that get adapters (PEFT ``target_modules``).
    seed : int
        Seed of the initial A matrices.
    """

    rank: int
    alpha: float
    targets: tuple[str, ...]
    seed: int = 0

    @classmethod
    def of(cls, spec: ZOSpec) -> AdapterShape | None:
        """The adapter a spec records, or None for base-parameter perturbation."""
        if not spec.has_adapter:
            return None
        return cls(
            spec.adapter_rank,
            spec.adapter_alpha,
            spec.adapter_targets,
            spec.adapter_seed,
        )

    def lora_spec(self, model_name: str) -> LoraSpec:
        """The equivalent :class:`LoraSpec` (dropout 0), for PEFT's config."""
        return LoraSpec(
            model=model_name,
            rank=self.rank,
            alpha=self.alpha,
            dropout=0.0,
            target_modules=self.targets,
        )


@dataclass
class ZoModel:
    """FedKSeed's model: what runs forward, and the walk of what is perturbed.

    Attributes
    ----------
    model : PreTrainedModel
        The base model, or the PEFT model wrapping it in adapter mode (eval
        mode, float32).
    tokenizer : PreTrainedTokenizerBase
        The base model's tokenizer.
    walk : ParamWalk
        The perturbed parameters in walk order.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    walk: ParamWalk

    def params(self) -> list[tuple[str, torch.Tensor]]:
        """The live perturbed tensors in walk order."""
        return self.walk.params(self.model)


def adapter_init_values(
    name: str, shape: Sequence[int], seed: int
) -> np.ndarray | None:
    """The initial value of adapter tensor ``name``, float32, or None if zero.

    A LoRA A matrix (``lora_A`` in the name; shape ``(r, fan_in)``) gets
    ``z * s`` with ``z`` the generator's stream ``(seed, ADAPTER_INIT_PREFIX +
    name)`` and ``s = float32(1 / sqrt(3 * fan_in))``, the standard deviation
    of PEFT's default init (Kaiming-uniform with ``a = sqrt(5)``, i.e.
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``); the product is one float32
    rounding, so numpy and torch give the same bits. A B matrix starts at
    zero (None), so the adapted model starts as the base model.

    Raises
    ------
    ProtocolError
        If ``name`` is neither a LoRA A nor a LoRA B matrix.
    """
    if "lora_B" in name:
        return None
    if "lora_A" not in name or len(shape) != 2:
        raise ProtocolError(f"'{name}' {tuple(shape)} is not a LoRA A or B matrix")
    numel = math.prod(shape)
    scale = np.float32(1.0 / math.sqrt(3.0 * shape[1]))
    z = gaussian_numpy(seed, ADAPTER_INIT_PREFIX + name, numel)
    values: np.ndarray = (z * scale).reshape(tuple(shape))
    return values


def init_adapter_(params: Sequence[tuple[str, torch.Tensor]], seed: int) -> None:
    """Write the deterministic initial adapter into ``params`` (in place).

    See :func:`adapter_init_values`; ``params`` are the walk's A and B tensors.
    """
    with torch.no_grad():
        for name, p in params:
            values = adapter_init_values(name, tuple(p.shape), seed)
            if values is None:
                p.zero_()
            else:
                p.copy_(torch.from_numpy(values))


def attach_zo_adapter(model: PreTrainedModel, adapter: AdapterShape) -> PeftModel:
    """Wrap ``model`` (frozen) with the adapter, initialised deterministically.

    Works on a weightless ``meta`` skeleton too (then nothing is initialised:
    only names and shapes exist).

    Raises
    ------
    ValueError
        If none of the targets exists in the model (from PEFT).
    """
    name = getattr(model.config, "name_or_path", "") or "base"
    peft_model = attach_lora(model, adapter.lora_spec(name))
    walk = ParamWalk.from_model(peft_model, trainable_only=True)
    params = walk.params(peft_model)
    if not any(p.is_meta for _, p in params):
        init_adapter_(params, adapter.seed)
    return peft_model


def zo_walk(
    model: nn.Module, include: Sequence[str], adapter: AdapterShape | None
) -> ParamWalk:
    """The walk of the ``model`` a spec perturbs (a skeleton is enough).

    With an adapter, ``model`` is wrapped in place (see
    :func:`attach_zo_adapter`) and the walk is the adapter's tensors.
    """
    return _perturbed(model, include, adapter)[1]


def _perturbed(
    model: nn.Module, include: Sequence[str], adapter: AdapterShape | None
) -> tuple[nn.Module, ParamWalk]:
    """``model`` (PEFT-wrapped with an adapter) and the walk of what it perturbs."""
    if adapter is None:
        return model, ParamWalk.from_model(model, include or None)
    if include:
        raise ProtocolError("zo.include cannot be combined with an adapter")
    wrapped = attach_zo_adapter(model, adapter)  # type: ignore[arg-type]
    return wrapped, ParamWalk.from_model(wrapped, trainable_only=True)


def load_zo_model(
    model_name: str,
    *,
    include: Sequence[str] = (),
    adapter: AdapterShape | None = None,
    device: torch.device | str = "cpu",
) -> ZoModel:
    """Load the base model in float32 on ``device`` and build what is perturbed.

    Raises
    ------
    models.ModelLoadError
        If the name resolves to nothing loadable.
    ProtocolError
        If ``include`` selects nothing, or is given with an adapter.
    """
    loaded = load_causal_lm(model_name, dtype="float32", device=device)
    model, walk = _perturbed(loaded.model, include, adapter)
    model.eval()
    return ZoModel(model, loaded.tokenizer, walk)  # type: ignore[arg-type]


def zo_model_for(spec: ZOSpec, device: torch.device | str = "cpu") -> ZoModel:
    """The model ``spec`` perturbs, at w0 (walk not yet checked against it)."""
    return load_zo_model(
        spec.model,
        include=spec.include,
        adapter=AdapterShape.of(spec),
        device=device,
    )


def write_w0_(spec: ZOSpec, params: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Reset the perturbed tensors ``params`` (walk order) to their w0.

    An adapter is re-initialised from its seed (its base never changes);
    otherwise the base model is rebuilt on the CPU and its values copied.
    """
    adapter = AdapterShape.of(spec)
    if adapter is not None:
        init_adapter_(params, adapter.seed)
        return
    fresh = load_causal_lm(spec.model, dtype="float32", device="cpu").model
    named = dict(fresh.named_parameters())
    with torch.no_grad():
        for name, p in params:
            p.copy_(named[name])
