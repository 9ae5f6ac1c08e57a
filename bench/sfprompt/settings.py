"""Settings every SFPrompt section shares: paths, batches, the split, one split step.

Also the run config's ``[split]`` / ``[train]`` defaults (:func:`split_defaults`,
so the bench never drifts from them), real Dolly batches of exactly 128 tokens
and :func:`split_step`, the device's side of one split training step.
"""

from __future__ import annotations

from typing import Any

from bench.harness import SHARED_DATA, full_length_examples

DOLLY_PATH = SHARED_DATA / "dolly-15k" / "databricks-dolly-15k.jsonl.gz"
MODEL = "smollm2-135m"

# Split steps of sections 1-3: batch 8 x 128 real Dolly tokens.
STEP_BATCH = 8
STEP_TOKENS = 128
SFP_LR = 1e-3  # the SFPrompt learning rate of section 4
FULL_LR = 1e-5  # full fine-tuning (AdamW) in sections 2-3; the value does not matter

# Per-round accounting of section 1/2: a client with 200 examples, gamma 0.5,
# E = 1 pass of split training over the kept examples.
ROUND_EXAMPLES = 200
ROUND_EPOCHS = 1

# Paper (Cao et al. 2024) headline numbers, ViT-Base.
PAPER_COMM_RATIO = 0.47
PAPER_COMPUTE_FRACTION = 0.0046

# Section 4.
SIM_CLIENTS = 4
SIM_ROUNDS = 3
SIM_LIMIT = 800
SIM_ALPHA = 0.5
# Reduced from the requested 10 local steps, 32 eval examples and 32 new tokens
# to keep section 4 near 20 minutes on 2 shared CPU cores (see bench/README.md
# and the report's notes). The requested setting is
# `--sim-local-steps 10 --sim-eval 32 --sim-new-tokens 32 --sim-timeout 3600`.
SIM_LOCAL_STEPS = 3
SIM_EVAL = 16
SIM_NEW_TOKENS = 16


def split_defaults() -> dict[str, Any]:
    """The ``[split]`` and ``[train]`` defaults of the run config (no drift).

    The one place this bench reads the server's config defaults
    (``server.config.RunConfig``).
    """
    from server.config import RunConfig

    c = RunConfig()
    return {
        "num_prompts": c.split.num_prompts,
        "client_blocks": c.split.client_blocks,
        "tail": c.split.tail,
        "gamma": c.split.gamma,
        "local_loss_steps": c.split.local_loss_steps,
        "max_length": c.model.max_length,
        "local_steps": c.train.local_steps,
        "batch_size": c.train.batch_size,
    }


def dolly_examples(
    tokenizer: Any, n: int, length: int = STEP_TOKENS, seed: int = 1
) -> list[Any]:
    """``n`` tokenized Dolly examples of exactly ``length`` tokens (no padding).

    Examples are visited in a seeded random order and kept when prompt plus
    response reach ``length`` tokens (``tokenize_example`` truncates the
    prompt from the left), so every row is ``length`` real tokens.
    """
    return full_length_examples(DOLLY_PATH, tokenizer, n, length, seed)


def dolly_batches(
    tokenizer: Any,
    batches: int,
    n: int = STEP_BATCH,
    length: int = STEP_TOKENS,
    seed: int = 0,
) -> list[Any]:
    """``batches`` TrainBatches of ``n`` real Dolly examples, exactly ``length`` tokens."""
    from models import collate_train

    chosen = dolly_examples(tokenizer, n * batches, length, seed)
    pad = int(tokenizer.pad_token_id)
    out = [collate_train(chosen[b * n : (b + 1) * n], pad) for b in range(batches)]
    for b in out:
        assert tuple(b.input_ids.shape) == (n, length), b.input_ids.shape
    return out


def make_spec(model: Any, tail: str, max_length: int = STEP_TOKENS) -> Any:
    """The default ``SplitSpec`` for ``model`` with ``tail`` and ``max_length``."""
    from models.split import split_spec_for

    d = split_defaults()
    return split_spec_for(
        model,
        MODEL,
        num_prompts=d["num_prompts"],
        client_blocks=d["client_blocks"],
        max_length=max_length,
        tail=tail,
    )


def split_step(
    head: Any, tail: Any, session: Any, batch: Any, prompts: int, opt: Any
) -> tuple[Any, Any]:
    """One split training step, the device's side (phase 3 of ``split_round``).

    Head forward, the body over ``session``, tail loss and backward, the
    gradient at the body output back over ``session``, the gradient at the
    cut into the head, one optimizer step.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        The step's loss and the gradient at the cut the session returned.
    """
    from client.split_trainer import _lm_loss

    hidden, mask = head(batch.input_ids, batch.attention_mask)
    body_out = session.forward(hidden.detach(), mask, train=True)
    body_out.requires_grad_()
    loss = _lm_loss(tail(body_out)[:, prompts:], batch.labels)
    loss.backward()
    cut_grad = session.backward(body_out.grad)
    target = hidden if cut_grad.shape[1] == hidden.shape[1] else hidden[:, :prompts]
    target.backward(cut_grad)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, cut_grad
