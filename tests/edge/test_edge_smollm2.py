"""The edge bundle of SmolLM2-135M-Instruct on Natural Instructions (minutes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client.edge.engine import EdgeModel, collate
from client.edge.trainer import edge_local_steps
from client.zo_trainer import zo_local_steps
from corpora import load_examples
from models import collate_train, load_causal_lm, tokenize_example
from models.edge_export import LOSS_TOLERANCE, export_edge_bundle
from protocols.messages import RoundSchedule
from protocols.param_walk import ParamWalk
from protocols.philox import GENERATOR_VERSION
from protocols.seeds import candidate_seeds
from protocols.specs import ZOSpec

NI_V1 = "natural-instructions-v1/ni-v1-61tasks-cap200.jsonl.gz"


@pytest.mark.long
def test_smollm2_bundle_matches_torch(tmp_path: Path, shared_data: Path) -> None:
    """Full walk (134.5M perturbed values, tied embedding): ORT's loss equals
    torch's on batches of 1 and 8 x 128 tokens, tokenization is the torch
    client's, and one MeZO step gives the torch step's scalar."""
    examples = load_examples(str(shared_data / NI_V1), limit=16, seed=0)
    lm = load_causal_lm("smollm2-135m")
    walk = ParamWalk.from_model(lm.model)
    spec = ZOSpec(
        model="smollm2-135m",
        walk_fingerprint=walk.fingerprint(),
        generator=GENERATOR_VERSION,
        eps=1e-3,
        learning_rate=1e-6,
        max_length=128,
    )
    tokenized = [tokenize_example(e, lm.tokenizer, 128) for e in examples]
    out = tmp_path / "bundle"
    export_edge_bundle(lm.model, lm.tokenizer, walk, spec, out, tokenized[:8])
    model = EdgeModel.open(out)
    assert [model.tokenize(e.prompt, e.response) for e in examples] == tokenized
    for group in (tokenized[8:9], tokenized[8:16]):
        batch = collate_train(group, model.pad_id)
        with torch.inference_mode():
            want = float(lm.model(**vars_of(batch)).loss)
        assert abs(model.loss(collate(group, model.pad_id)) - want) <= LOSS_TOLERANCE
    schedule = RoundSchedule(server_round=1, local_steps=1, batch_size=1, seed=3)
    seeds = candidate_seeds(0, 1)
    one = tokenized[8:9]
    edge = edge_local_steps(
        model,
        one,
        schedule,
        seeds=seeds,
        eps=spec.eps,
        learning_rate=spec.learning_rate,
        probabilities=None,
        label="n",
    )
    ref = zo_local_steps(
        lm.model,
        walk.params(lm.model),
        one,
        schedule,
        seeds=seeds,
        eps=spec.eps,
        learning_rate=spec.learning_rate,
        probabilities=None,
        pad_id=model.pad_id,
        label="n",
        device=torch.device("cpu"),
    )
    assert (
        abs(float(edge.scalars[0]) - float(ref.scalars[0])) <= LOSS_TOLERANCE / spec.eps
    )
    assert np.isfinite(edge.mean_loss)


def vars_of(batch: object) -> dict[str, torch.Tensor]:
    """A TrainBatch as the model's keyword arguments."""
    return {k: getattr(batch, k) for k in ("input_ids", "attention_mask", "labels")}
