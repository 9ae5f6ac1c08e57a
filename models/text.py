"""The prompt template and prompt masking, without torch.

Training and evaluation on every party format text the same way, an edge
device included, so this part of :mod:`models.batching` imports nothing but
the standard library. An example becomes

    ### Instruction:
    {prompt}

    ### Response:
    {response}<eos>

and only the response tokens (and the end-of-sequence token) carry loss.
Prompts are truncated from the left when the pair does not fit
``max_length``, so the response is kept whole whenever it can be.
:func:`tokenize_ids` is that rule on token ids; any tokenizer (Hugging Face's,
or ``tokenizers.Tokenizer`` on a device) supplies the ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_TEMPLATE",
    "TokenizedExample",
    "format_prompt",
    "tokenize_ids",
]

IGNORE_INDEX = -100
PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass(frozen=True, slots=True)
class TokenizedExample:
    """Token ids of one example and its loss mask (``IGNORE_INDEX`` on the prompt)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def format_prompt(prompt: str) -> str:
    """The text the model sees before its answer."""
    return PROMPT_TEMPLATE.format(prompt=prompt.strip())


def tokenize_ids(
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    eos_id: int,
    max_length: int,
) -> TokenizedExample:
    """One example from the ids of its formatted prompt and its answer.

    The answer plus ``eos_id`` is cut to at most ``max_length - 8`` tokens and
    the prompt keeps its last tokens, so at least a little context survives.

    Parameters
    ----------
    prompt_ids
        Ids of :func:`format_prompt` of the prompt, no special tokens added.
    answer_ids
        Ids of the stripped response, no special tokens added.
    eos_id
        The end-of-sequence token id.
    max_length
        Token budget of the example.
    """
    answer = [*answer_ids, eos_id][: max_length - 8]
    prompt = list(prompt_ids)[-(max_length - len(answer)) :]
    return TokenizedExample(
        input_ids=tuple(prompt + answer),
        labels=tuple([IGNORE_INDEX] * len(prompt) + answer),
    )
