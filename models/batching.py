"""Turning examples into token batches: tokenization and collation in torch.

Training and evaluation on every party format text the same way, so this is
shared by clients and the server. The template and the prompt-masking rule
live in :mod:`models.text` (torch-free, so an edge device tokenizes exactly
alike); this module applies them with a Hugging Face tokenizer and collates
into torch tensors.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from models.text import (
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    TokenizedExample,
    format_prompt,
    tokenize_ids,
)

__all__ = [
    "FIT_MAX_LENGTH",
    "IGNORE_INDEX",
    "PROMPT_TEMPLATE",
    "TokenizedExample",
    "TrainBatch",
    "answer_loss",
    "collate_prompts",
    "collate_train",
    "fit_max_length",
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


@functools.cache
def _keeps_logits(kind: type) -> bool:
    """Whether a model class's ``forward`` takes ``logits_to_keep``."""
    return "logits_to_keep" in inspect.signature(kind.forward).parameters


def answer_loss(model: nn.Module, batch: TrainBatch) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens of ``batch``.

    The same value as ``model(..., labels=batch.labels).loss`` (Hugging
    Face's shifted mean over the labels that are not ``IGNORE_INDEX``), up
    to float rounding, but the vocabulary projection runs only at the
    positions whose next token carries loss (``logits_to_keep`` as a boolean
    mask): an answer of a dozen tokens after a long prompt no longer pays
    for a (B, T, vocabulary) logits tensor. A model whose ``forward`` has no
    ``logits_to_keep``, or that does not honour a mask, gets the full
    forward. Differentiable: LoRA training backpropagates through it.
    """
    labels = batch.labels
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if _keeps_logits(type(base)):
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            logits_to_keep=keep,
        ).logits
        targets = labels[:, 1:][keep[:, :-1]]
        if logits.dim() == 2 and logits.shape[0] == targets.shape[0]:
            return nn.functional.cross_entropy(logits.float(), targets)
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        labels=labels,
    )
    loss: torch.Tensor = out.loss
    return loss


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


FIT_MAX_LENGTH = 1024
"""The longest sequence :func:`fit_max_length` gives (FedKSeed's setting)."""


def fit_max_length(
    examples: Sequence[_TextPair],
    tokenizer: PreTrainedTokenizerBase,
    *,
    quantile: float = 0.99,
    multiple: int = 32,
    lo: int = 64,
    hi: int = FIT_MAX_LENGTH,
) -> int:
    """The sequence length that fits ``quantile`` of the examples whole.

    An example's length is that of its formatted prompt, its response and the
    end-of-sequence token (what :func:`tokenize_example` keeps when nothing
    is cut). The result is the smallest multiple of ``multiple`` that is at
    least the ``quantile`` of those lengths, clamped to ``[lo, hi]``.

    Parameters
    ----------
    examples : sequence of objects with ``prompt`` and ``response``
        The examples the length must fit (training and evaluation).
    tokenizer : PreTrainedTokenizerBase
        The model's tokenizer.
    quantile : float, default 0.99
        Share of the examples that must fit, in ``(0, 1]``.
    multiple, lo, hi : int
        Rounding step and bounds of the result.

    Returns
    -------
    int
        The length, ``lo <= result <= hi``; ``lo`` when there are no examples.

    Raises
    ------
    ValueError
        If ``quantile`` is outside ``(0, 1]`` or the bounds are inconsistent.
    """
    if not 0 < quantile <= 1 or multiple < 1 or not 0 < lo <= hi:
        raise ValueError(
            f"fit_max_length: need 0 < quantile <= 1, multiple >= 1 and "
            f"0 < lo <= hi, got {quantile}, {multiple}, {lo}, {hi}"
        )
    if not examples:
        return lo
    prompts = tokenizer(
        [format_prompt(e.prompt) for e in examples], add_special_tokens=False
    )["input_ids"]
    answers = tokenizer(
        [e.response.strip() for e in examples], add_special_tokens=False
    )["input_ids"]
    lengths = sorted(len(p) + len(a) + 1 for p, a in zip(prompts, answers, strict=True))
    covering = lengths[max(0, math.ceil(quantile * len(lengths)) - 1)]
    rounded = -(-covering // multiple) * multiple
    return min(hi, max(lo, rounded))
