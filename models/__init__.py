"""Building the models both sides use: base LM, tokenizer, LoRA, batching.

Client and server construct the same model from the same name and spec; this
package is where that construction lives, since neither side may import the
other. Loading only: no training loops.

Importing this package is cheap: each public name is imported from its module
(torch, transformers, PEFT) on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocols.lazy import lazy_exports

if TYPE_CHECKING:
    from models.batching import (
        TrainBatch,
        answer_loss,
        collate_prompts,
        collate_train,
        tokenize_example,
    )
    from models.loading import (
        BUILTIN_MODELS,
        LoadedModel,
        ModelLoadError,
        default_cache_dir,
        load_causal_lm,
        load_tokenizer,
        prepare_model,
    )
    from models.lora import (
        adapter_layout,
        adapter_tensors,
        attach_lora,
        load_adapter_tensors,
        peft_config,
    )
    from models.text import (
        IGNORE_INDEX,
        PROMPT_TEMPLATE,
        TokenizedExample,
        format_prompt,
    )
    from models.zo_model import AdapterShape, ZoModel, load_zo_model, zo_model_for

__all__ = [
    "AdapterShape",
    "BUILTIN_MODELS",
    "IGNORE_INDEX",
    "PROMPT_TEMPLATE",
    "LoadedModel",
    "ModelLoadError",
    "TokenizedExample",
    "TrainBatch",
    "ZoModel",
    "adapter_layout",
    "adapter_tensors",
    "answer_loss",
    "attach_lora",
    "collate_prompts",
    "collate_train",
    "default_cache_dir",
    "format_prompt",
    "load_adapter_tensors",
    "load_causal_lm",
    "load_tokenizer",
    "load_zo_model",
    "peft_config",
    "prepare_model",
    "tokenize_example",
    "zo_model_for",
]

_LAZY = {
    "AdapterShape": "models.zo_model",
    "ZoModel": "models.zo_model",
    "load_zo_model": "models.zo_model",
    "zo_model_for": "models.zo_model",
    "BUILTIN_MODELS": "models.loading",
    "IGNORE_INDEX": "models.text",
    "PROMPT_TEMPLATE": "models.text",
    "LoadedModel": "models.loading",
    "ModelLoadError": "models.loading",
    "TokenizedExample": "models.text",
    "TrainBatch": "models.batching",
    "adapter_layout": "models.lora",
    "adapter_tensors": "models.lora",
    "answer_loss": "models.batching",
    "attach_lora": "models.lora",
    "collate_prompts": "models.batching",
    "collate_train": "models.batching",
    "default_cache_dir": "models.loading",
    "format_prompt": "models.text",
    "load_adapter_tensors": "models.lora",
    "load_causal_lm": "models.loading",
    "load_tokenizer": "models.loading",
    "peft_config": "models.lora",
    "prepare_model": "models.loading",
    "tokenize_example": "models.batching",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
