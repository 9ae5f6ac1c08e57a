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
    "adapter_layout",
    "adapter_tensors",
    "attach_lora",
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


def merge_adapter_folder(model: PreTrainedModel, folder: Path) -> PreTrainedModel:
    """``model`` with the PEFT adapter saved in ``folder`` merged into it."""
    with _peft_probe_quiet():
        peft_model = PeftModel.from_pretrained(model, folder)
    merged: PreTrainedModel = peft_model.merge_and_unload()
    return merged


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
