"""Task metrics on generated strings: exact match, accuracy and ROUGE-L.

This module owns the string-level metrics used for per-task evaluation on
clients and server: answer normalisation (:func:`normalize_answer`), the
per-pair metrics (:func:`exact_match`, :func:`rouge_l`), the registry
:data:`METRICS` and the mean over a batch (:func:`score`).

ROUGE-L follows the ``rouge-score`` package's defaults (no stemming):
text is lowercased, every run of characters outside ``[a-z0-9]`` becomes a
word boundary, and F1 is computed from the longest common subsequence of the
resulting word tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

_WHITESPACE = re.compile(r"\s+")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


class ScoringError(ValueError):
    """Raised for an unknown metric name or mismatched inputs to :func:`score`."""


def normalize_answer(text: str) -> str:
    """Normalise an answer for exact comparison.

    Strips surrounding whitespace, collapses inner whitespace runs to one
    space and removes trailing periods. Case is preserved.

    Parameters
    ----------
    text : str
        A prediction or reference.

    Returns
    -------
    str
        The normalised answer.
    """
    collapsed = _WHITESPACE.sub(" ", text).strip()
    return collapsed.rstrip(".").rstrip()


def exact_match(prediction: str, reference: str) -> float:
    """Score 1.0 when the normalised strings are equal, else 0.0.

    The comparison is case-sensitive (``"Apple"`` does not match
    ``"APPLE"``), because some built-in tasks check capitalisation.

    Parameters
    ----------
    prediction : str
        Model output.
    reference : str
        Expected answer.

    Returns
    -------
    float
        1.0 or 0.0.
    """
    return 1.0 if normalize_answer(prediction) == normalize_answer(reference) else 0.0


def rouge_tokens(text: str) -> list[str]:
    """Tokenise text like ``rouge-score``'s default tokenizer.

    Parameters
    ----------
    text : str
        Any text.

    Returns
    -------
    list of str
        Lowercased alphanumeric (ASCII) word tokens.
    """
    return [token for token in _NON_ALNUM.sub(" ", text.lower()).split() if token]


def _lcs_length(first: Sequence[str], second: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    if len(first) < len(second):
        first, second = second, first
    previous = [0] * (len(second) + 1)
    for token in first:
        current = [0]
        for column, other in enumerate(second, start=1):
            if token == other:
                current.append(previous[column - 1] + 1)
            else:
                current.append(max(previous[column], current[column - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between a prediction and a reference.

    Precision is ``LCS / len(prediction tokens)``, recall is
    ``LCS / len(reference tokens)`` and the result is their harmonic mean.

    Parameters
    ----------
    prediction : str
        Model output.
    reference : str
        Expected answer.

    Returns
    -------
    float
        F1 in ``[0, 1]``; 0.0 when either side has no tokens.
    """
    predicted, expected = rouge_tokens(prediction), rouge_tokens(reference)
    if not predicted or not expected:
        return 0.0
    common = _lcs_length(predicted, expected)
    if common == 0:
        return 0.0
    precision = common / len(predicted)
    recall = common / len(expected)
    return 2 * precision * recall / (precision + recall)


METRICS: Mapping[str, Callable[[str, str], float]] = MappingProxyType(
    {
        "accuracy": exact_match,
        "exact_match": exact_match,
        "rouge_l": rouge_l,
    }
)
"""Read-only registry of per-pair metrics; ``accuracy`` is exact match on labels."""


def score(
    metric_name: str, predictions: Sequence[str], references: Sequence[str]
) -> float:
    """Mean of a metric over paired predictions and references.

    Parameters
    ----------
    metric_name : str
        A key of :data:`METRICS`.
    predictions : sequence of str
        Model outputs.
    references : sequence of str
        Expected answers, same length as ``predictions``.

    Returns
    -------
    float
        The mean per-pair score.

    Raises
    ------
    ScoringError
        If the metric is unknown (the message lists the supported names), the
        lengths differ, or there are no pairs.
    """
    if metric_name not in METRICS:
        raise ScoringError(
            f"unknown metric {metric_name!r}; supported: {', '.join(sorted(METRICS))}"
        )
    if len(predictions) != len(references):
        raise ScoringError(
            f"score({metric_name!r}): {len(predictions)} predictions but "
            f"{len(references)} references"
        )
    if not predictions:
        raise ScoringError(f"score({metric_name!r}): no predictions to score")
    metric = METRICS[metric_name]
    total = sum(
        metric(pred, ref) for pred, ref in zip(predictions, references, strict=True)
    )
    return total / len(predictions)
