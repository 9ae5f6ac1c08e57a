"""What the adapter-mode tuning benchmark runs: datasets, settings, the scale.

Issue 11 asks that FedKSeed over a LoRA adapter (``zo.adapter_rank``) be
tuned (eps, learning rate, rank) until held-out Rouge-L rises, and that the
settings that make it rise be documented. Each run is a real FedKSeed
federation in this process (:func:`bench.harness.run_in_process`) with one
client, so its rounds are plain sequential MeZO steps and the curve reads
as Rouge-L against steps; the central evaluation scores the held-out
examples (the run's ``eval.jsonl``) after every round, round 0 being the
base model.

Datasets:

``builtin``
    The offline default run's six short-answer tasks (``builtin:tasks``):
    answers of one to six words, whose format (no preamble, stop after the
    answer) every task shares.
``ni``
    Natural Instructions (61 tasks, 1,200 examples, the task's definition in
    the prompt, left-truncated to the model's length): answers of every
    length and kind.

Settings (:data:`SETTINGS`): MeZO's LoRA perturbation scale ``eps = 1e-2``
with learning rates and ranks around the one that lowered held-out loss
steadily in earlier probes (lr 1e-3, rank 8, batch 8; 3e-3 diverged, batch 1
drifted). ``zo.adapter_alpha`` is twice the rank, so the adapter's scale
``alpha / r`` is 2 at every rank, as the ``[zo]`` default (16 / 8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.harness import SHARED_DATA, RunScale

NAME = "zo_adapter"

NI_PATH = SHARED_DATA / "natural-instructions-v1" / "ni-v1-61tasks-cap200.jsonl.gz"

DATASETS: dict[str, dict[str, Any]] = {
    "builtin": {"data.source": "builtin:tasks"},
    "ni": {"data.source": str(NI_PATH)},
}
"""Dataset label -> its data settings."""

DATASET_NAMES = {
    "builtin": "built-in tasks (six short-answer tasks)",
    "ni": "Natural Instructions (61 tasks, definitions in the prompt)",
}
"""How the report names each dataset."""


@dataclass(frozen=True)
class Setting:
    """One adapter-mode setting: rank, perturbation scale, learning rate."""

    rank: int
    eps: float
    learning_rate: float

    def overrides(self) -> dict[str, Any]:
        """The ``[zo]`` keys of this setting (adapter scale alpha / r = 2)."""
        return {
            "zo.adapter_rank": self.rank,
            "zo.adapter_alpha": 2.0 * self.rank,
            "zo.eps": self.eps,
            "zo.learning_rate": self.learning_rate,
        }


SETTINGS: dict[str, Setting] = {
    "r8-lr1e-3": Setting(8, 1e-2, 1e-3),
    "r8-lr3e-4": Setting(8, 1e-2, 3e-4),
    "r2-lr1e-3": Setting(2, 1e-2, 1e-3),
    "r2-lr3e-3": Setting(2, 1e-2, 3e-3),
}
"""Setting name -> what it is (the keys are the runs' ``setting`` labels)."""

DEFAULT_PLAN: tuple[tuple[str, str], ...] = (
    ("builtin", "r8-lr1e-3"),
    ("builtin", "r8-lr3e-4"),
    ("builtin", "r2-lr1e-3"),
    ("ni", "r2-lr1e-3"),
    ("ni", "r2-lr3e-3"),
)
"""(dataset, setting) of a default run: the sweep on the built-in tasks, then
their best setting and a three times larger step on Natural Instructions
(whose steps cost about three times as much)."""

FULL: dict[str, RunScale] = {
    "builtin": RunScale(
        model="smollm2-135m",
        clients=1,
        rounds=6,
        local_steps=50,
        batch_size=8,
        max_length=64,
        limit=2400,
        eval_examples=128,
        new_tokens=16,
    ),
    "ni": RunScale(
        model="smollm2-135m",
        clients=1,
        rounds=6,
        local_steps=100,
        batch_size=8,
        max_length=128,
        limit=1200,
        eval_examples=64,
        new_tokens=32,
    ),
}
"""Scale of each dataset's runs: builtin 300 steps, NI 600 steps, batch 8.
Measured on two CPU cores: about 1.6 s a step on the built-in tasks and 3.5
s on NI, each round's evaluation included, so about 8 min a built-in run
and 35 min an NI run (when nothing else runs), under 2 h in all."""

QUICK: dict[str, RunScale] = {
    name: RunScale(
        model="tiny-llama",
        clients=1,
        rounds=2,
        local_steps=2,
        batch_size=2,
        max_length=32,
        limit=120,
        eval_examples=4,
        new_tokens=2,
    )
    for name in DATASETS
}
"""``--quick``: tiny-llama built from its config, a few steps, under a minute."""


def run_overrides(
    scale: RunScale, *, dataset: str, setting: str, seed: int
) -> dict[str, Any]:
    """The dotted-key config of one run."""
    return {
        "run.name": f"{setting}-{dataset}-s{seed}",
        "run.method": "fedkseed",
        "run.seed": seed,
        **scale.overrides(),
        "data.partitioning": "iid",
        "federation.round_timeout_s": 7200.0,
        "eval.metric": "rouge_l",
        "eval.every": 1,
        **DATASETS[dataset],
        **SETTINGS[setting].overrides(),
    }
