"""SFPrompt on the device: local-loss warm-up, EL2N pruning, split training.

The handler the method registry names for ``train.sfprompt``. The device
trains its prompts and tail against the server's trunk service; a trunk that
fails or breaks the protocol mid-round is the node's setup problem
(:class:`~client.trunk_client.TrunkError`), not a bad instruction.
"""

from __future__ import annotations

import grpc
from flwr.app import Context, Message

from client.node import NodeSettings
from client.runtime import ClientRuntime
from client.split_trainer import SplitSettings, split_round
from client.trunk_client import TrunkClient, TrunkError
from models.split import load_trainable_state, trainable_state
from protocols import ProtocolError, TensorLayout
from protocols.split_messages import (
    SplitTrainRes,
    decode_split_train_ins,
    encode_split_train_res,
)

__all__ = ["handle"]


def handle(
    msg: Message, context: Context, node: NodeSettings, runtime: ClientRuntime
) -> Message:
    """Train the received prompts and tail over the trunk; reply with them."""
    del context
    ins = decode_split_train_ins(msg.content)
    parts = runtime.split_parts(ins.spec, node.device)
    live = trainable_state(parts.head, parts.tail)
    TensorLayout.of(live).check(TensorLayout.of(ins.tensors))
    data = runtime.local_data(node.data_path, ins.spec, parts.tokenizer)
    load_trainable_state(parts.head, parts.tail, ins.tensors)
    c = ins.config
    settings = SplitSettings(
        local_steps=c.local_steps,
        local_loss_steps=c.local_loss_steps,
        batch_size=c.batch_size,
        learning_rate=c.learning_rate,
        gamma=c.gamma,
        seed=c.seed,
        server_round=c.server_round,
    )
    try:
        root = c.trunk_root_certificate or None
        with (
            TrunkClient(c.trunk_address, root_certificates=root) as trunk,
            trunk.open(ins.spec, node.label, c.trunk_grant) as session,
        ):
            stats = split_round(
                parts.head,
                parts.tail,
                session,
                data.tokenized,
                settings,
                pad_id=int(parts.tokenizer.pad_token_id),
                label=node.label,
            )
    except ProtocolError as exc:
        raise TrunkError(grpc.StatusCode.INTERNAL, f"trunk session: {exc}") from exc
    res = SplitTrainRes(
        tensors={
            k: v.detach().clone()
            for k, v in trainable_state(parts.head, parts.tail).items()
        },
        num_examples=len(data.examples),
        train_loss=stats.split_loss,
        local_loss=stats.local_loss,
        kept=stats.kept,
        trunk_bytes_up=session.bytes_up,
        trunk_bytes_down=session.bytes_down,
    )
    return Message(encode_split_train_res(res), reply_to=msg)
