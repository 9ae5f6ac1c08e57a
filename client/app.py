"""The Pollinate ClientApp: message handlers that run on the device.

Handlers decode, validate, act and reply. Anything wrong with an instruction
(a bad spec, a malformed adapter, missing local data) becomes an error reply
naming the problem; the node keeps serving. The handlers need no run config:
the spec, the training settings and the global adapter all arrive in the
message, and local settings come from the node config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from client.node import NodeConfigError, NodeSettings
from protocols import (
    LoraTrainRes,
    NodeHello,
    ProtocolError,
    TensorLayout,
    decode_lora_train_ins,
    encode_hello,
    encode_lora_train_res,
)
from protocols.messages import (
    ACTION_HELLO,
    ACTION_LORA,
    ERROR_BAD_INSTRUCTION,
    ERROR_NODE_SETUP,
    ERROR_OUT_OF_SYNC,
)
from protocols.split_messages import (
    ACTION_SFPROMPT,
    SplitTrainRes,
    decode_split_train_ins,
    encode_split_train_res,
)
from protocols.zo_messages import (
    ACTION_ZO,
    ZoTrainRes,
    decode_zo_train_ins,
    encode_zo_train_res,
)

if TYPE_CHECKING:
    from client.runtime import ClientRuntime

__all__ = ["app", "build_client_app"]

log = logging.getLogger(__name__)

app = ClientApp()


class _ProcessState:
    """The per-process runtime, created on the first message that needs it.

    The SuperNode (or Ray actor) process that hosts this app keeps models and
    data between messages through it.
    """

    runtime: ClientRuntime | None = None

    @classmethod
    def get(cls) -> ClientRuntime:
        if cls.runtime is None:
            from client.runtime import ClientRuntime

            cls.runtime = ClientRuntime()
        return cls.runtime


def _error_reply(msg: Message, code: int, exc: Exception) -> Message:
    reason = f"{type(exc).__name__}: {exc}"
    log.warning("refusing %s: %s", msg.metadata.message_type, reason)
    return Message(Error(code=code, reason=reason), reply_to=msg)


@app.query(ACTION_HELLO)
def hello(msg: Message, context: Context, run_dir: str | None = None) -> Message:
    """Say who this node is and how many examples it holds."""
    from corpora import DatasetError

    try:
        node = NodeSettings.from_context(context, run_dir)
        count = _ProcessState.get().count_examples(node.data_path)
    except (NodeConfigError, DatasetError, OSError) as exc:
        return _error_reply(msg, ERROR_NODE_SETUP, exc)
    return Message(encode_hello(NodeHello(node.label, count)), reply_to=msg)


@app.train(ACTION_LORA)
def train(msg: Message, context: Context, run_dir: str | None = None) -> Message:
    """Train the received global adapter on local data and send it back."""
    from client.lora_trainer import train_lora
    from corpora import DatasetError
    from models import (
        ModelLoadError,
        adapter_layout,
        adapter_tensors,
        load_adapter_tensors,
    )

    runtime = _ProcessState.get()
    try:
        node = NodeSettings.from_context(context, run_dir)
        node.accept("lora")
        ins = decode_lora_train_ins(msg.content)
        lora = runtime.lora_model(ins.spec, node.device)
        adapter_layout(lora.model).check(TensorLayout.of(ins.adapter))
        data = runtime.local_data(node.data_path, ins.spec, lora.tokenizer)
    except ProtocolError as exc:
        return _error_reply(msg, ERROR_BAD_INSTRUCTION, exc)
    except (NodeConfigError, DatasetError, ModelLoadError, OSError) as exc:
        return _error_reply(msg, ERROR_NODE_SETUP, exc)
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


@app.train(ACTION_ZO)
def train_zo(msg: Message, context: Context, run_dir: str | None = None) -> Message:
    """FedKSeed: catch up by seed replay, run local ZO steps, send the scalars."""
    from client.zo_state import OutOfSyncError
    from client.zo_trainer import zo_local_steps
    from corpora import DatasetError
    from models import ModelLoadError

    runtime = _ProcessState.get()
    try:
        node = NodeSettings.from_context(context, run_dir)
        node.accept("fedkseed")
        ins = decode_zo_train_ins(msg.content)
        state = runtime.zo_state(ins.spec, node.device, context.run_id)
        state.sync(ins)
        data = runtime.local_data(node.data_path, ins.spec, state.tokenizer)
    except OutOfSyncError as exc:
        return _error_reply(msg, ERROR_OUT_OF_SYNC, exc)
    except ProtocolError as exc:
        return _error_reply(msg, ERROR_BAD_INSTRUCTION, exc)
    except (NodeConfigError, DatasetError, ModelLoadError, OSError) as exc:
        return _error_reply(msg, ERROR_NODE_SETUP, exc)
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


@app.train(ACTION_SFPROMPT)
def train_sfprompt(
    msg: Message, context: Context, run_dir: str | None = None
) -> Message:
    """SFPrompt: local-loss warm-up, EL2N pruning, split training over the trunk."""
    from client.split_trainer import SplitSettings, split_round
    from client.trunk_client import TrunkClient, TrunkError
    from corpora import DatasetError
    from models import ModelLoadError
    from models.split import load_trainable_state, trainable_state

    runtime = _ProcessState.get()
    try:
        node = NodeSettings.from_context(context, run_dir)
        node.accept("sfprompt")
        ins = decode_split_train_ins(msg.content)
        parts = runtime.split_parts(ins.spec, node.device)
        live = trainable_state(parts.head, parts.tail)
        TensorLayout.of(live).check(TensorLayout.of(ins.tensors))
        data = runtime.local_data(node.data_path, ins.spec, parts.tokenizer)
    except ProtocolError as exc:
        return _error_reply(msg, ERROR_BAD_INSTRUCTION, exc)
    except (NodeConfigError, DatasetError, ModelLoadError, OSError) as exc:
        return _error_reply(msg, ERROR_NODE_SETUP, exc)
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
            trunk.open(ins.spec, node.label, c.server_round) as session,
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
    except (TrunkError, ProtocolError) as exc:
        return _error_reply(msg, ERROR_NODE_SETUP, exc)
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


def build_client_app(run_dir: Path) -> ClientApp:
    """The same handlers, bound to a simulation's run folder.

    Simulated nodes find their partition through the run folder. Binding it
    here (it travels with the app to every Ray worker, on this machine or on a
    cluster) needs no environment variable on the workers.
    """
    bound = ClientApp()
    folder = str(run_dir)

    def bind(
        handler: Callable[[Message, Context], Message],
    ) -> Callable[[Message, Context], Message]:
        def with_run_dir(msg: Message, context: Context) -> Message:
            return handler(msg, context, folder)

        return with_run_dir

    bound.query(ACTION_HELLO)(bind(hello))
    bound.train(ACTION_LORA)(bind(train))
    bound.train(ACTION_ZO)(bind(train_zo))
    bound.train(ACTION_SFPROMPT)(bind(train_sfprompt))
    return bound
