"""The Pollinate ClientApp: routes each message to its method's handler.

``client.app:app`` is the ClientApp Flower loads. Every training action in the
method registry (:mod:`protocols.methods`) is routed to the handler the
registry names, imported on the first message that needs it, so importing
this module stays cheap and a device imports only the method it runs.

Handlers decode, validate, act and reply; they raise when something is
wrong. This module is the one place that turns those exceptions into Flower
error replies (:func:`error_reply`), with a code that tells the server what
happened: a broken instruction, a node that lacks what it needs, or a node
that lost its synced state. The node keeps serving either way.

The per-process cache of models and data (:class:`client.runtime.ClientRuntime`)
is passed to :func:`build_client_app`; the module-level ``app`` makes one on
its first message.

A node whose node config says ``runtime = "onnx"`` is an edge client: it
answers ``train.zo`` with :func:`client.edge.handler.handle` (its own cache,
:class:`client.edge.runtime.EdgeRuntime`) and refuses other training. This
module and everything an edge node's hello and ``train.zo`` import need no
torch.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from client.node import NodeConfigError, NodeSettings
from corpora import DatasetError
from protocols import NodeHello, ProtocolError, encode_hello
from protocols.errors import OutOfSyncError
from protocols.identity import IdentityError, sign_hello
from protocols.installation import check_installation
from protocols.messages import (
    ACTION_HELLO,
    ERROR_BAD_INSTRUCTION,
    ERROR_NODE_SETUP,
    ERROR_OUT_OF_SYNC,
    decode_hello_ins,
)
from protocols.methods import load_plugin, train_actions
from protocols.zo_messages import ACTION_ZO

if TYPE_CHECKING:
    from client.edge.runtime import EdgeRuntime
    from client.runtime import ClientRuntime

check_installation()  # Flower puts the app folder first: a models.py there shadows

__all__ = ["Handler", "app", "build_client_app", "error_code", "error_reply"]

log = logging.getLogger(__name__)

Handler = Callable[[Message, Context, NodeSettings, "ClientRuntime"], Message]
"""A method's device handler: it may raise; :func:`error_reply` answers."""


def error_code(exc: BaseException) -> int | None:
    """The error-reply code for a handler's exception (None: not ours to map).

    ``OutOfSyncError`` before ``ProtocolError`` (it is one): the server then
    resends the whole history. Everything that says the node lacks something
    (config, data, model, edge bundle, files, the trunk service) is a setup
    error. Nothing is imported here: an exception of a module not imported
    yet cannot be raised, and an edge node must not import torch to answer.
    """
    if isinstance(exc, OutOfSyncError):
        return ERROR_OUT_OF_SYNC
    setup: tuple[type, ...] = (NodeConfigError, DatasetError)
    setup += _loaded(
        ("client.trunk_client", "TrunkError"),
        ("models.loading", "ModelLoadError"),
        ("protocols.edge_bundle", "EdgeBundleError"),
    )
    if isinstance(exc, setup):
        return ERROR_NODE_SETUP
    if isinstance(exc, ProtocolError):
        return ERROR_BAD_INSTRUCTION
    if isinstance(exc, OSError):
        return ERROR_NODE_SETUP
    return None


def _loaded(*names: tuple[str, str]) -> tuple[type, ...]:
    """The classes ``(module, name)`` of the modules this process has imported."""
    out: list[type] = []
    for module, name in names:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            out.append(cls)
    return tuple(out)


def error_reply(msg: Message, code: int, exc: BaseException) -> Message:
    """An error reply naming what went wrong, logged on the node."""
    reason = f"{type(exc).__name__}: {exc}"
    log.warning("refusing %s: %s", msg.metadata.message_type, reason)
    return Message(Error(code=code, reason=reason), reply_to=msg)


class _Runtime:
    """Holds the process's :class:`ClientRuntime` and :class:`EdgeRuntime`.

    Each is made on first use: an edge node never makes (nor imports) the
    torch one.
    """

    def __init__(
        self, runtime: ClientRuntime | None, edge: EdgeRuntime | None = None
    ) -> None:
        self._runtime = runtime
        self._edge = edge

    def get(self) -> ClientRuntime:
        if self._runtime is None:
            from client.runtime import ClientRuntime

            self._runtime = ClientRuntime()
        return self._runtime

    def edge(self) -> EdgeRuntime:
        if self._edge is None:
            from client.edge.runtime import EdgeRuntime

            self._edge = EdgeRuntime()
        return self._edge

    def count_examples(self, node: NodeSettings) -> int:
        """The node's example count, by the runtime the node runs."""
        if node.runtime == "onnx":
            return self.edge().count_examples(node.data_path)
        return self.get().count_examples(node.data_path)


def _guarded(
    run: Callable[[Message, Context], Message],
) -> Callable[[Message, Context], Message]:
    """``run`` with its known exceptions turned into error replies."""

    def handle(msg: Message, context: Context) -> Message:
        try:
            return run(msg, context)
        except Exception as exc:
            code = error_code(exc)
            if code is None:
                raise  # a bug, not a refusal: Flower reports it as one
            return error_reply(msg, code, exc)

    return handle


def _hello(runtime: _Runtime) -> Callable[[Message, Context], Message]:
    def hello(msg: Message, context: Context) -> Message:
        """Say who this node is, how many examples it holds (and its LoRA rank).

        With a node key (``auth-key``) and a nonce in the instruction, the
        node signs (nonce, label, node id): a server that authenticates
        nodes accepts the label only with that proof.
        """
        node = NodeSettings.from_context(context)
        count = runtime.count_examples(node)
        nonce = decode_hello_ins(msg.content)
        key = node.read_auth_key() if nonce is not None else None
        signature = b""
        if nonce is not None and key is not None:
            try:
                signature = sign_hello(key, nonce, node.label, context.node_id)
            except IdentityError as exc:
                raise NodeConfigError(f"node config 'auth-key': {exc}") from None
        hello = NodeHello(node.label, count, signature, lora_rank=node.lora_rank)
        return Message(encode_hello(hello), reply_to=msg)

    return hello


def _train(
    action: str, ref: str, runtime: _Runtime
) -> Callable[[Message, Context], Message]:
    def train(msg: Message, context: Context) -> Message:
        """Check the node serves this method, then run the method's handler.

        An ``onnx`` node runs the edge handler, for ``train.zo`` only.
        """
        node = NodeSettings.from_context(context)
        node.accept(action)
        if node.runtime == "onnx":
            if action != ACTION_ZO:
                raise NodeConfigError(
                    f"this node runs the onnx runtime, which trains {ACTION_ZO!r} "
                    f"(FedKSeed) only, not {action!r}"
                )
            from client.edge.handler import handle

            return handle(msg, context, node, runtime.edge())
        handler: Handler = load_plugin(ref)
        return handler(msg, context, node, runtime.get())

    return train


def build_client_app(
    runtime: ClientRuntime | None = None, edge: EdgeRuntime | None = None
) -> ClientApp:
    """A ClientApp serving every registered method with one model cache.

    Parameters
    ----------
    runtime : ClientRuntime, optional
        The cache of models and data to use; ``None`` makes one on the first
        message (what a SuperNode's or Ray actor's process wants).
    edge : EdgeRuntime, optional
        The same for ``onnx`` nodes (edge clients).
    """
    holder = _Runtime(runtime, edge)
    client_app = ClientApp()
    client_app.query(ACTION_HELLO)(_guarded(_hello(holder)))
    routes = {
        action: _guarded(_train(action, ref, holder))
        for action, ref in train_actions().items()
    }
    for action, handle in routes.items():
        client_app.train(action)(handle)
    # privacy.secagg: every SecAgg+ stage is a default-action "train" message.
    # Not guarded: Flower's mod cannot pass an error reply on (it reads the
    # reply's content), so a refusal raises and the node answers with an error.
    client_app.train(mods=[_secaggplus_mod])(_secagg(routes))
    return client_app


def _secaggplus_mod(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Flower's ``secaggplus_mod``, imported on the first SecAgg+ message.

    An ``onnx`` node refuses (raises): SecAgg+ needs the torch client.
    """
    if NodeSettings.from_context(context).runtime == "onnx":
        raise NodeConfigError("the onnx runtime does not support SecAgg+ yet")
    from client.secagg_handler import secaggplus_mod

    return secaggplus_mod(msg, context, call_next)


def _secagg(
    routes: dict[str, Callable[[Message, Context], Message]],
) -> Callable[[Message, Context], Message]:
    """The SecAgg+ ``train`` handler over the methods' ``routes`` (imported late)."""

    def train(msg: Message, context: Context) -> Message:
        from client.secagg_handler import secagg_train

        return secagg_train(routes)(msg, context)

    return train


app = build_client_app()
