"""Real examples for timed batches: tokenized rows of an exact length.

``corpora`` and ``models`` are imported inside the function, so importing
this module keeps a parent process lean.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any


def full_length_examples(
    path: Path, tokenizer: Any, n: int, length: int, seed: int
) -> list[Any]:
    """Up to ``n`` examples of the dataset at ``path``, exactly ``length`` tokens each.

    Examples are visited in a ``seed``-ed random order and kept when prompt
    plus response reach ``length`` tokens; ``tokenize_example`` truncates the
    prompt from the left to fit, so every row is ``length`` real tokens (no
    padding).

    Parameters
    ----------
    path : Path
        A dataset ``corpora.load_examples`` reads.
    tokenizer : transformers.PreTrainedTokenizerBase
        The model's tokenizer.
    n : int
        Examples wanted.
    length : int
        Tokens per example.
    seed : int
        Seed of the visiting order.

    Returns
    -------
    list[models.TokenizedExample]
        ``n`` tokenized examples, or fewer when fewer reach ``length`` tokens.
    """
    from models import tokenize_example

    return exact_length_rows(
        path, lambda e, budget: tokenize_example(e, tokenizer, budget), n, length, seed
    )


def exact_length_rows(
    path: Path,
    tokenize: Callable[[Any, int], Any],
    n: int,
    length: int,
    seed: int,
) -> list[Any]:
    """:func:`full_length_examples` with any tokenizing function (torch-free).

    ``tokenize(example, length)`` returns a ``models.text.TokenizedExample``
    (an edge device's ``tokenizers`` path builds them with
    ``models.text.tokenize_ids``); ``corpora`` imports no torch.
    """
    from corpora import load_examples

    examples = load_examples(str(path))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    chosen = []
    for i in order:
        t = tokenize(examples[i], length)
        if len(t.input_ids) == length:
            chosen.append(t)
            if len(chosen) == n:
                break
    return chosen
