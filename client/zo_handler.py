"""FedKSeed on the device: catch up by seed replay, run ZO steps, send scalars.

The handler the method registry names for ``train.zo`` (FedKSeed and
FedKSeed-Pro). An ``OutOfSyncError`` tells the server to resend the whole
history; :mod:`client.app` turns it and every other refusal into an error
reply.
"""

from __future__ import annotations

from flwr.app import Context, Message

from client.node import NodeSettings
from client.runtime import ClientRuntime
from client.zo_trainer import zo_local_steps
from protocols.zo_messages import ZoTrainRes, decode_zo_train_ins, encode_zo_train_res

__all__ = ["handle"]


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
            probabilities=ins.probabilities(),
            pad_id=int(state.tokenizer.pad_token_id),
            label=node.label,
            device=node.device,
        )
    finally:
        state.restore()  # back to the synced global model, whatever happened
    res = ZoTrainRes(
        indices=stats.indices,
        scalars=stats.scalars,
        num_examples=len(data.examples),
        train_loss=stats.mean_loss,
        synced_round=synced_round,
        synced_hash=synced_hash,
        skipped_steps=stats.skipped,
    )
    return Message(encode_zo_train_res(res), reply_to=msg)
