"""Building the models both sides use: base LM, tokenizer, LoRA, batching.

Client and server construct the same model from the same name and spec; this
package is where that construction lives, since neither side may import the
other. Loading only: no training loops.
"""

from models.batching import (
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    TokenizedExample,
    TrainBatch,
    collate_prompts,
    collate_train,
    format_prompt,
    tokenize_example,
)
from models.loading import (
    BUILTIN_MODELS,
    LoadedModel,
    ModelLoadError,
    default_cache_dir,
    load_causal_lm,
    prepare_model,
)
from models.lora import (
    adapter_layout,
    adapter_tensors,
    attach_lora,
    load_adapter_tensors,
    peft_config,
)

__all__ = [
    "BUILTIN_MODELS",
    "IGNORE_INDEX",
    "PROMPT_TEMPLATE",
    "LoadedModel",
    "ModelLoadError",
    "TokenizedExample",
    "TrainBatch",
    "adapter_layout",
    "adapter_tensors",
    "attach_lora",
    "collate_prompts",
    "collate_train",
    "default_cache_dir",
    "format_prompt",
    "load_adapter_tensors",
    "load_causal_lm",
    "peft_config",
    "prepare_model",
    "tokenize_example",
]
