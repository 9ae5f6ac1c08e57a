"""SFPrompt's model split: the split model computes what the unsplit one does."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from client.pruning import el2n_scores, keep_hardest
from client.split_trainer import LocalTrunkSession, SplitSettings, _lm_loss, split_round
from corpora import generate_tasks
from models import IGNORE_INDEX, collate_train, load_causal_lm, tokenize_example
from models.split import _decoder_slice, build_split, split_spec_for


def _tiny_spec(
    lm, *, num_prompts: int, client_blocks: int = 0, tail: str = "norm+head"
):  # noqa: ANN001, ANN202
    """The split spec of tiny-llama, 64-token sequences."""
    return split_spec_for(
        lm.model,
        "tiny-llama",
        num_prompts=num_prompts,
        client_blocks=client_blocks,
        max_length=64,
        tail=tail,
    )


def _batch(tokenizer, n: int = 3):  # noqa: ANN001, ANN202
    examples = generate_tasks(n, seed=2)
    tok = [tokenize_example(e, tokenizer, 64) for e in examples]
    return collate_train(tok, int(tokenizer.pad_token_id))


@pytest.mark.parametrize("client_blocks", [0, 1])
def test_split_loss_and_gradients_equal_the_unsplit_model(client_blocks: int) -> None:
    """head -> trunk (through a session) -> tail gives the unsplit model's loss,
    and the same gradients for the prompts, the norm and the LM head.

    Breaks if the cut loses positions, masks or rotary offsets, or the
    gradient returned at the cut is wrong or cut to the wrong positions.
    """
    lm = load_causal_lm("tiny-llama")
    spec = _tiny_spec(lm, num_prompts=3, client_blocks=client_blocks)
    head, trunk, tail = build_split(lm.model, spec, init_seed=1)
    batch = _batch(lm.tokenizer)
    # Split path, exactly as the device does it.
    session = LocalTrunkSession(trunk, spec.returns_all_positions, spec.num_prompts)
    hidden, mask = head(batch.input_ids, batch.attention_mask)
    body_out = session.forward(hidden.detach(), mask, train=True).requires_grad_()
    loss_split = _lm_loss(tail(body_out)[:, 3:], batch.labels)
    loss_split.backward()
    cut = session.backward(body_out.grad)
    (hidden if cut.shape[1] == hidden.shape[1] else hidden[:, :3]).backward(cut)
    split_grads = [
        head.prompts.grad.clone(),
        tail.norm.weight.grad.clone(),
        tail.lm_head.weight.grad.clone(),
    ]
    # Unsplit reference: every block in one graph on [prompts; embed(x)], with
    # fresh copies of the untied norm and head.
    prompts = head.prompts.detach().clone().requires_grad_()
    tail_ref = copy.deepcopy(tail)
    tail_ref.zero_grad(set_to_none=True)
    decoder = lm.model.model
    emb = decoder.embed_tokens(batch.input_ids)
    full = torch.cat([prompts.unsqueeze(0).expand(emb.shape[0], -1, -1), emb], 1)
    whole = _decoder_slice(decoder, 0, spec.num_blocks)
    h = whole(inputs_embeds=full, attention_mask=mask).last_hidden_state
    loss_ref = _lm_loss(tail_ref(h)[:, 3:], batch.labels)
    ref_grads = torch.autograd.grad(
        loss_ref, [prompts, tail_ref.norm.weight, tail_ref.lm_head.weight]
    )
    assert torch.allclose(loss_split, loss_ref, atol=1e-6)
    for got, want in zip(split_grads, ref_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


def test_el2n_scores_follow_the_definition() -> None:
    """A confident correct prediction scores ~0, a uniform one sqrt((V-1)/V),
    and positions without a target do not count."""
    v = 4
    labels = torch.tensor([[IGNORE_INDEX, 2, 1], [IGNORE_INDEX, 3, IGNORE_INDEX]])
    logits = torch.zeros(2, 3, v)
    logits[0, 0, 2] = 50.0  # predicts label[0,1] = 2 confidently
    logits[0, 1, 1] = 50.0  # predicts label[0,2] = 1 confidently
    scores = el2n_scores(logits, labels)  # example 1: uniform on its one target
    assert float(scores[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(scores[1]) == pytest.approx(math.sqrt((v - 1) / v + 0.0 * 0), rel=1e-5)


def test_pruning_keeps_exactly_the_hardest_fraction() -> None:
    """ceil(gamma * n) highest scores are kept, ties by lower index."""
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2, 0.7])
    assert keep_hardest(scores, 0.5) == [1, 3, 5]
    assert keep_hardest(scores, 0.34) == [1, 3, 5]  # ceil(2.04) = 3
    assert keep_hardest(scores, 1.0) == list(range(6))
    assert keep_hardest(torch.tensor([0.3, 0.3, 0.3]), 0.3) == [0]
    with pytest.raises(ValueError, match="gamma"):
        keep_hardest(scores, 0.0)


def test_a_split_round_lowers_the_loss_on_a_tiny_model() -> None:
    """Three device rounds through a local trunk lower the split-path loss.

    Breaks if prompts or tail do not learn, or the round trains nothing.
    """
    lm = load_causal_lm("tiny-llama")
    spec = _tiny_spec(lm, num_prompts=4)
    head, trunk, tail = build_split(lm.model, spec)
    examples = [
        tokenize_example(e, lm.tokenizer, 64) for e in generate_tasks(48, seed=0)
    ]
    session = LocalTrunkSession(trunk, False, 4)
    losses = []
    for r in range(1, 4):
        settings = SplitSettings(
            local_steps=10,
            local_loss_steps=3,
            batch_size=8,
            learning_rate=3e-3,
            gamma=0.5,
            seed=0,
            server_round=r,
        )
        stats = split_round(
            head, tail, session, examples, settings, pad_id=256, label="a"
        )
        assert stats.kept == 24 and stats.examples == 48
        losses.append(stats.split_loss)
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("tail_kind", ["norm", "norm+head"])
def test_a_frozen_head_is_shared_and_a_trained_one_is_an_untied_copy(
    tail_kind: str,
) -> None:
    """With ``tail = "norm"`` the device uses the model's head in place (no
    second vocabulary-sized matrix); with ``"norm+head"`` it trains a copy,
    leaving the (tied) embedding alone. Both give the model's logits.

    Breaks if the frozen head is copied again, or the trained head still
    shares storage with the embedding.
    """
    lm = load_causal_lm("tiny-llama")
    spec = _tiny_spec(lm, num_prompts=2, tail=tail_kind)
    _, _, tail = build_split(lm.model, spec)
    original = lm.model.get_output_embeddings().weight
    shared = tail.lm_head.weight.data_ptr() == original.data_ptr()
    assert shared == (tail_kind == "norm")
    assert tail.lm_head.weight.requires_grad == (tail_kind == "norm+head")
    names = {n for n, p in tail.named_parameters() if p.requires_grad}
    assert names == ({"norm.weight"} | ({"lm_head.weight"} if not shared else set()))
    hidden = torch.randn(2, 5, original.shape[1])
    with torch.no_grad():
        want = lm.model.lm_head(lm.model.model.norm(hidden))
        assert torch.equal(tail(hidden), want)


def _greedy_without_cache(model, ids, mask, steps: int):  # noqa: ANN001, ANN202
    """Reference decoding: the whole sequence again for every new token."""
    for _ in range(steps):
        nxt = model(ids, mask).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
    return ids


@pytest.mark.parametrize("client_blocks", [0, 1])
def test_cached_generation_matches_full_recomputation_and_ignores_padding(
    client_blocks: int,
) -> None:
    """``PromptedLM.generate`` (KV cache over the head's and trunk's blocks)
    gives the tokens of re-running the whole sequence each step, and a
    left-padded row decodes as it does alone.

    Breaks if the cache misses the head's blocks, positions shift after the
    prompt, or cached steps attend to the padding.
    """
    from models.split import PromptedLM

    lm = load_causal_lm("tiny-llama")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # large random weights: an untrained tiny model
        for param in lm.model.parameters():  # only echoes its last token
            param.normal_(0.0, 0.3, generator=gen)
    spec = _tiny_spec(lm, num_prompts=3, client_blocks=client_blocks)
    model = PromptedLM(*build_split(lm.model, spec, init_seed=2)).eval()
    ids = torch.randint(3, 200, (2, 6), generator=gen)
    ones = torch.ones_like(ids)
    eos = -1  # never produced: every row decodes all steps
    got = model.generate(ids, ones, max_new_tokens=5, pad_token_id=0, eos_token_id=eos)
    assert len(set(got[:, 6:].flatten().tolist())) > 2, "degenerate decoding"
    with torch.no_grad():
        assert torch.equal(got, _greedy_without_cache(model, ids, ones, 5))
    # Row 1 shortened to 4 tokens and left-padded: it must decode as alone.
    padded = ids.clone()
    padded[1, :2] = 0
    mask = ones.clone()
    mask[1, :2] = 0
    batch = model.generate(
        padded, mask, max_new_tokens=5, pad_token_id=0, eos_token_id=eos
    )
    alone = model.generate(
        ids[1:, 2:], ones[1:, 2:], max_new_tokens=5, pad_token_id=0, eos_token_id=eos
    )
    assert torch.equal(batch[1, 6:], alone[0, 4:])
    assert torch.equal(batch[0], got[0])
    assert not any(k.startswith("_whole") for k in model.state_dict())


def test_cached_generation_uses_the_supported_cache_api() -> None:
    """``PromptedLM.generate`` hands its ``DynamicCache`` to the decoder the way
    transformers 5.24 supports: no deprecation or future warning (the pytest
    config hides those, so this test turns them into errors).

    Breaks if generation goes back to the ``past_key_values`` argument, which
    transformers deprecated (removal announced for 5.40).
    """
    from models.split import PromptedLM

    lm = load_causal_lm("tiny-llama")
    spec = _tiny_spec(lm, num_prompts=2, client_blocks=1)
    model = PromptedLM(*build_split(lm.model, spec, init_seed=0)).eval()
    ids = torch.randint(3, 200, (1, 5), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        model.generate(
            ids, torch.ones_like(ids), max_new_tokens=2, pad_token_id=0, eos_token_id=-1
        )
