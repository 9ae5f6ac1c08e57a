"""``model.max_length = "auto"`` and the default evaluation size, resolved once.

:func:`models.batching.fit_max_length` is the rule (on the byte tokenizer of
``tiny-llama``, one token per ASCII character); preparing a run writes the
resolved numbers into the run folder's ``config.toml``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from corpora import Example
from models import load_causal_lm
from models.batching import fit_max_length, format_prompt
from models.tokenizers import byte_tokenizer
from protocols.run_folder import RunFolder
from server.config import ConfigError, load_config
from server.run_data import fit_run_max_length, resolved_max_length
from simulation.prepare import prepare_run

TEMPLATE = len(format_prompt(""))  # characters the template adds to a prompt


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201 - PreTrainedTokenizerBase
    return load_causal_lm("tiny-llama").tokenizer


def _sized(total: int) -> Example:
    """An example of ``total`` tokens (template + prompt + response + eos)."""
    return Example("p" * (total - TEMPLATE - 2), "r", "g")


def test_lengths_count_the_template_response_and_eos(tokenizer) -> None:  # noqa: ANN001
    """One example of 100 tokens gives 128: its length rounded up to 32."""
    assert len(tokenizer(format_prompt("abc"))["input_ids"]) == TEMPLATE + 3
    assert fit_max_length([_sized(100)], tokenizer) == 128
    assert fit_max_length([_sized(96)], tokenizer) == 96
    assert fit_max_length([_sized(97)], tokenizer) == 128


def test_the_quantile_ignores_the_longest_percent(tokenizer) -> None:  # noqa: ANN001
    """99 examples of 100 tokens and one of 700: 99% fit in 128; at quantile 1
    the longest decides (704)."""
    examples = [_sized(100)] * 99 + [_sized(700)]
    assert fit_max_length(examples, tokenizer) == 128
    assert fit_max_length(examples, tokenizer, quantile=1.0) == 704
    assert fit_max_length([_sized(100)] * 98 + [_sized(700)] * 2, tokenizer) == 704


def test_the_length_is_clamped(tokenizer) -> None:  # noqa: ANN001
    """Short examples give the floor 64, long ones the cap 1024."""
    assert fit_max_length([_sized(40)], tokenizer) == 64
    assert fit_max_length([_sized(3000)], tokenizer) == 1024
    assert fit_max_length([], tokenizer) == 64
    with pytest.raises(ValueError, match="quantile"):
        fit_max_length([_sized(40)], tokenizer, quantile=0)


def test_config_accepts_auto_or_a_bounded_integer() -> None:
    """'auto' is the default; an integer stays; anything else is one message."""
    assert load_config().model.max_length == "auto"
    assert load_config(None, {"model.max_length": 200}).model.max_length == 200
    for bad in (8, 9000, "long", True):
        with pytest.raises(ConfigError, match="'auto' or an integer from 16 to 8192"):
            load_config(None, {"model.max_length": bad})


def _config(tmp_path: Path, **overrides: object):  # noqa: ANN202 - RunConfig
    return load_config(
        None,
        {
            "model.name": "tiny-llama",
            "data.limit": 400,
            "run.output_dir": str(tmp_path),
            **overrides,
        },
    )


def test_prepare_writes_the_resolved_numbers(tmp_path: Path) -> None:
    """The run folder's config.toml holds the fitted length and min(256, n // 4)
    evaluation examples; resolving the unprepared config gives the same length."""
    config = _config(tmp_path)
    folder = RunFolder(prepare_run(config, tmp_path / "run"))
    written = folder.config.read_text()
    resolved = load_config(folder.config)
    assert isinstance(resolved.model.max_length, int)
    assert f"max_length = {resolved.model.max_length}\n" in written
    assert resolved.model.max_length == resolved_max_length(config)
    assert resolved.data.eval_examples == 100  # 400 // 4
    assert sum(1 for _ in folder.eval_data.open()) == 100


def test_prepare_keeps_explicit_numbers(tmp_path: Path) -> None:
    """An explicit length and evaluation size are written as given."""
    config = _config(tmp_path, **{"model.max_length": 48, "data.eval_examples": 20})
    resolved = load_config(RunFolder(prepare_run(config, tmp_path / "run")).config)
    assert resolved.model.max_length == 48
    assert resolved.data.eval_examples == 20
    assert resolved_max_length(config) == 48


def test_auto_fits_the_long_prompts_of_the_data(tmp_path: Path) -> None:
    """A data file whose prompts are ~300 tokens gets 320, not the old 96."""
    data = tmp_path / "long.jsonl"
    data.write_text(
        "".join(
            f'{{"prompt": "{"w" * (300 - TEMPLATE - 4)}{i:02d}", "response": "r", '
            f'"group": "g{i % 3}"}}\n'
            for i in range(40)
        )
    )
    config = _config(tmp_path, **{"data.source": str(data), "data.limit": None})
    assert resolved_max_length(config) == 320


def test_fitting_a_length_reads_the_tokenizer_not_the_weights(tmp_path: Path) -> None:
    """A model folder holding only its tokenizer is enough to fit "auto".

    Breaks if fitting loaded the whole model to count tokens (minutes and
    gigabytes for a 7B model): this folder has no config and no weights.
    """
    folder = tmp_path / "tokenizer-only"
    byte_tokenizer().save_pretrained(folder)
    examples = [_sized(100), _sized(60)]
    assert fit_run_max_length(str(folder), examples) == 128
    assert fit_run_max_length("tiny-llama", examples) == 128
