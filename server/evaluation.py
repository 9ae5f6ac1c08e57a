"""Central evaluation of the global adapter on held-out data.

Two numbers per evaluation: the mean token cross-entropy of the reference
answers (prompt tokens masked, exactly as in training) and a task metric on
greedy generations (exact match, accuracy or Rouge-L, from
:mod:`corpora.scoring`) with its bootstrap 95% interval. The metric scores the
whole decoded answer, stripped of surrounding whitespace only. Generation is
batched over left-padded prompts with the KV cache. Runs on the server's
device: CUDA when present, otherwise the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from corpora import Example, bootstrap_interval, per_example_scores
from models import (
    IGNORE_INDEX,
    collate_prompts,
    collate_train,
    load_adapter_tensors,
    tokenize_example,
)

if TYPE_CHECKING:
    from torch import nn

    from server.config import RunConfig

__all__ = [
    "CentralEvaluator",
    "EvalResult",
    "build_evaluator",
    "pick_device",
    "pick_metric",
]


def pick_device(name: str) -> torch.device:
    """Resolve ``"auto"`` to CUDA when available, else CPU.

    Raises
    ------
    ValueError
        If ``"cuda"`` is asked for on a machine without CUDA.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("eval.device is 'cuda' but this machine has no CUDA device")
    return torch.device(name)


def pick_metric(name: str, examples: Sequence[Example]) -> str:
    """Resolve ``"auto"``: exact match for short answers, Rouge-L for long ones."""
    if name != "auto":
        return name
    mean_words = sum(len(e.response.split()) for e in examples) / max(len(examples), 1)
    return "exact_match" if mean_words <= 6 else "rouge_l"


@dataclass(frozen=True, slots=True)
class EvalResult:
    """Loss and task metric of one evaluation.

    ``metric`` is the mean of ``scores`` (one per held-out example, in order)
    and ``metric_low``/``metric_high`` its percentile bootstrap 95% interval
    (:func:`corpora.bootstrap_interval`, seed 0; ``None`` when not computed).
    ``seconds`` is the evaluation's wall time; it is left out of equality, so
    two evaluations of the same model compare equal.
    """

    loss: float
    metric: float
    metric_name: str
    num_examples: int
    metric_low: float | None = None
    metric_high: float | None = None
    seconds: float = field(default=0.0, compare=False)
    scores: tuple[float, ...] = ()


class CentralEvaluator:
    """Evaluates adapters on a fixed held-out set with one resident model.

    Parameters
    ----------
    model : PreTrainedModel
        The model to score, on ``device`` (a ``PeftModel`` when adapters are
        evaluated).
    tokenizer : PreTrainedTokenizerBase
        Its tokenizer.
    examples : Sequence[Example]
        The held-out set.
    metric : str
        A name from :data:`corpora.METRICS`.
    max_length, max_new_tokens, batch_size : int
        Tokens per example, tokens generated per answer, examples per batch.
    device : torch.device
        Where evaluation runs.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[Example],
        *,
        metric: str,
        max_length: int,
        max_new_tokens: int,
        batch_size: int,
        device: torch.device,
    ) -> None:
        if not examples:
            raise ValueError("central evaluation needs at least one held-out example")
        self.model = model
        self.tokenizer = tokenizer
        self.examples = list(examples)
        self.metric = metric
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.device = device
        self._tokenized = [tokenize_example(e, tokenizer, max_length) for e in examples]

    @torch.no_grad()
    def evaluate(self, adapter: Mapping[str, torch.Tensor] | None = None) -> EvalResult:
        """Score the model, after loading ``adapter`` into it when one is given."""
        start = time.perf_counter()
        if adapter is not None:
            load_adapter_tensors(self.model, adapter)  # type: ignore[arg-type]
        self.model.eval()
        loss = self._loss()
        scores = per_example_scores(
            self.metric, self._generate(), [e.response for e in self.examples]
        )
        low, high = bootstrap_interval(scores)
        return EvalResult(
            loss=loss,
            metric=sum(scores) / len(scores),
            metric_name=self.metric,
            num_examples=len(self.examples),
            metric_low=low,
            metric_high=high,
            seconds=time.perf_counter() - start,
            scores=tuple(scores),
        )

    def _loss(self) -> float:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = 0
        pad = int(self.tokenizer.pad_token_id)
        for start in range(0, len(self._tokenized), self.batch_size):
            batch = collate_train(self._tokenized[start : start + self.batch_size], pad)
            batch = batch.to(self.device)
            logits = self.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask
            ).logits
            targets = batch.labels[:, 1:]  # (B, T-1): token t predicts t+1
            total += torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                targets.flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            ).double()
            tokens += int((targets != IGNORE_INDEX).sum())
        return float(total) / max(tokens, 1)

    def _generate(self) -> list[str]:
        """Greedy answers, whole and whitespace-stripped, batch by batch."""
        answers: list[str] = []
        for start in range(0, len(self.examples), self.batch_size):
            prompts = [e.prompt for e in self.examples[start : start + self.batch_size]]
            ids, mask = collate_prompts(prompts, self.tokenizer, self.max_length)
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
            for row in out[:, ids.shape[1] :]:  # left padding: answers start here
                text = self.tokenizer.decode(row, skip_special_tokens=True)
                answers.append(text.strip())
        return answers


def build_evaluator(
    config: RunConfig,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    device: torch.device,
) -> CentralEvaluator:
    """The evaluator a run's ``[eval]`` and ``[model]`` settings describe."""
    from server.run_data import resolved_max_length  # a prepared run's: a number

    return CentralEvaluator(
        model,  # type: ignore[arg-type]
        tokenizer,
        examples,
        metric=pick_metric(config.eval.metric, examples),
        max_length=resolved_max_length(config),
        max_new_tokens=config.eval.max_new_tokens,
        batch_size=config.eval.batch_size,
        device=device,
    )
