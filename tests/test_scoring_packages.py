"""Rouge-L by the papers' packages, per-example scores and bootstrap intervals.

``corpora.scoring`` must be a thin, exact front of ``rouge-score`` (metric
``rouge_l``) and ``rouge`` 1.0.1 (metric ``rouge_l_fedkseed``), and its
bootstrap interval must be the documented percentile bootstrap.
"""

from __future__ import annotations

import numpy as np
import pytest
from rouge import Rouge
from rouge_score import rouge_scorer

from corpora import (
    METRICS,
    ScoringError,
    bootstrap_interval,
    per_example_scores,
    rouge_l,
    rouge_l_fedkseed,
    score,
)

# (prediction, reference): punctuation, case, unicode, numbers, repeats, empty,
# whitespace, multi-line answers, long answers.
PAIRS: list[tuple[str, str]] = [
    ("the cat sat on the mat", "the cat on the mat"),
    ("a b c d", "b d a"),
    ("Hello, World!", "hello world"),
    ("HELLO world", "hello WORLD"),
    ("Don't stop-now!", "do not stop now"),
    ("café au lait", "cafe au lait"),
    ("naïve résumé", "naive resume"),
    ("東京は日本の首都です", "東京は首都"),
    ("Ünïcödé ∑ symbols 42", "unicode symbols 42"),
    ("3.14 is pi", "pi is 3.14"),
    ("1,000,000 dollars", "1000000 dollars"),
    ("", "hello"),
    ("hello", ""),
    ("", ""),
    ("   ", "a b"),
    ("...", "a"),
    ("a", "..."),
    ("!!!", "???"),
    ("The answer is:\nPositive", "Positive"),
    ("line one\nline two\n\nline three", "line one line three"),
    ("x y", "x y x y"),
    ("the the the", "the"),
    ("a. b. c.", "a b c"),
    ("Yes.", "yes"),
    ("no", "yes"),
    ("red green blue", "blue green red"),
    ("tab\tseparated\twords", "tab separated words"),
    ("e-mail me at a@b.com", "email me at a b com"),
    ("One sentence. Another sentence here.", "another sentence. one sentence"),
    (
        " ".join(f"w{i % 17}" for i in range(120)),
        " ".join(f"w{i % 13}" for i in range(90)),
    ),
]


def test_rouge_l_is_the_rouge_score_package_on_the_whole_answer() -> None:
    """Breaks if metric ``rouge_l`` is anything but rouge-score's Rouge-L F
    (no stemming) on the full strings, e.g. a hand-written LCS with another
    tokenizer or a first-line cut."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert len(PAIRS) >= 30
    for pred, ref in PAIRS:
        want = scorer.score(ref, pred)["rougeL"].fmeasure
        assert METRICS["rouge_l"](pred, ref) == want, (pred, ref)
    # The whole answer counts: 4 words, LCS 1, P = 1/4, R = 1, F = 0.4; a
    # first-line cut ("The answer is:") would score 0.0.
    assert rouge_l("The answer is:\nPositive", "Positive") == pytest.approx(0.4)


def _package_or_zero(pred: str, ref: str) -> float:
    """The rouge package called directly; its refusals (no word) mean 0.0."""
    try:
        return Rouge().get_scores(pred, ref)[0]["rouge-l"]["f"]
    except ValueError:
        return 0.0


def test_rouge_l_fedkseed_is_the_rouge_package() -> None:
    """Breaks if ``rouge_l_fedkseed`` is not rouge 1.0.1's Rouge-L F on pairs
    with words on both sides, or if a side without words does not score 0.0
    (the package raises on those instead)."""
    for pred, ref in PAIRS:
        has_words = pred.replace(".", " ").split() and ref.replace(".", " ").split()
        want = _package_or_zero(pred, ref) if has_words else 0.0
        assert METRICS["rouge_l_fedkseed"](pred, ref) == want, (pred, ref)
    for pred, ref in [("", "a"), ("a", ""), ("...", "a"), ("a", ". ."), (" ", " ")]:
        assert rouge_l_fedkseed(pred, ref) == 0.0
    with pytest.raises(ValueError):
        Rouge().get_scores("...", "a")  # what the wrapper turns into 0.0


def test_the_two_rouge_metrics_are_two_packages() -> None:
    """The packages disagree on case, commas and repeated words: proof that
    the two metric names reach two different scorers."""
    assert rouge_l("Hello, World!", "hello world") == 1.0
    assert rouge_l_fedkseed("Hello, World!", "hello world") == 0.0
    assert rouge_l("x y", "x y x y") == pytest.approx(2 / 3)
    assert rouge_l_fedkseed("x y", "x y x y") == pytest.approx(1.0, abs=1e-6)


def test_rouge_l_fedkseed_scores_long_answers() -> None:
    """The rouge package recurses once per word and fails past ~500 words by
    itself; the wrapper must still score a 1,200-word pair."""
    long_a = " ".join(f"w{i % 50}" for i in range(1200))
    long_b = " ".join(f"w{(i * 7) % 50}" for i in range(1200))
    with pytest.raises(RecursionError):
        Rouge().get_scores(long_a, long_b)
    assert 0.0 < rouge_l_fedkseed(long_a, long_b) <= 1.0


def test_per_example_scores_feed_score() -> None:
    """Per-example scores are each pair's metric, in order, and score() is
    their mean; input errors are the same ScoringError."""
    preds, refs = ["a b c d", "x", "no"], ["b d a", "x", "yes"]
    got = per_example_scores("rouge_l", preds, refs)
    assert got == [rouge_l(p, r) for p, r in zip(preds, refs, strict=True)]
    assert got[1] == 1.0 and got[2] == 0.0
    assert score("rouge_l", preds, refs) == pytest.approx(sum(got) / 3)
    with pytest.raises(ScoringError, match="2 predictions but 1 references"):
        per_example_scores("exact_match", ["a", "b"], ["a"])
    with pytest.raises(ScoringError, match="supported: .*rouge_l_fedkseed"):
        per_example_scores("bleu", ["a"], ["a"])


def _loop_interval(
    scores: list[float], level: float, resamples: int, seed: int
) -> tuple[float, float]:
    """The percentile bootstrap written out: same draws, Python means, sorted
    means, linear interpolation between order statistics."""
    n = len(scores)
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = sorted(sum(scores[int(i)] for i in row) / n for row in draws)

    def quantile(q: float) -> float:
        pos = q * (resamples - 1)
        lo = int(pos)
        hi = min(lo + 1, resamples - 1)
        return means[lo] + (means[hi] - means[lo]) * (pos - lo)

    tail = (1 - level) / 2
    return quantile(tail), quantile(1 - tail)


def test_bootstrap_interval_equals_the_hand_computed_one() -> None:
    """Breaks if the interval uses other draws, another statistic than the
    mean, or other percentiles than (1 -/+ level) / 2."""
    scores = [0.0, 0.25, 1.0, 0.5, 0.75, 0.1, 0.9, 0.3, 0.0, 1.0, 0.6]
    for level, resamples, seed in [(0.95, 1000, 0), (0.9, 257, 7), (0.5, 50, 3)]:
        got = bootstrap_interval(scores, level=level, resamples=resamples, seed=seed)
        want = _loop_interval(scores, level, resamples, seed)
        assert got == pytest.approx(want, abs=1e-12)
    mean = sum(scores) / len(scores)
    low, high = bootstrap_interval(scores)
    assert low < mean < high
    assert bootstrap_interval(scores) == (low, high)  # deterministic
    assert bootstrap_interval(scores, seed=1) != (low, high)


def test_bootstrap_interval_known_distributions() -> None:
    """Scores [0, 1]: a resample's mean is 0, 1/2 or 1 with probability 1/4,
    1/2, 1/4, so the 2.5% and 97.5% quantiles of many resamples are 0 and 1.
    Constant scores have every resample mean equal to the constant."""
    assert bootstrap_interval([0.0, 1.0], resamples=4000) == (0.0, 1.0)
    assert bootstrap_interval([0.1] * 7) == (0.1, 0.1)
    assert bootstrap_interval([0.5]) == (0.5, 0.5)
    # A 50% interval of [0, 1] is the middle value 1/2 on both sides.
    assert bootstrap_interval([0.0, 1.0], level=0.4, resamples=4000) == (0.5, 0.5)


def test_bootstrap_interval_refuses_bad_input() -> None:
    """Empty scores, a level outside (0, 1), no resamples or a NaN score are
    one-line ScoringErrors, not a silent interval."""
    with pytest.raises(ScoringError, match="no scores"):
        bootstrap_interval([])
    for level in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ScoringError, match=r"level must be in \(0, 1\)"):
            bootstrap_interval([0.5], level=level)
    with pytest.raises(ScoringError, match="resamples"):
        bootstrap_interval([0.5], resamples=0)
    with pytest.raises(ScoringError, match="finite"):
        bootstrap_interval([0.5, float("nan")])
