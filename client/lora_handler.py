"""LoRA on the device: train the received global adapter, send it back.

The handler the method registry names for ``train.lora``; it raises on a bad
instruction or a node that lacks something, and :mod:`client.app` answers
with the matching error reply.
"""

from __future__ import annotations

from flwr.app import Context, Message

from client.lora_trainer import train_lora
from client.node import NodeSettings
from client.runtime import ClientRuntime
from models import adapter_layout, adapter_tensors, load_adapter_tensors
from protocols import (
    LoraTrainRes,
    TensorLayout,
    decode_lora_train_ins,
    encode_lora_train_res,
)

__all__ = ["handle"]


def handle(
    msg: Message, context: Context, node: NodeSettings, runtime: ClientRuntime
) -> Message:
    """Load the global adapter, train it on local data, reply with it."""
    del context
    ins = decode_lora_train_ins(msg.content)
    lora = runtime.lora_model(ins.spec, node.device)
    adapter_layout(lora.model).check(TensorLayout.of(ins.adapter))
    data = runtime.local_data(node.data_path, ins.spec, lora.tokenizer)
    load_adapter_tensors(lora.model, ins.adapter)
    stats = train_lora(
        lora.model,
        data.tokenized,
        ins.config,
        pad_id=int(lora.tokenizer.pad_token_id),
        label=node.label,
        device=node.device,
    )
    res = LoraTrainRes(
        adapter=adapter_tensors(lora.model),
        num_examples=len(data.examples),
        train_loss=stats.mean_loss,
    )
    return Message(encode_lora_train_res(res), reply_to=msg)
