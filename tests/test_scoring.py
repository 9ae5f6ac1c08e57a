"""Tests for corpora.scoring: normalisation, exact match, ROUGE-L and score()."""

from __future__ import annotations

import itertools
import random

import pytest

from corpora import METRICS, ScoringError, exact_match, normalize_answer, rouge_l, score


def test_normalize_answer() -> None:
    """Whitespace and trailing periods must not matter, case and inner periods must."""
    assert normalize_answer("  42.  ") == "42"
    assert normalize_answer("sun\t cat\n red.") == "sun cat red"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("APPLE") == "APPLE"


def test_exact_match_after_normalization() -> None:
    """exact_match must ignore spacing/trailing period but stay case-sensitive
    (the uppercase task depends on it)."""
    assert exact_match(" 68.", "68") == 1.0
    assert exact_match("2  4 7", "2 4 7") == 1.0
    assert exact_match("apple", "APPLE") == 0.0
    assert exact_match("69", "68") == 0.0


def test_rouge_l_hand_computed() -> None:
    """Hand-computed ROUGE-L F1 values; a wrong LCS or P/R swap changes them.

    "the cat sat on the mat" (6 tokens) vs "the cat on the mat" (5 tokens):
    LCS = "the cat on the mat" = 5, P = 5/6, R = 5/5, F1 = 2PR/(P+R) = 10/11.
    "a b c d" vs "b d a": LCS = "b d" = 2, P = 2/4, R = 2/3, F1 = 4/7.
    """
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(
        10 / 11
    )
    assert rouge_l("a b c d", "b d a") == pytest.approx(4 / 7)
    assert rouge_l("b d a", "a b c d") == pytest.approx(4 / 7)


def test_rouge_l_tokenization_and_edge_cases() -> None:
    """Case and punctuation must be ignored like rouge-score's tokenizer; empty
    or disjoint inputs score 0.0."""
    assert rouge_l("Don't STOP-now!", "don t stop now") == 1.0
    assert rouge_l("Hello, World!", "hello world") == 1.0
    assert rouge_l("", "hello") == 0.0
    assert rouge_l("hello", "...") == 0.0
    assert rouge_l("abc", "xyz") == 0.0


def _brute_lcs(first: list[str], second: list[str]) -> int:
    """LCS length by trying every subsequence of the shorter list."""
    shorter, longer = sorted((first, second), key=len)
    for size in range(len(shorter), 0, -1):
        for combo in itertools.combinations(shorter, size):
            iterator = iter(longer)
            if all(token in iterator for token in combo):
                return size
    return 0


def test_rouge_l_matches_brute_force_lcs() -> None:
    """On random short token lists the DP LCS must equal exhaustive search."""
    rng = random.Random(0)
    for _ in range(200):
        first = [rng.choice("abcd") for _ in range(rng.randint(1, 7))]
        second = [rng.choice("abcd") for _ in range(rng.randint(1, 7))]
        lcs = _brute_lcs(first, second)
        expected = 0.0 if lcs == 0 else 2 * lcs / (len(first) + len(second))
        assert rouge_l(" ".join(first), " ".join(second)) == pytest.approx(expected)


def test_score_means_and_registry() -> None:
    """score() must average the named metric; METRICS must offer the four names."""
    assert set(METRICS) == {"exact_match", "rouge_l", "rouge_l_fedkseed", "accuracy"}
    assert score("exact_match", ["a", "b", "c", "d"], ["a", "x", "c", "d"]) == 0.75
    labels = ["card_arrival", "card_arrival"]
    assert score("accuracy", ["card_arrival", "lost_card"], labels) == 0.5
    assert score("rouge_l", ["a b c d", "x"], ["b d a", "x"]) == pytest.approx(
        (4 / 7 + 1) / 2
    )


def test_score_errors() -> None:
    """Unknown metric names must be reported with the supported ones; mismatched
    or empty inputs must not silently produce a number."""
    with pytest.raises(ValueError, match="bleu.*accuracy, exact_match, rouge_l"):
        score("bleu", ["a"], ["a"])
    with pytest.raises(ScoringError, match="2 predictions but 1 references"):
        score("exact_match", ["a", "b"], ["a"])
    with pytest.raises(ScoringError, match="no predictions"):
        score("rouge_l", [], [])
