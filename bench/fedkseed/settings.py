"""Settings every FedKSeed section shares: paths, the paper's numbers, batches.

Also the helpers more than one section needs: :func:`fixed_ni_batch` (the
real Natural Instructions batch of sections 2 and 3), :func:`zo_spec_for`
(the run's ``ZOSpec``, built the way the server builds it), and
:func:`zo_train_config` / :func:`run_zo_steps` (the bench's ZO steps through
the client's ``zo_local_steps``).
"""

from __future__ import annotations

from typing import Any

from bench.harness import SHARED_DATA, full_length_examples

NI_PATH = SHARED_DATA / "natural-instructions-v1" / "ni-v1-61tasks-cap200.jsonl.gz"
MODEL = "smollm2-135m"

# Paper setting (FedKSeed, Qin et al. 2024): K seeds, tau local steps, 10 clients/round.
PAPER_K = 4096
PAPER_TAU = 200
PAPER_CLIENTS = 10
PAPER_EPS = 5e-4
PAPER_LR = 3e-7

# Section 2/3 batch.
STEP_BATCH = 8
STEP_TOKENS = 128
STEP_EPS = 1e-3
STEP_LR = 1e-6  # MeZO's full-parameter learning rate

# Section 5 defaults.
SIM_CLIENTS = 4
SIM_ROUNDS = 3
SIM_LIMIT = 1200
SIM_EVAL = 32
ZO_INCLUDE = ("model.layers.2[89].*", "model.norm.weight")
ZO_EPS = 1e-3
PROBE_LRS = (1e-4, 3e-5, 1e-5)

SIM_RUNS = ("lora", "fedkseed", "fedkseed-pro")
"""Section 5 runs, by name."""


def expected_distinct(k: int, draws: int) -> float:
    """Expected number of distinct seeds among ``draws`` uniform draws from ``k``."""
    return k * (1.0 - (1.0 - 1.0 / k) ** draws)


def fixed_ni_batch(
    tokenizer: Any, n: int = STEP_BATCH, length: int = STEP_TOKENS, seed: int = 0
) -> list[Any]:
    """``n`` real NI examples tokenized to exactly ``length`` tokens (no padding).

    Examples are visited in a seeded random order and kept when the prompt
    plus response reach ``length`` tokens; ``tokenize_example`` truncates the
    prompt from the left to fit, so every row is exactly ``length`` real tokens.

    Raises
    ------
    RuntimeError
        If fewer than ``n`` examples reach ``length`` tokens.
    """
    chosen = full_length_examples(NI_PATH, tokenizer, n, length, seed)
    if len(chosen) < n:
        raise RuntimeError(f"only {len(chosen)} NI examples reach {length} tokens")
    return chosen


def zo_spec_for(overrides: dict[str, Any]) -> Any:
    """The ``ZOSpec`` the server would send for a config with ``overrides``.

    The one place the bench asks the server for a spec
    (``server.config.load_config`` then ``server.methods.build_spec``).
    """
    from server.config import load_config
    from server.methods import build_spec

    return build_spec(load_config(None, overrides))


def zo_train_config(local_steps: int, batch_size: int, learning_rate: float) -> Any:
    """The ``LocalTrainConfig`` of the bench's ZO steps (round 1, no decay, seed 0)."""
    from protocols import LocalTrainConfig

    return LocalTrainConfig(
        server_round=1,
        local_steps=local_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=0.0,
        seed=0,
    )


def run_zo_steps(
    model: Any,
    params: list[Any],
    examples: list[Any],
    config: Any,
    *,
    seeds: Any,
    eps: float,
    pad_id: int,
    label: str = "bench",
) -> Any:
    """``zo_local_steps`` on CPU at ``config``'s learning rate, seeds drawn uniformly.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model, trained in place.
    params : list[tuple[str, torch.Tensor]]
        The perturbed parameters.
    examples : list[models.TokenizedExample]
        The client's tokenized examples.
    config : protocols.LocalTrainConfig
        Steps, batch size and learning rate (:func:`zo_train_config`).
    seeds : Sequence[int]
        The candidate seeds.
    eps : float
        The perturbation scale.
    pad_id : int
        The tokenizer's pad token.
    label : str
        The run's label in ``zo_local_steps``.

    Returns
    -------
    client.zo_trainer.ZoStats
        What ``zo_local_steps`` returns.
    """
    import torch

    from client.zo_trainer import zo_local_steps

    return zo_local_steps(
        model,
        params,
        examples,
        config,
        seeds=seeds,
        eps=eps,
        learning_rate=config.learning_rate,
        probabilities=None,
        pad_id=pad_id,
        label=label,
        device=torch.device("cpu"),
    )
