"""FedKSeed on the device: catch up by seed replay, run ZO steps, send scalars.

The handler the method registry names for ``train.zo`` (FedKSeed and
FedKSeed-Pro). An ``OutOfSyncError`` tells the server to resend the whole
history; :mod:`client.app` turns it and every other refusal into an error
reply.

With local differential privacy (the instruction carries a ``local-dp``
record) the reply holds one pair per distinct seed, the per-seed sums clipped
to L2 norm C with Gaussian noise added (:func:`strategies.seed_pool.local_dp_pairs`).
The noise of a simulated node is reproducible, drawn from ``(run seed, round,
label)``; a deployed node draws a fresh secret seed every round. With
client-side clipping (central DP, a ``client-clip`` record) the reply holds
the same merged pairs clipped to C, without noise
(:func:`strategies.seed_pool.clipped_pairs`); the server adds the noise.

The wire payloads hold NumPy arrays (:mod:`protocols.zo_messages` needs no
torch); this handler converts at its boundary.
"""

from __future__ import annotations

import torch
from flwr.app import Context, Message

from client.node import NodeSettings
from client.runtime import ClientRuntime
from client.zo_trainer import zo_local_steps
from protocols.messages import RoundSchedule
from protocols.zo_messages import (
    ZoTrainIns,
    ZoTrainRes,
    decode_zo_train_ins,
    encode_zo_train_res,
)
from strategies.privacy import fresh_noise_seed, noise_generator
from strategies.seed_pool import clipped_pairs, local_dp_pairs

__all__ = ["handle", "pro_probabilities"]


def pro_probabilities(ins: ZoTrainIns) -> torch.Tensor | None:
    """FedKSeed-Pro's sampling distribution as this torch client draws from it.

    ``softmax(q / 255)`` over the uint8 importances in float64, by
    ``torch.softmax``: its last bits can differ from NumPy's
    (:meth:`~protocols.zo_messages.ZoTrainIns.probabilities`, the torch-free
    clients'), and ``torch.multinomial`` draws depend on them, so the torch
    client keeps this to draw the same seeds as before. None: uniform sampling.
    """
    if ins.importance is None:
        return None
    q = torch.from_numpy(ins.importance)
    return torch.softmax(q.double() / 255.0, dim=0)


def handle(
    msg: Message, context: Context, node: NodeSettings, runtime: ClientRuntime
) -> Message:
    """Sync to the target model, train locally, reply with (seed, scalar) pairs."""
    ins = decode_zo_train_ins(msg.content)
    state = runtime.zo_state(ins.spec, node.device, context.run_id, node.state_dir)
    state.sync(ins)
    data = runtime.local_data(node.data_path, ins.spec, state.tokenizer)
    synced_round, synced_hash = state.round, state.hash
    state.mark_trained()
    try:
        stats = zo_local_steps(
            state.model,
            state.perturbed(),
            data.tokenized,
            ins.config,
            seeds=state.seeds,
            eps=ins.spec.eps,
            learning_rate=ins.spec.learning_rate,
            probabilities=pro_probabilities(ins),
            pad_id=int(state.tokenizer.pad_token_id),
            label=node.label,
            device=node.device,
        )
    finally:
        state.restore()  # back to the synced global model, whatever happened
    indices, scalars = stats.indices, stats.scalars
    if ins.local_privacy is not None:
        indices, scalars = local_dp_pairs(
            indices,
            scalars,
            clip_norm=ins.local_privacy.clip_norm,
            noise_multiplier=ins.local_privacy.noise_multiplier,
            generator=_local_noise(ins.config, node),
        )
    elif ins.client_clip is not None:
        indices, scalars = clipped_pairs(
            indices, scalars, clip_norm=ins.client_clip.clip_norm
        )
    res = ZoTrainRes(
        indices=indices.detach().cpu().to(torch.int32).numpy(),
        scalars=scalars.detach().cpu().to(torch.float32).numpy(),
        num_examples=len(data.examples),
        train_loss=stats.mean_loss,
        synced_round=synced_round,
        synced_hash=synced_hash,
        skipped_steps=stats.skipped,
    )
    return Message(encode_zo_train_res(res), reply_to=msg)


def _local_noise(config: RoundSchedule, node: NodeSettings) -> torch.Generator:
    """The generator of this reply's local DP noise.

    A simulated node (it has a run folder's state directory) draws from
    ``(run seed, round, "local:" + label)`` so that a simulation can be
    repeated exactly; a deployed node from a fresh secret seed.
    """
    if node.state_dir is not None:
        return noise_generator(config.seed, config.server_round, f"local:{node.label}")
    return noise_generator(
        fresh_noise_seed(), config.server_round, f"local:{node.label}"
    )
