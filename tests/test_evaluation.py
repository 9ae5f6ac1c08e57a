"""Tests for server.evaluation (central evaluation) and the run folder's files.

The evaluation loss is the run's main learning curve, so it is checked
against a loss computed independently here, example by example, from the
model's logits; the generation metric is checked through examples whose
references are (or are not) the model's own greedy answers. Checkpoint files
must be readable back exactly and written without leaving temporary files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file

import models
from corpora import Example, bootstrap_interval, generate_tasks
from protocols import LoraSpec
from protocols.durable import atomic_write_bytes
from protocols.run_folder import MetricsLog, RunFolder
from server.checkpoints import save_peft_adapter
from server.evaluation import CentralEvaluator, EvalResult, pick_device, pick_metric

MAX_LENGTH = 256  # the built-in task prompts (< 120 bytes) are never truncated
SPEC = LoraSpec(model="tiny-llama", max_length=MAX_LENGTH)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: faster for tiny models on a shared machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _lora() -> tuple[PeftModel, object]:
    loaded = models.load_causal_lm("tiny-llama")
    return models.attach_lora(loaded.model, SPEC), loaded.tokenizer


def _adapter(model: PeftModel, seed: int, scale: float) -> dict[str, torch.Tensor]:
    """A random adapter with non-zero B, so it really changes the model."""
    g = torch.Generator().manual_seed(seed)
    return {
        e.name: torch.randn(e.shape, generator=g) * scale
        for e in models.adapter_layout(model).entries
    }


def _reference_loss(model: PeftModel, tokenizer, examples: list[Example]) -> float:
    """Token-weighted mean cross-entropy over response tokens (+ EOS), one
    unpadded example at a time, written without the package's batching code."""
    total, count = 0.0, 0
    for e in examples:
        prompt = tokenizer(models.format_prompt(e.prompt), add_special_tokens=False)[
            "input_ids"
        ]
        answer = tokenizer(e.response.strip(), add_special_tokens=False)["input_ids"]
        answer = [*answer, tokenizer.eos_token_id]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        for j, token in enumerate(answer):
            pos = len(prompt) + j  # position of the token; predicted at pos - 1
            total -= float(logp[pos - 1, token])
            count += 1
    return total / count


def _greedy(model: PeftModel, tokenizer, prompt: str, max_new: int) -> str:
    ids = tokenizer(models.format_prompt(prompt), add_special_tokens=False)["input_ids"]
    new: list[int] = []
    for _ in range(max_new):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        new.append(nxt)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def setup() -> dict:
    model, tok = _lora()
    ref_model, _ = _lora()
    adapter = _adapter(model, seed=0, scale=0.5)
    models.load_adapter_tensors(ref_model, adapter)
    ref_model.eval()
    return {"model": model, "tok": tok, "ref": ref_model, "adapter": adapter}


def _evaluator(
    setup: dict,
    examples: list[Example],
    metric: str = "exact_match",
    batch_size: int = 3,
    max_new: int = 4,
) -> CentralEvaluator:
    return CentralEvaluator(
        setup["model"],
        setup["tok"],
        examples,
        metric=metric,
        max_length=MAX_LENGTH,
        max_new_tokens=max_new,
        batch_size=batch_size,
        device=CPU,
    )


def test_loss_matches_manual_computation(setup: dict) -> None:
    """The evaluator's loss (padded batches of 3 over 7 examples) must equal the
    token-weighted response cross-entropy computed example by example; wrong
    masking, a missing shift, padding leaking into the loss, or averaging per
    batch instead of per token would all change it."""
    examples = generate_tasks(7, seed=1)
    result = _evaluator(setup, examples).evaluate(setup["adapter"])
    want = _reference_loss(setup["ref"], setup["tok"], examples)
    assert result.loss == pytest.approx(want, abs=1e-4)
    assert result.num_examples == 7 and result.metric_name == "exact_match"
    # batch size must not matter
    one = _evaluator(setup, examples, batch_size=1).evaluate(setup["adapter"])
    assert one.loss == pytest.approx(want, abs=1e-4)


def test_adapter_changes_loss(setup: dict) -> None:
    """The loaded adapter must be used: a different adapter gives another loss."""
    examples = generate_tasks(4, seed=2)
    ev = _evaluator(setup, examples)
    a = ev.evaluate(setup["adapter"])
    b = ev.evaluate(_adapter(setup["model"], seed=1, scale=0.5))
    assert abs(a.loss - b.loss) > 1e-3


def test_evaluate_twice_identical(setup: dict) -> None:
    """Evaluating the same adapter twice, even with another adapter in between,
    must give identical results (no state carried between calls)."""
    examples = generate_tasks(5, seed=3)
    ev = _evaluator(setup, examples)
    first = ev.evaluate(setup["adapter"])
    ev.evaluate(_adapter(setup["model"], seed=9, scale=1.0))
    again = ev.evaluate(setup["adapter"])
    assert isinstance(first, EvalResult)
    assert first == again
    assert 0.0 <= first.metric <= 1.0


def test_metric_scores_greedy_generations(setup: dict) -> None:
    """Exact match must be the share of examples whose reference equals the
    model's greedy answer: references set to the model's own (independently
    decoded) answers for 3 of 5 prompts must score exactly 0.6."""
    base = generate_tasks(5, seed=4)
    strong = _adapter(setup["model"], seed=5, scale=1.5)  # varied, non-empty outputs
    models.load_adapter_tensors(setup["ref"], strong)
    answers = [_greedy(setup["ref"], setup["tok"], e.prompt, 4) for e in base]
    models.load_adapter_tensors(setup["ref"], setup["adapter"])
    assert len(set(answers)) > 1 and all(answers), answers
    examples = [
        Example(e.prompt, a if i < 3 else a + " never", e.group)
        for i, (e, a) in enumerate(zip(base, answers, strict=True))
    ]
    result = _evaluator(setup, examples, batch_size=2).evaluate(strong)
    assert result.metric == pytest.approx(0.6)


def test_metric_carries_per_example_scores_interval_and_time(setup: dict) -> None:
    """The result keeps one score per example (their mean is the metric), the
    bootstrap 95% interval of those scores and the evaluation's wall time;
    breaks if the interval is missing, computed on other numbers, or does
    not contain the mean."""
    base = generate_tasks(6, seed=4)
    strong = _adapter(setup["model"], seed=5, scale=1.5)
    models.load_adapter_tensors(setup["ref"], strong)
    answers = [_greedy(setup["ref"], setup["tok"], e.prompt, 4) for e in base]
    models.load_adapter_tensors(setup["ref"], setup["adapter"])
    examples = [
        Example(e.prompt, a if i % 2 == 0 else a + " never", e.group)
        for i, (e, a) in enumerate(zip(base, answers, strict=True))
    ]
    result = _evaluator(setup, examples, batch_size=4).evaluate(strong)
    assert result.scores == (1.0, 0.0, 1.0, 0.0, 1.0, 0.0)
    assert result.metric == pytest.approx(0.5)
    assert (result.metric_low, result.metric_high) == bootstrap_interval(
        list(result.scores)
    )
    assert result.metric_low is not None and result.metric_high is not None
    assert result.metric_low < result.metric < result.metric_high
    assert result.seconds > 0.0


class _Scripted(torch.nn.Module):
    """The tiny model for the loss, with generate answering a fixed text and
    recording how it was called."""

    def __init__(self, model: PeftModel, answer_ids: list[int]) -> None:
        super().__init__()
        self.inner = model
        self.answer = torch.tensor(answer_ids)
        self.calls: list[dict] = []

    def forward(self, **kwargs: torch.Tensor) -> object:
        return self.inner(**kwargs)

    def generate(self, input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
        self.calls.append({"input_ids": input_ids, **kwargs})
        tail = self.answer.expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)


def test_metric_scores_the_whole_answer_with_batched_cached_generation(
    setup: dict,
) -> None:
    """A multi-line answer is scored whole (whitespace stripped only): "The
    answer is:\nPositive" against "Positive" is Rouge-L 0.4, where a
    first-line cut scores 0.0. Generation gets left-padded batches and the
    KV cache explicitly."""
    tok = setup["tok"]
    ids = tok("  The answer is:\nPositive \n", add_special_tokens=False)["input_ids"]
    scripted = _Scripted(setup["model"], ids)
    examples = [
        Example("Say it.", "Positive", "g"),
        Example("Say it, please, with a much longer prompt than the first.", "x", "g"),
        Example("Again.", "positive", "g"),
    ]
    evaluator = CentralEvaluator(
        scripted,  # type: ignore[arg-type]
        tok,
        examples,
        metric="rouge_l",
        max_length=MAX_LENGTH,
        max_new_tokens=len(ids),
        batch_size=2,
        device=CPU,
    )
    result = evaluator.evaluate()
    assert result.scores == pytest.approx((0.4, 0.0, 0.4))
    assert [c["input_ids"].shape[0] for c in scripted.calls] == [2, 1]
    first = scripted.calls[0]
    assert first["use_cache"] is True and first["do_sample"] is False
    mask = first["attention_mask"]
    assert int(mask[0, 0]) == 0 and int(mask[0, -1]) == 1  # short prompt: left pads
    assert bool(mask[1].all())


def test_evaluator_rejects_empty_and_foreign_adapter(setup: dict) -> None:
    """No held-out examples is an error; an adapter with names the model does
    not have must not be silently ignored."""
    with pytest.raises(ValueError):
        _evaluator(setup, [])
    ev = _evaluator(setup, generate_tasks(2, seed=0))
    with pytest.raises(ValueError):
        ev.evaluate({"not.a.lora.weight": torch.zeros(2, 2)})


def test_pick_metric() -> None:
    """'auto' must pick exact match for short answers (<= 6 words on average)
    and Rouge-L for long ones; explicit names pass through."""
    short = generate_tasks(12, seed=0)
    long = [
        Example("Explain.", "word " * 20, "g"),
        Example("Say.", "one two three", "g"),
    ]
    assert pick_metric("auto", short) == "exact_match"
    assert pick_metric("auto", long) == "rouge_l"
    assert pick_metric("auto", [Example("p", "a b c d e f", "g")]) == "exact_match"
    assert pick_metric("auto", [Example("p", "a b c d e f g", "g")]) == "rouge_l"
    assert pick_metric("accuracy", long) == "accuracy"


def test_pick_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """'auto' is CUDA only when present; asking for 'cuda' without CUDA is a
    ValueError naming the setting instead of a crash later in the round."""
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="cuda"):
        pick_device("cuda")


# -- checkpoints --------------------------------------------------------------------


def _no_temp_files(folder: Path) -> None:
    leftovers = [p.name for p in folder.rglob(".*")]
    assert leftovers == [], leftovers


def test_save_checkpoint_round_trip(tmp_path: Path) -> None:
    """The checkpoint adapter must load back bit-identical (bf16 included) with
    the round and spec fingerprint in its metadata, and state.json must hold
    the round, fingerprint and extra fields; a later round replaces both."""
    spec = LoraSpec(model="tiny-llama")
    g = torch.Generator().manual_seed(0)
    adapter = {
        "a.lora_A.weight": torch.randn(4, 8, generator=g),
        "a.lora_B.weight": torch.randn(8, 4, generator=g).to(torch.bfloat16),
    }
    run = RunFolder(tmp_path)
    folder = run.write_checkpoint(
        3, spec.fingerprint(), {"ledger": "[]", "best": 0.5}, adapter
    )
    assert folder == tmp_path / "checkpoint"
    loaded = load_file(folder / "adapter.safetensors")
    assert set(loaded) == set(adapter)
    for name, t in adapter.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    with safe_open(str(folder / "adapter.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta == {"round": "3", "spec": spec.fingerprint()}
    state = json.loads((folder / "state.json").read_text())
    assert state == {
        "round": 3,
        "spec_fingerprint": spec.fingerprint(),
        "tensors": "adapter.safetensors",
        "ledger": "[]",
        "best": 0.5,
    }
    newer = {k: v + 1 for k, v in adapter.items()}
    run.write_checkpoint(4, spec.fingerprint(), {}, newer)
    assert json.loads((folder / "state.json").read_text())["round"] == 4
    assert torch.equal(
        load_file(folder / "adapter.safetensors")["a.lora_A.weight"],
        newer["a.lora_A.weight"],
    )
    _no_temp_files(tmp_path)


def test_metrics_log_appends_lines(tmp_path: Path) -> None:
    """Each append adds exactly one JSON line and keeps earlier ones; NaN is
    refused (it is not JSON) rather than written as an unreadable token."""
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    rows = [{"round": 1, "loss": 2.5}, {"round": 2, "loss": 2.25, "label": "x"}]
    for row in rows:
        log.append(row)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
    with pytest.raises(ValueError):
        log.append({"round": 3, "loss": float("nan")})
    again = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    again.append({"round": 3})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1]) == {"round": 3}


def test_atomic_write_bytes(tmp_path: Path) -> None:
    """atomic_write_bytes creates parents, replaces content whole and leaves no
    temporary file behind, also when the write fails."""
    target = tmp_path / "a" / "b" / "file.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second version")
    assert target.read_bytes() == b"second version"
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"second version"
    assert sorted(os.listdir(target.parent)) == ["file.bin"]
    RunFolder(tmp_path).write_status("running", round=2)
    assert json.loads((tmp_path / "status.json").read_text()) == {
        "state": "running",
        "round": 2,
    }
    _no_temp_files(tmp_path)


def test_save_peft_adapter_loads_back(tmp_path: Path) -> None:
    """The exported PEFT folder must load onto a fresh base model with the same
    adapter tensors, and a second save must replace the folder cleanly."""
    model, _ = _lora()
    adapter = _adapter(model, seed=3, scale=0.2)
    models.load_adapter_tensors(model, adapter)
    folder = save_peft_adapter(tmp_path / "adapter", model)
    save_peft_adapter(tmp_path / "adapter", model)
    base = models.load_causal_lm("tiny-llama").model
    reloaded = PeftModel.from_pretrained(base, folder)
    back = models.adapter_tensors(reloaded)
    assert set(back) == set(adapter)
    for name, t in adapter.items():
        assert torch.equal(back[name], t), name
    _no_temp_files(tmp_path)
