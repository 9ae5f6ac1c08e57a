"""Task metrics on generated strings: exact match, accuracy, Rouge-L, intervals.

This module owns the string-level metrics used for per-task evaluation on
clients and server: answer normalisation (:func:`normalize_answer`), the
per-pair metrics (:func:`exact_match`, :func:`rouge_l`,
:func:`rouge_l_fedkseed`), the registry :data:`METRICS`, the per-pair scores
of a batch (:func:`per_example_scores`), their mean (:func:`score`) and its
bootstrap interval (:func:`bootstrap_interval`).

Both Rouge-L variants are computed by the packages the papers use, on the
whole answer: ``rouge_l`` by ``rouge-score`` (Super-NaturalInstructions'
evaluation), ``rouge_l_fedkseed`` by ``rouge`` 1.0.1 (FedKSeed's reference
code). Pollinate has no Rouge-L of its own.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

_WHITESPACE = re.compile(r"\s+")


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


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F-measure of the ``rouge-score`` package on the whole answer.

    ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)``,
    as Super-NaturalInstructions' evaluation scores: text is lowercased, every
    run of characters outside ``[a-z0-9]`` separates words (so non-ASCII
    letters are dropped), and F1 comes from the longest common subsequence of
    the two word sequences.

    Parameters
    ----------
    prediction : str
        Model output.
    reference : str
        Expected answer.

    Returns
    -------
    float
        F1 in ``[0, 1]``; 0.0 when either side has no word.
    """
    scored = _rouge_score_scorer().score(reference, prediction)
    return float(scored["rougeL"].fmeasure)


@functools.cache
def _rouge_score_scorer() -> Any:
    """The one ``rouge-score`` scorer (imported on first use: it loads nltk)."""
    from rouge_score import rouge_scorer  # type: ignore[import-untyped]

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


@functools.cache
def _rouge_package() -> Any:
    """The one ``rouge`` (1.0.1) scorer, as FedKSeed's reference code builds it."""
    from rouge import Rouge  # type: ignore[import-untyped]

    return Rouge()


def rouge_l_fedkseed(prediction: str, reference: str) -> float:
    """Rouge-L F of the ``rouge`` package (1.0.1), as FedKSeed's code scores.

    ``rouge.Rouge().get_scores(prediction, reference)[0]["rouge-l"]["f"]`` on
    the whole answer. That package splits each text into sentences at ``"."``
    and into words at whitespace (case and punctuation other than ``"."``
    are kept), and computes the summary-level union LCS over *distinct*
    words, so it differs from :func:`rouge_l`.

    The package raises on a text without words (empty, whitespace or only
    ``"."``) and cannot reconstruct its LCS past Python's recursion limit;
    here a side without words scores 0.0, and the limit is raised for the
    call when a sentence pair is long.

    Parameters
    ----------
    prediction : str
        Model output (the package's hypothesis).
    reference : str
        Expected answer.

    Returns
    -------
    float
        F in ``[0, 1]``; 0.0 when either side has no word.
    """
    hyp_words = prediction.replace(".", " ").split()
    ref_words = reference.replace(".", " ").split()
    if not hyp_words or not ref_words:
        return 0.0
    needed = len(hyp_words) + len(ref_words) + 200  # _recon_lcs recurses once a word
    limit = sys.getrecursionlimit()
    if needed > limit:
        sys.setrecursionlimit(needed)
    try:
        scored = _rouge_package().get_scores(prediction, reference)
    except ValueError:  # "Hypothesis is empty." and the like
        return 0.0
    finally:
        if needed > limit:
            sys.setrecursionlimit(limit)
    return float(scored[0]["rouge-l"]["f"])


METRICS: Mapping[str, Callable[[str, str], float]] = MappingProxyType(
    {
        "accuracy": exact_match,
        "exact_match": exact_match,
        "rouge_l": rouge_l,
        "rouge_l_fedkseed": rouge_l_fedkseed,
    }
)
"""Read-only registry of per-pair metrics; ``accuracy`` is exact match on labels."""


def per_example_scores(
    metric_name: str, predictions: Sequence[str], references: Sequence[str]
) -> list[float]:
    """A metric's score of each prediction against its reference.

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
    list of float
        One score per pair, in order.

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
    return [
        metric(pred, ref) for pred, ref in zip(predictions, references, strict=True)
    ]


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
        The mean of :func:`per_example_scores`.

    Raises
    ------
    ScoringError
        As :func:`per_example_scores`.
    """
    scores = per_example_scores(metric_name, predictions, references)
    return sum(scores) / len(scores)


def bootstrap_interval(
    scores: Sequence[float],
    *,
    level: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-example scores.

    Draws ``resamples`` samples of ``n = len(scores)`` indices with
    replacement, ``numpy.random.default_rng(seed).integers(0, n,
    size=(resamples, n))``, takes each sample's mean and returns the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of those means
    (numpy's default linear interpolation). Deterministic for a seed.

    Parameters
    ----------
    scores : sequence of float
        Per-example scores (:func:`per_example_scores`).
    level : float, optional
        Coverage, strictly between 0 and 1.
    resamples : int, optional
        Number of bootstrap samples, at least 1.
    seed : int, optional
        Seed of the index draws.

    Returns
    -------
    tuple of float
        ``(low, high)``, with ``low <= mean <= high`` up to resampling noise.

    Raises
    ------
    ScoringError
        If ``scores`` is empty or not finite, or ``level`` or ``resamples`` is
        out of range.
    """
    if not 0.0 < level < 1.0:
        raise ScoringError(f"bootstrap_interval: level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ScoringError(
            f"bootstrap_interval: resamples must be >= 1, got {resamples}"
        )
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise ScoringError("bootstrap_interval: no scores to resample")
    if not np.isfinite(values).all():
        raise ScoringError("bootstrap_interval: scores must be finite")
    n = values.size
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = values[draws].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    # A mean lies within the scores' range; clipping removes rounding only.
    floor, ceiling = float(values.min()), float(values.max())
    return min(max(float(low), floor), ceiling), min(max(float(high), floor), ceiling)
