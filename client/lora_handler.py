"""LoRA on the device: train the received global adapter, send it back.

The node trains the rank the instruction names (``client_rank``, one of the
spec's allowed ranks) on a model built from ``spec.at_rank(client_rank)``:
same ``alpha``, so its update is ``(alpha / r) * B @ A`` at every rank. A node
started with ``lora-rank`` refuses an instruction for another rank.

The handler the method registry names for ``train.lora``; it raises on a bad
instruction or a node that lacks something, and :mod:`client.app` answers
with the matching error reply.

With local differential privacy (the instruction carries
:class:`~protocols.LocalPrivacy`), the node replies with
``global + clip(update, C) + N(0, (sigma C)^2)`` instead of its trained
adapter. The noise of a simulated node comes from
``(run seed, round, node label)``, so simulations are reproducible; a
deployed node draws a fresh secret seed every round (the server, which knows
the run seed, must not be able to subtract it).

Under FedEx-LoRA (``lora.aggregation = "exact"``) the instruction carries the
run's cumulative residual per adapted module; before training, the node sets
those modules' frozen base weights to their pristine copies plus the residual
(:func:`apply_residual`), and puts every other module back to its pristine
copy, so a model reused across rounds and ranks never trains on a stale one.

With client-side clipping (central DP, ``privacy.clipping = "client"``: the
instruction carries :class:`~protocols.messages.ClientClip`), the node
replies with ``global + clip(update, C)`` and adds no noise (the server adds
it to the sum): :func:`clip_update`, :func:`privatize`'s clip alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import Context, Message

from client.lora_trainer import train_lora
from client.node import NodeSettings
from client.runtime import ClientRuntime, LoraModel
from models import adapter_layout, adapter_tensors, load_adapter_tensors
from protocols import (
    LoraTrainRes,
    ProtocolError,
    TensorLayout,
    decode_lora_train_ins,
    encode_lora_train_res,
)
from protocols.messages import (
    ClientClip,
    LocalPrivacy,
    get_client_clip,
    get_local_privacy,
)
from strategies.lora_factors import LoraRuleError, fold_residuals
from strategies.privacy import fresh_noise_seed, gaussian_noise, noise_generator
from strategies.robust import clip_to_norm

__all__ = ["apply_residual", "check_rank", "clip_update", "handle", "privatize"]


def handle(
    msg: Message, context: Context, node: NodeSettings, runtime: ClientRuntime
) -> Message:
    """Load the global adapter, train it on local data, reply with it."""
    del context
    ins = decode_lora_train_ins(msg.content)
    check_rank(ins.client_rank, node)
    dp = get_local_privacy(msg.content)
    client_clip = get_client_clip(msg.content)
    lora = runtime.lora_model(ins.spec.at_rank(ins.client_rank), node.device)
    adapter_layout(lora.model).check(TensorLayout.of(ins.adapter))
    data = runtime.local_data(node.data_path, ins.spec, lora.tokenizer)
    apply_residual(lora, ins.residual)
    load_adapter_tensors(lora.model, ins.adapter)
    stats = train_lora(
        lora.model,
        data.tokenized,
        ins.config,
        pad_id=int(lora.tokenizer.pad_token_id),
        label=node.label,
        device=node.device,
        freeze_a=ins.spec.aggregation == "ffa",
    )
    adapter = adapter_tensors(lora.model)
    # FFA-LoRA: A is frozen, so only B is clipped and noised; A goes back as sent
    # (noise on it would only make the server refuse the reply).
    frozen = ins.spec.aggregation == "ffa"
    trained = {k: t for k, t in adapter.items() if not (frozen and ".lora_A." in k)}
    start = {k: ins.adapter[k] for k in trained}
    if dp is not None:
        # A simulated node has a run-folder scratch space; a deployed one not.
        seed = ins.config.seed if node.state_dir is not None else fresh_noise_seed()
        generator = noise_generator(
            seed, ins.config.server_round, stream=f"local:{node.label}"
        )
        trained = privatize(trained, start, dp, generator)
    elif client_clip is not None:
        trained = clip_update(trained, start, client_clip)
    adapter = {k: trained.get(k, ins.adapter[k]) for k in adapter}
    res = LoraTrainRes(
        adapter=adapter,
        num_examples=len(data.examples),
        train_loss=stats.mean_loss,
    )
    return Message(encode_lora_train_res(res), reply_to=msg)


def check_rank(client_rank: int, node: NodeSettings) -> None:
    """Refuse an instruction to train another rank than the node's ``lora-rank``.

    A node without ``lora-rank`` trains the rank it is told.

    Raises
    ------
    ProtocolError
        If the node has a ``lora-rank`` and ``client_rank`` is not it.
    """
    if node.lora_rank is not None and client_rank != node.lora_rank:
        raise ProtocolError(
            f"the instruction says LoRA rank {client_rank}, but this node trains "
            f"rank {node.lora_rank} (node config 'lora-rank')"
        )


def apply_residual(lora: LoraModel, residual: Mapping[str, torch.Tensor]) -> None:
    """Base weights := pristine + ``residual`` per module; others pristine.

    ``residual`` maps module prefixes to dense ``(out, in)`` tensors (empty:
    every module back to its pristine weight, bit for bit). The fold is
    :func:`strategies.lora_factors.fold_residuals` of the pristine copy, never of
    the live weight, so nothing accumulates across rounds. Nothing is written
    unless every module is found and fits.

    Raises
    ------
    ProtocolError
        If a residual names a module the model does not have, or does not fit
        its base weight (one line).
    """
    base = lora.base_weights
    try:
        base.assign(fold_residuals(base, residual))
    except (ValueError, LoraRuleError) as exc:
        raise ProtocolError(
            f"cannot fold the instruction's residual: {' '.join(str(exc).split())}"
        ) from None


def privatize(
    trained: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    dp: LocalPrivacy,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The local DP release: ``start + clip(trained - start, C) + noise``.

    The noise is ``N(0, (sigma C)^2)`` per value; the sum runs in float32 and
    is cast back to each tensor's dtype.
    """
    return _release(trained, start, dp.clip_norm, dp.std(), generator)


def clip_update(
    trained: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    clip: ClientClip,
) -> dict[str, torch.Tensor]:
    """Client-side clipping: ``start + clip(trained - start, C)``, no noise.

    :func:`privatize` without the noise; the sum runs in float32 and is cast
    back to each tensor's dtype.
    """
    return _release(trained, start, clip.clip_norm, 0.0, None)


def _release(
    trained: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    clip_norm: float,
    std: float,
    generator: torch.Generator | None,
) -> dict[str, torch.Tensor]:
    """``start + clip(trained - start, clip_norm)`` (+ noise of ``std`` if any)."""
    delta = {
        k: t.float() - start[k].to(device=t.device, dtype=torch.float32)
        for k, t in trained.items()
    }
    clipped, _ = clip_to_norm(delta, clip_norm)
    out = {
        k: start[k].to(device=t.device, dtype=torch.float32) + clipped[k]
        for k, t in trained.items()
    }
    if generator is not None and std > 0:
        noise = gaussian_noise(clipped, std, generator)
        out = {k: v + noise[k] for k, v in out.items()}
    return {k: out[k].to(t.dtype) for k, t in trained.items()}
