"""Attaching LoRA adapters with PEFT, and moving adapter tensors in and out.

The adapter is addressed by a stable, ordered mapping from parameter name to
tensor (PEFT's names with the adapter name removed), which is exactly what the
codec sends. Both sides derive the same :class:`~protocols.TensorLayout` from
the same spec and base model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel

from protocols import LoraSpec, TensorLayout

__all__ = [
    "BaseWeights",
    "adapter_layout",
    "adapter_tensors",
    "attach_lora",
    "load_adapter_folder",
    "load_adapter_tensors",
    "merge_adapter_folder",
    "peft_config",
]


@contextmanager
def _peft_probe_quiet() -> Iterator[None]:
    """Silence one FutureWarning that PEFT 0.21 triggers in transformers 5.

    ``PeftModel.__init__`` reads ``model.is_gradient_checkpointing``, which
    transformers 5 deprecated in favour of ``is_activation_checkpointing``.
    The call is PEFT's, not ours, so only that exact warning is filtered, only
    around PEFT's constructor; any other warning still shows.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message="`is_gradient_checkpointing` is deprecated",
            category=FutureWarning,
        )
        yield


def peft_config(spec: LoraSpec) -> LoraConfig:
    """The PEFT ``LoraConfig`` of a spec (causal-LM task, no bias)."""
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(
    model: PreTrainedModel, spec: LoraSpec, *, init_seed: int = 0
) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters (in place; base frozen).

    Adapter A matrices are drawn from a private generator seeded with
    ``init_seed`` (B starts at zero), so the server's initial adapter is
    reproducible and the caller's RNG is untouched.

    Raises
    ------
    ValueError
        If none of ``spec.target_modules`` exists in the model (from PEFT).
    """
    with torch.random.fork_rng(devices=[]), _peft_probe_quiet():
        torch.manual_seed(init_seed)
        peft_model = get_peft_model(model, peft_config(spec))
    dtype = next(model.parameters()).dtype
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(dtype)
    return peft_model


def load_adapter_folder(model: PreTrainedModel, folder: Path) -> PeftModel:
    """``model`` wrapped with the PEFT adapter saved in ``folder`` (in place)."""
    with _peft_probe_quiet():
        peft_model: PeftModel = PeftModel.from_pretrained(model, folder)
    return peft_model


def merge_adapter_folder(model: PreTrainedModel, folder: Path) -> PreTrainedModel:
    """``model`` with the PEFT adapter saved in ``folder`` merged into it."""
    merged: PreTrainedModel = load_adapter_folder(model, folder).merge_and_unload()
    return merged


class BaseWeights:
    """The frozen base weights of a PEFT model's adapted modules, restorable.

    Modules are named by their adapter prefix, the PEFT state-dict name less
    ``.lora_A.weight`` (e.g. ``base_model.model.model.layers.0.self_attn.q_proj``),
    which is the module's own name in ``model``. FedEx-LoRA's residual is added
    to these weights: :meth:`pristine` keeps a copy of a module's weight the
    first time it is asked for, and :meth:`assign` writes new weights and puts
    every other kept module back to its copy bit for bit, so a model reused
    across rounds never carries a stale residual. The arithmetic of the fold
    is the caller's (``strategies.lora_factors.fold_residual``).

    Parameters
    ----------
    model : PeftModel
        The model whose base weights are managed; nothing is copied yet.
    """

    def __init__(self, model: PeftModel) -> None:
        self._model = model
        self._pristine: dict[str, torch.Tensor] = {}

    def _base(self, prefix: str) -> tuple[torch.Tensor, bool]:
        """The module's base weight (a live parameter) and its ``fan_in_fan_out``."""
        try:
            module = self._model.get_submodule(prefix)
        except AttributeError:
            module = None
        get_base = getattr(module, "get_base_layer", None)
        if module is None or not callable(get_base):
            raise ValueError(f"the model has no LoRA module {prefix!r}")
        weight = getattr(get_base(), "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"LoRA module {prefix!r} has no base weight")
        return weight, bool(getattr(module, "fan_in_fan_out", False))

    def fan_in_fan_out(self, prefix: str) -> bool:
        """Whether the module's weight is ``(in, out)`` (GPT-2 ``Conv1D``).

        Raises
        ------
        ValueError
            If the model has no LoRA module ``prefix``.
        """
        return self._base(prefix)[1]

    def pristine(self, prefix: str) -> torch.Tensor:
        """The module's base weight as it was before any :meth:`assign`.

        Raises
        ------
        ValueError
            If the model has no LoRA module ``prefix``.
        """
        if prefix not in self._pristine:
            self._pristine[prefix] = self._base(prefix)[0].detach().clone()
        return self._pristine[prefix]

    def assign(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Set these modules' base weights; put every other kept one back.

        ``weights`` maps prefixes to tensors of each weight's shape (cast to
        its dtype); a module not named whose pristine copy is kept gets that
        copy back. Every prefix is checked before any weight is written.

        Raises
        ------
        ValueError
            If a prefix names no LoRA module or a shape does not match.
        """
        for prefix, value in weights.items():
            want = self.pristine(prefix).shape
            if value.shape != want:
                raise ValueError(
                    f"base weight of {prefix!r} is {tuple(want)}, got "
                    f"{tuple(value.shape)}"
                )
        with torch.no_grad():
            for prefix, kept in self._pristine.items():
                self._base(prefix)[0].copy_(weights.get(prefix, kept))

    def restore(self) -> None:
        """Every kept module's base weight back to its pristine copy."""
        self.assign({})


def adapter_tensors(model: PeftModel) -> dict[str, torch.Tensor]:
    """Detached copies of the adapter tensors, in PEFT's state-dict order."""
    state = get_peft_model_state_dict(model)
    return {k: v.detach().clone() for k, v in state.items()}


def adapter_layout(model: PeftModel) -> TensorLayout:
    """The layout the adapter of ``model`` has on the wire."""
    return TensorLayout.of(get_peft_model_state_dict(model))


def load_adapter_tensors(model: PeftModel, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the adapter of ``model`` (layout already checked).

    Raises
    ------
    ValueError
        If a tensor name is not an adapter parameter of ``model``.
    """
    result = set_peft_model_state_dict(model, dict(tensors))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter tensors not in the model: {unexpected[:5]}")
