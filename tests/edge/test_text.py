"""models.text: the torch-free prompt masking every party tokenizes with."""

from __future__ import annotations

from models.text import IGNORE_INDEX, TokenizedExample, format_prompt, tokenize_ids


def test_short_pair_is_kept_whole_with_the_prompt_masked() -> None:
    got = tokenize_ids([1, 2, 3], [7, 8], eos_id=9, max_length=16)
    assert got == TokenizedExample(
        input_ids=(1, 2, 3, 7, 8, 9),
        labels=(IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9),
    )


def test_long_pair_cuts_the_answer_and_keeps_the_prompt_tail() -> None:
    """The answer (with eos) keeps max_length - 8 tokens; the prompt its last."""
    got = tokenize_ids(list(range(100, 120)), list(range(20)), eos_id=99, max_length=12)
    assert got.input_ids == (*range(112, 120), 0, 1, 2, 3)
    assert got.labels == (IGNORE_INDEX,) * 8 + (0, 1, 2, 3)
    short = tokenize_ids(list(range(100, 120)), [5], eos_id=99, max_length=12)
    assert short.input_ids == (*range(110, 120), 5, 99)
    assert short.labels == (IGNORE_INDEX,) * 10 + (5, 99)


def test_format_prompt_strips_and_fills_the_template() -> None:
    assert format_prompt("  Hi \n") == "### Instruction:\nHi\n\n### Response:\n"
