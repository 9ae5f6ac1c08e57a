"""The edge engine and trainer (ONNX Runtime + NumPy) against the torch path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from client.edge.engine import EdgeModel, collate
from client.edge.trainer import edge_local_steps, mezo_step
from client.zo_trainer import zo_local_steps
from models import collate_train
from models.edge_export import LOSS_TOLERANCE
from protocols.messages import RoundSchedule
from protocols.seed_arrays import apply_seed_sum_arrays, perturb_arrays
from protocols.seeds import apply_seed_sum_, candidate_seeds, perturb_
from tests.edge.conftest import MAX_LENGTH, TinyZo, text_examples, tokenized
from tests.torch_blocker import run_without


def test_tokenization_and_collation_equal_the_torch_client(
    zo: TinyZo, pristine_bundle: Path
) -> None:
    """tokenizer.json + models.text give the ids, labels and padded arrays
    that the Hugging Face tokenizer + models.batching give."""
    model = EdgeModel.open(pristine_bundle, threads=1)
    examples = text_examples(5)
    mine = [model.tokenize(e.prompt, e.response) for e in examples]
    assert mine == tokenized(zo, 5)
    assert max(len(e.input_ids) for e in mine) == MAX_LENGTH  # truncation met
    batch, want = collate(mine, model.pad_id), collate_train(mine, model.pad_id)
    for got, ref in (
        (batch.input_ids, want.input_ids),
        (batch.attention_mask, want.attention_mask),
        (batch.labels, want.labels),
    ):
        assert got.dtype == np.int64
        assert np.array_equal(got, ref.numpy())


def test_ort_loss_equals_torch_on_single_and_padded_batches(
    zo: TinyZo, pristine_bundle: Path
) -> None:
    model = EdgeModel.open(pristine_bundle, threads=1)
    examples = tokenized(zo, 7)
    batches = [examples[:1], examples[3:4], examples[:5], examples]
    losses = []
    for group in batches:
        got = model.loss(collate(group, model.pad_id))
        assert abs(got - zo.batch_loss(group)) <= LOSS_TOLERANCE
        losses.append(got)
    assert len(set(losses)) == len(losses)  # the batches really differ


def test_in_place_changes_are_seen_without_copies_or_rebinding(
    zo: TinyZo, pristine_bundle: Path
) -> None:
    """perturb_arrays and apply_seed_sum_arrays change the bound buffers; the
    next loss follows, equal to torch's loss after the same change (tied
    embedding and head included), and the same arrays stay bound."""
    model = EdgeModel.open(pristine_bundle, threads=1)
    arrays = model.params()
    pointers = [a.ctypes.data for _, a in arrays]
    bound = [v.data_ptr() for v in model._values]
    assert bound == pointers  # the OrtValues share the arrays' memory
    examples = tokenized(zo, 4)
    batch = collate(examples, model.pad_id)
    torch_params = zo.walk.params(zo.model)
    base = model.loss(batch)

    perturb_arrays(arrays, 77, 0.05)
    perturb_(torch_params, 77, 0.05)
    moved = model.loss(batch)
    assert abs(moved - base) > 1e-3
    assert abs(moved - zo.batch_loss(examples)) <= LOSS_TOLERANCE

    seeds = candidate_seeds(3, 4)
    coefficients = [0.02, -0.01, 0.03, 0.0]
    apply_seed_sum_arrays(arrays, seeds, coefficients)
    apply_seed_sum_(torch_params, seeds, coefficients)
    replayed = model.loss(batch)
    assert abs(replayed - moved) > 1e-3
    assert abs(replayed - zo.batch_loss(examples)) <= LOSS_TOLERANCE
    for (_, a), (_, t) in zip(model.params(), torch_params, strict=True):
        assert np.array_equal(a, t.detach().numpy())  # bit-identical weights
    assert [a.ctypes.data for _, a in model.params()] == pointers


def test_only_the_tied_embedding_moves_both_of_its_uses(
    zo: TinyZo, pristine_bundle: Path
) -> None:
    """The walk lists the tied embedding once; perturbing it on the edge must
    change the LM head too, as it does in torch."""
    model = EdgeModel.open(pristine_bundle, threads=1)
    name = "model.embed_tokens.weight"
    assert "lm_head.weight" not in zo.walk.names
    embed = [(n, a) for n, a in model.params() if n == name]
    perturb_arrays(embed, 5, 0.2)
    perturb_([(n, p) for n, p in zo.walk.params(zo.model) if n == name], 5, 0.2)
    assert (
        zo.model.lm_head.weight.data_ptr()
        == zo.model.model.embed_tokens.weight.data_ptr()
    )
    examples = tokenized(zo, 3)
    assert (
        abs(model.loss(collate(examples, model.pad_id)) - zo.batch_loss(examples))
        <= LOSS_TOLERANCE
    )


def test_one_edge_mezo_step_matches_the_torch_step(
    zo: TinyZo, pristine_bundle: Path
) -> None:
    """Same example, same pool seed: the scalar agrees within what the loss
    tolerance allows (two losses over 2 eps), and so do the weights."""
    model = EdgeModel.open(pristine_bundle, threads=1)
    examples = tokenized(zo, 1)
    schedule = RoundSchedule(server_round=1, local_steps=1, batch_size=1, seed=4)
    seeds = candidate_seeds(zo.spec.master_seed, 1)
    eps, lr = zo.spec.eps, zo.spec.learning_rate
    edge = edge_local_steps(
        model,
        examples,
        schedule,
        seeds=seeds,
        eps=eps,
        learning_rate=lr,
        probabilities=None,
        label="n0",
    )
    ref = zo_local_steps(
        zo.model,
        zo.walk.params(zo.model),
        examples,
        schedule,
        seeds=seeds,
        eps=eps,
        learning_rate=lr,
        probabilities=None,
        pad_id=model.pad_id,
        label="n0",
        device=torch.device("cpu"),
    )
    assert edge.indices.dtype == np.int32 and edge.scalars.dtype == np.float32
    assert edge.indices.tolist() == ref.indices.tolist() == [0]
    g_edge, g_ref = float(edge.scalars[0]), float(ref.scalars[0])
    assert abs(g_ref) > 1e-3  # a real gradient estimate
    assert abs(g_edge - g_ref) <= LOSS_TOLERANCE / eps
    assert abs(edge.mean_loss - ref.mean_loss) <= LOSS_TOLERANCE
    for (_, a), (_, t) in zip(model.params(), zo.walk.params(zo.model), strict=True):
        np.testing.assert_allclose(a, t.detach().numpy(), rtol=0, atol=1e-6)


def test_local_steps_are_reproducible_and_follow_pro_probabilities(
    zo: TinyZo, pristine_bundle: Path
) -> None:
    examples = tokenized(zo, 6)
    schedule = RoundSchedule(server_round=2, local_steps=4, batch_size=2, seed=9)
    seeds = candidate_seeds(0, 3)
    runs = []
    for probabilities in (None, None, np.array([0.0, 1.0, 0.0])):
        model = EdgeModel.open(pristine_bundle, threads=1)
        runs.append(
            edge_local_steps(
                model,
                examples,
                schedule,
                seeds=seeds,
                eps=1e-2,
                learning_rate=1e-3,
                probabilities=probabilities,
                label="n1",
            )
        )
    first, again, pro = runs
    assert np.array_equal(first.indices, again.indices)
    assert np.array_equal(first.scalars, again.scalars)
    assert first.skipped == 0 and len(first.indices) == 4
    assert math.isfinite(first.mean_loss)
    assert pro.indices.tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="probabilities"):
        edge_local_steps(
            EdgeModel.open(pristine_bundle, threads=1),
            examples,
            schedule,
            seeds=seeds,
            eps=1e-2,
            learning_rate=1e-3,
            probabilities=np.array([0.5, 0.5]),
            label="n1",
        )


def test_steps_with_non_finite_losses_are_skipped(
    zo: TinyZo, pristine_bundle: Path
) -> None:
    """A NaN weight makes every loss NaN: nothing is recorded."""
    model = EdgeModel.open(pristine_bundle, threads=1)
    dict(model.params())["model.norm.weight"][0] = np.nan
    batch = collate(tokenized(zo, 1), model.pad_id)
    assert mezo_step(model, batch, 123, 1e-2, 1e-3) is None
    schedule = RoundSchedule(server_round=1, local_steps=2, batch_size=1, seed=0)
    stats = edge_local_steps(
        model,
        tokenized(zo, 2),
        schedule,
        seeds=[1, 2],
        eps=1e-2,
        learning_rate=1e-3,
        probabilities=None,
        label="n2",
    )
    assert stats.skipped == 2 and stats.indices.size == 0
    assert math.isnan(stats.mean_loss)


EDGE_MODULES = (
    "client.edge",
    "client.edge.engine",
    "client.edge.trainer",
    "protocols.edge_bundle",
    "models.text",
)


def test_edge_modules_import_with_torch_blocked(pristine_bundle: Path) -> None:
    """The edge modules import, open a bundle and take a step with torch,
    transformers, peft and accelerate blocked."""
    code = f"""
import importlib
for name in {EDGE_MODULES!r}:
    importlib.import_module(name)
from client.edge import EdgeModel, edge_local_steps
from protocols.messages import RoundSchedule
model = EdgeModel.open({str(pristine_bundle)!r}, threads=1)
examples = [model.tokenize("Name a bee.", "Apis mellifera.")]
stats = edge_local_steps(
    model, examples, RoundSchedule(1, 1, 1, 0), seeds=[7], eps=1e-2,
    learning_rate=1e-3, probabilities=None, label="edge",
)
print("ok", stats.indices.tolist())
"""
    done = run_without(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok [0]"
