"""The node's side of a SecAgg+ round: the method's handler behind Flower's mod.

In a ``privacy.secagg`` run every stage of the round arrives as a Flower
``train`` message (the only message type Flower's ``secaggplus_mod`` acts
on). The mod answers the key stages itself; at the collect stage it calls
:func:`secagg_train`'s handler, which

1. reads the ``secagg`` record (:class:`~protocols.messages.SecAggTask`:
   the method's action, the weight the server dictates, the clip) and strips
   it and Flower's ``secaggplus_configs`` from the content;
2. runs the method's own handler (``train.lora``, ``train.zo``), unchanged,
   on the remaining records;
3. turns its reply into Flower's legacy ``fitres.*`` layout: ONE flat
   float32 vector (LoRA: trained adapter minus the received global one, in
   the layout's name order; FedKSeed: the K per-seed sums of its scalars),
   ``num_examples`` = the dictated weight, and the clear metrics (train loss,
   the node's example count; FedKSeed's sync proof).

The mod then multiplies the vector by ``weight / max_weight``, clips it to
``+-clip``, quantizes, masks it, and clears every ``ArrayRecord`` of the
reply: the update never leaves the node in clear. This is the one client
module that depends on Flower's legacy SecAgg+ layer (``flwr==1.42.*``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from protocols import ProtocolError, TensorLayout
from protocols.messages import (
    ACTION_LORA,
    SecAggTask,
    decode_lora_train_ins,
    decode_lora_train_res,
    get_secagg,
    strip_secagg,
)
from protocols.zo_messages import (
    ACTION_ZO,
    decode_zo_train_ins,
    decode_zo_train_res,
)

__all__ = ["SecAggInnerError", "flat_update", "secagg_train", "secaggplus_mod"]

Inner = Callable[[Message, Context], Message]
"""A method's routed train handler (errors already turned into error replies)."""


class SecAggInnerError(RuntimeError):
    """The method's handler refused the instruction (its error reply, as text).

    Raised through Flower's mod: the node's reply becomes an error reply.
    """


def _lora_update(
    ins_content: Any, reply_content: Any
) -> tuple[np.ndarray, dict[str, Any]]:
    ins = decode_lora_train_ins(ins_content)
    res = decode_lora_train_res(reply_content, expected=TensorLayout.of(ins.adapter))
    vector = flat_update(res.adapter, ins.adapter)
    metrics = {"train-loss": res.train_loss, "num-examples": res.num_examples}
    return vector, metrics


def _zo_update(
    ins_content: Any, reply_content: Any
) -> tuple[np.ndarray, dict[str, Any]]:
    ins = decode_zo_train_ins(ins_content)
    k = ins.spec.num_seeds
    res = decode_zo_train_res(
        reply_content, num_seeds=k, max_steps=ins.config.local_steps
    )
    sums = torch.zeros(k, dtype=torch.float64)
    indices, scalars = torch.from_numpy(res.indices), torch.from_numpy(res.scalars)
    sums.index_add_(0, indices.long(), scalars.double())
    metrics = {
        "train-loss": res.train_loss,
        "num-examples": res.num_examples,
        "skipped-steps": res.skipped_steps,
        "synced-round": res.synced_round,
        "synced-hash": res.synced_hash,
    }
    return sums.numpy().astype(np.float32), metrics


_UPDATES = {ACTION_LORA: _lora_update, ACTION_ZO: _zo_update}


def flat_update(
    trained: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]
) -> np.ndarray:
    """``trained - start`` flattened to one float32 vector, in ``trained``'s order."""
    parts = [
        (t.detach().float().cpu() - start[k].detach().float().cpu()).flatten()
        for k, t in trained.items()
    ]
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(parts).numpy().astype(np.float32)


def secagg_train(inner: Mapping[str, Inner]) -> Inner:
    """The ``train`` handler behind ``secaggplus_mod``, routing to ``inner``.

    Parameters
    ----------
    inner : Mapping[str, Inner]
        Action to the method's routed handler (what ``client.app`` registers
        as ``train.<action>``).

    Returns
    -------
    Inner
        A handler for Flower's default ``train`` action, to register with
        ``mods=[secaggplus_mod]``. It raises :class:`ProtocolError` on an
        instruction without a usable ``secagg`` record and
        :class:`SecAggInnerError` when the method's handler replied with an
        error.
    """

    def train(msg: Message, context: Context) -> Message:
        task = get_secagg(msg.content)
        if task is None:
            raise ProtocolError("a 'train' message without a 'secagg' record")
        update = _UPDATES.get(task.action)
        handler = inner.get(task.action)
        if update is None or handler is None:
            raise ProtocolError(f"secagg action {task.action!r} is not served here")
        content = strip_secagg(msg.content)
        metadata = copy.copy(msg.metadata)
        metadata.message_type = f"train.{task.action}"
        inner_msg = Message(metadata=metadata, content=content)  # type: ignore[call-overload]
        reply = handler(inner_msg, context)
        if reply.has_error():
            raise SecAggInnerError(
                f"train.{task.action} refused (code {reply.error.code}): "
                f"{reply.error.reason}"
            )
        vector, metrics = update(content, reply.content)
        return Message(_fitres(vector, task, metrics), reply_to=msg)

    return train


def _fitres(vector: np.ndarray, task: SecAggTask, metrics: dict[str, Any]) -> Any:
    """Flower's legacy ``fitres.*`` content for ``vector``, weighted ``task.weight``.

    ``secagg-clipped`` counts the values the mod will clip (``|w x| > clip``,
    with ``w = weight / max_weight <= 1``: at most this many).
    """
    metrics = dict(metrics)
    metrics["secagg-clipped"] = int(np.count_nonzero(np.abs(vector) > task.clip))
    res = FitRes(
        status=Status(code=Code.OK, message="ok"),
        parameters=ndarrays_to_parameters([vector]),
        num_examples=task.weight,
        metrics=metrics,
    )
    return fitres_to_recorddict(res, keep_input=False)
