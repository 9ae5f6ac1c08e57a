"""Turning examples into token batches: tokenization and collation in torch.

Training and evaluation on every party format text the same way, so this is
shared by clients and the server. The template and the prompt-masking rule
live in :mod:`models.text` (torch-free, so an edge device tokenizes exactly
alike); this module applies them with a Hugging Face tokenizer and collates
into torch tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from models.text import (
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    TokenizedExample,
    format_prompt,
    tokenize_ids,
)

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_TEMPLATE",
    "TokenizedExample",
    "TrainBatch",
    "collate_prompts",
    "collate_train",
    "format_prompt",
    "tokenize_example",
]


class _TextPair(Protocol):
    @property
    def prompt(self) -> str: ...

    @property
    def response(self) -> str: ...


@dataclass(frozen=True, slots=True)
class TrainBatch:
    """A right-padded batch: ids, attention mask and labels, each (B, T)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> TrainBatch:
        """Move every tensor to ``device``."""
        return TrainBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
        )


def tokenize_example(
    example: _TextPair, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> TokenizedExample:
    """Tokenize one example for causal-LM training with prompt masking.

    The response (plus EOS) is cut to at most ``max_length - 8`` tokens and
    the prompt keeps its last tokens, so at least a little context survives
    (:func:`models.text.tokenize_ids`).
    """
    prompt_ids = tokenizer(format_prompt(example.prompt), add_special_tokens=False)[
        "input_ids"
    ]
    answer_ids = tokenizer(example.response.strip(), add_special_tokens=False)[
        "input_ids"
    ]
    return tokenize_ids(prompt_ids, answer_ids, tokenizer.eos_token_id, max_length)


def collate_train(examples: Sequence[TokenizedExample], pad_id: int) -> TrainBatch:
    """Right-pad tokenized examples into one :class:`TrainBatch`."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return TrainBatch(ids, mask, labels)


def collate_prompts(
    prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad formatted prompts for batched generation: (ids, mask), each (B, T)."""
    rows = [
        tokenizer(format_prompt(p), add_special_tokens=False)["input_ids"][-max_length:]
        for p in prompts
    ]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask
