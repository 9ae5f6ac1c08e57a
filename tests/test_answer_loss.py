"""``models.answer_loss``: the training loss with logits at the answer positions only.

Every ZO step (two forwards) and every LoRA step computes the loss over the
answer tokens; projecting every position onto the vocabulary cost a (B, T,
vocabulary) tensor that the loss never read. These tests pin the value to
Hugging Face's own loss (plain and PEFT-wrapped, gradients included), check
that the projection really runs on the labelled positions only, and that a
model without ``logits_to_keep`` falls back to the full forward.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from models import (
    IGNORE_INDEX,
    TokenizedExample,
    answer_loss,
    attach_lora,
    collate_train,
    load_causal_lm,
)
from models.batching import TrainBatch
from protocols.specs import LoraSpec


def _batch(seed: int = 0) -> TrainBatch:
    """Rows of different lengths (right padding) and answers of 1 to 9 tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for length, answer in ((20, 5), (33, 1), (12, 9)):
        ids = torch.randint(3, 200, (length,), generator=gen).tolist()
        labels = [IGNORE_INDEX] * (length - answer) + ids[length - answer :]
        rows.append(TokenizedExample(tuple(ids), tuple(labels)))
    return collate_train(rows, pad_id=0)


def _hf_loss(model: nn.Module, batch: TrainBatch) -> torch.Tensor:
    out: Any = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        labels=batch.labels,
    )
    loss: torch.Tensor = out.loss
    return loss


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    model = load_causal_lm("tiny-llama", dtype="float32").model
    model.eval()
    return model


def test_equals_hugging_faces_loss(tiny: nn.Module) -> None:
    for seed in range(3):
        batch = _batch(seed)
        with torch.no_grad():
            want = _hf_loss(tiny, batch)
            got = answer_loss(tiny, batch)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_projects_only_the_answer_positions(tiny: nn.Module) -> None:
    """The vocabulary projection sees one row per labelled next token,
    not B x T rows (breaks if the full logits were computed)."""
    batch = _batch()
    seen: list[tuple[int, ...]] = []
    head = tiny.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    try:
        with torch.no_grad():
            answer_loss(tiny, batch)
    finally:
        hook.remove()
    labelled = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    assert labelled == 5 + 1 + 9  # every answer token is some position's next token
    assert [s[0] for s in seen] == [labelled]
    assert labelled < batch.input_ids.numel()


def test_lora_gradients_match_the_full_loss() -> None:
    """Through a PEFT wrapper, value and adapter gradients are Hugging Face's."""
    base = load_causal_lm("tiny-llama", dtype="float32").model
    spec = LoraSpec(model="tiny-llama", rank=4, alpha=8.0, dropout=0.0)
    model = attach_lora(base, spec)
    with torch.no_grad():  # B = 0 would make every A gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    batch = _batch(1)
    grads = []
    for loss_fn in (_hf_loss, answer_loss):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in params]))
    (want, want_g), (got, got_g) = grads
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g1, g0 in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)


class _NoKeep(nn.Module):
    """A causal LM whose forward has no ``logits_to_keep`` (an older model)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> Any:
        return self.inner(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels
        )


def test_a_model_without_logits_to_keep_gets_the_full_forward(
    tiny: nn.Module,
) -> None:
    batch = _batch(2)
    with torch.no_grad():
        got = answer_loss(_NoKeep(tiny), batch)
        want = _hf_loss(tiny, batch)
    assert torch.equal(got, want)
