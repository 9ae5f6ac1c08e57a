"""Fixtures of the edge tests: a tiny-llama FedKSeed model, examples, bundles."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from corpora import Example
from models import load_causal_lm, tokenize_example
from models.edge_export import export_edge_bundle
from models.text import TokenizedExample
from protocols.param_walk import ParamWalk
from protocols.philox import GENERATOR_VERSION
from protocols.specs import ZOSpec

MAX_LENGTH = 64


@dataclass
class TinyZo:
    """A tiny-llama at w0, its walk and the spec of a run over it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    walk: ParamWalk
    spec: ZOSpec

    def batch_loss(self, examples: Sequence[TokenizedExample]) -> float:
        """PyTorch's mean loss of ``examples`` padded into one batch."""
        from models import collate_train

        batch = collate_train(examples, int(self.tokenizer.pad_token_id))
        with torch.inference_mode():
            return float(
                self.model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    labels=batch.labels,
                ).loss
            )


def text_examples(n: int) -> list[Example]:
    """``n`` instruction pairs of different lengths."""
    return [
        Example(
            prompt=f"List {i} facts about bees." + " Be brief." * (i % 3),
            response=f"Bees make honey; fact {i}." + " They dance." * (i % 4),
            group="bees",
        )
        for i in range(n)
    ]


def tiny_zo(include: Sequence[str] = ()) -> TinyZo:
    """A fresh tiny-llama FedKSeed setup (``include`` globs select the walk)."""
    loaded = load_causal_lm("tiny-llama")
    walk = ParamWalk.from_model(loaded.model, list(include) or None)
    spec = ZOSpec(
        model="tiny-llama",
        walk_fingerprint=walk.fingerprint(),
        generator=GENERATOR_VERSION,
        include=tuple(include),
        num_seeds=16,
        eps=1e-2,
        learning_rate=1e-3,
        max_length=MAX_LENGTH,
    )
    return TinyZo(loaded.model, loaded.tokenizer, walk, spec)


def tokenized(zo: TinyZo, n: int) -> list[TokenizedExample]:
    """``n`` examples tokenized as a torch client does."""
    return [tokenize_example(e, zo.tokenizer, MAX_LENGTH) for e in text_examples(n)]


@pytest.fixture()
def zo() -> TinyZo:
    """A fresh tiny-llama at w0, full walk."""
    return tiny_zo()


@pytest.fixture(scope="session")
def pristine_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny-llama bundle (full walk) per session: copy it before changing it."""
    zo = tiny_zo()
    out = tmp_path_factory.mktemp("edge") / "bundle"
    export_edge_bundle(zo.model, zo.tokenizer, zo.walk, zo.spec, out, tokenized(zo, 6))
    return out


@pytest.fixture()
def bundle_copy(pristine_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny-llama bundle."""
    return Path(shutil.copytree(pristine_bundle, tmp_path / "bundle"))


@pytest.fixture()
def make_bundle(tmp_path: Path) -> Callable[[TinyZo], Path]:
    """Export ``zo``'s bundle into a new folder under ``tmp_path``."""
    count = iter(range(1000))

    def make(zo: TinyZo) -> Path:
        out = tmp_path / f"bundle-{next(count)}"
        export_edge_bundle(
            zo.model, zo.tokenizer, zo.walk, zo.spec, out, tokenized(zo, 6)
        )
        return out

    return make
