"""What the robustness benchmark runs: the scenarios, aggregators and DP grid.

Every run is a real federation on SmolLM2-135M-Instruct and Natural
Instructions (``../shared/data``), in process: the server's round loop
(:func:`server.app.run_server`) against a
:class:`simulation.inprocess.InProcessGrid` whose ClientApp is the
simulation's attack app (:mod:`simulation.attacks`), so malicious clients
are real clients that train and then lie.

The scale is what two CPU cores allow for about 170 runs (about a minute a
run): 10 clients, every one sampled, 2 rounds of 1 local step of 4
sequences of 64 tokens, Rouge-L on 24 held-out examples (12 new tokens). It is enough to
see an attack land (or not) and to rank defences; it is not enough to
reproduce a paper's absolute numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.harness import SHARED_DATA, RunScale

NAME = "robustness"
MODEL = "smollm2-135m"
DATA = SHARED_DATA / "natural-instructions-v1" / "ni-v1-61tasks-cap200.jsonl.gz"


@dataclass(frozen=True)
class Scale(RunScale):
    """The size of every run of one mode, and what the sections vary."""

    fractions: tuple[float, ...]
    behaviours: tuple[str, ...]
    methods: tuple[str, ...]
    aggregators: tuple[str, ...]
    dp_sigmas: tuple[float, ...]
    zo_include: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


FULL = Scale(
    model=MODEL,
    clients=10,
    rounds=2,
    local_steps=1,
    batch_size=4,
    max_length=64,
    limit=1200,
    eval_examples=24,
    new_tokens=12,
    fractions=(0.1, 0.25),
    behaviours=(
        "scale",
        "sign_flip",
        "gaussian",
        "constant",
        "inflate_examples",
        "label_flip",
        "shuffle_labels",
    ),
    methods=("lora", "fedkseed"),
    aggregators=("mean", "clipped_mean", "median", "trimmed_mean", "krum"),
    dp_sigmas=(0.5, 1.0, 2.0, 4.0),
    # FedKSeed on two CPU cores: the last two blocks and the final norm keep a
    # round's replay and steps within seconds.
    zo_include=("model.layers.2[89].*", "model.norm.weight"),
)

QUICK = Scale(
    model="tiny-llama",
    clients=4,
    rounds=1,
    local_steps=1,
    batch_size=2,
    max_length=32,
    limit=200,
    eval_examples=8,
    new_tokens=4,
    fractions=(0.25,),
    behaviours=("scale", "inflate_examples"),
    methods=("lora", "fedkseed"),
    aggregators=("mean", "clipped_mean", "median"),
    dp_sigmas=(1.0,),
)

AGGREGATORS: dict[str, dict[str, Any]] = {
    # Plain example-weighted FedAvg: no clip, no weight cap (what Pollinate did).
    "mean": {
        "federation.aggregator": "mean",
        "federation.clip": "off",
        "federation.weight_multiple": 1e30,
    },
    # Pollinate's default: clip at 3x the round's median, weights capped at 3x.
    "clipped_mean": {"federation.aggregator": "mean"},
    "median": {"federation.aggregator": "median"},
    "trimmed_mean": {
        "federation.aggregator": "trimmed_mean",
        "federation.trim_fraction": 0.25,
    },
    "krum": {"federation.aggregator": "krum"},
}
"""Aggregator label -> the config that makes it (every bound else default)."""

ATTACK_SETTINGS: dict[str, dict[str, Any]] = {
    "scale": {"attack.scale": 1e6},
    "sign_flip": {},
    "gaussian": {"attack.noise_std": 1.0},
    "constant": {"attack.value": 1e30},
    "inflate_examples": {"attack.examples": 2**62},
    "label_flip": {},
    "shuffle_labels": {},
}
"""Attack behaviour -> its strength (the issue's hostile cases)."""

ZO = {
    "zo.eps": 1e-3,
    "zo.learning_rate": 3e-5,
    "zo.num_seeds": 256,
}
LORA = {"train.learning_rate": 2e-3}


def run_overrides(
    scale: Scale,
    *,
    method: str,
    aggregator: str = "clipped_mean",
    behaviour: str = "none",
    fraction: float = 0.0,
    privacy: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The dotted-key config of one run."""
    out: dict[str, Any] = {
        "run.name": f"{method}-{aggregator}-{behaviour}-{fraction:g}",
        "run.method": method,
        "run.seed": seed,
        **scale.overrides(),
        "data.source": str(DATA),
        "data.partitioning": "dirichlet",
        "federation.round_timeout_s": 3600.0,
        "eval.metric": "rouge_l",
        **(
            {**ZO, "zo.include": list(scale.zo_include)}
            if method.startswith("fedkseed")
            else LORA
        ),
        **AGGREGATORS[aggregator],
    }
    if aggregator == "krum":
        out["federation.byzantine"] = max(1, round(fraction * scale.clients))
    if behaviour != "none":
        out.update(
            {
                "attack.behaviour": behaviour,
                "attack.fraction": fraction,
                **ATTACK_SETTINGS[behaviour],
            }
        )
    if privacy:
        out.update({f"privacy.{k}": v for k, v in privacy.items()})
    return out
