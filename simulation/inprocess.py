"""An in-process federation: a Flower ``Grid`` that calls a ``ClientApp`` directly.

:class:`InProcessGrid` is for code that needs the real server loop and the
real ClientApp with real Flower messages, but neither Ray nor a SuperLink:
tests, benchmarks, a run on a machine where the simulation engine cannot
start. The ServerApp side sees an ordinary ``flwr.serverapp.Grid``; each
message is delivered, when it is pushed, by calling the ``ClientApp`` object
itself (``client_app(message, context)``, Flower's public entry point, which
routes by message type to the registered ``@app.train`` / ``@app.query``
handler). Every virtual node keeps one ``Context`` across messages, as a
SuperNode does::

    from client.app import app as client_app
    from simulation.inprocess import InProcessGrid

    grid = InProcessGrid(client_app, num_nodes=4, run_dir=run_dir)
    run_server(grid, config, run_dir)   # the same round loop as the engine's

Virtual node ``n`` (``n = 0 .. num_nodes - 1``) has node id
:meth:`InProcessGrid.node_id` ``(n)``, node config ``{"partition-id": n,
"num-partitions": num_nodes}`` (as Flower's simulation engine gives it) and
the run config ``{"run-dir": run_dir}`` (:data:`protocols.run_folder.RUN_DIR_KEY`),
the documented channel by which a simulated client finds its run folder.

Differences from a real deployment, on purpose: delivery is synchronous and
in order (``timeout`` never expires) and nodes never leave. As on a
SuperLink, each node receives its own copy of an instruction's content
(serialized and parsed back): a node may change what it receives (Flower's
SecAgg+ mod pops a key from the one ``RecordDict`` its workflow sends every
node) without the server or another node seeing it. Replies are handed back
as the ClientApp made them. A node may
join late: one built ``offline`` is missing from ``get_node_ids`` (and
refuses messages) until :meth:`InProcessGrid.connect`. A ClientApp wrapper
may call it while a node handles a message, so "node B connects after node A
answered" is an event, not a race against the server's polling.
Like a SuperNode, an exception raised by the ClientApp becomes an error
reply (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``) unless the grid is told to
let it propagate.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict, UserConfigValue
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from protocols.run_folder import RUN_DIR_KEY

__all__ = ["InProcessGrid", "use_server_identity"]

log = logging.getLogger(__name__)


def use_server_identity(run_id: int = 1, task_id: int = 1) -> None:
    """Make this process build Flower messages as the ServerApp of ``run_id``.

    ``flwr.app.Message(content, dst_node_id, message_type)`` stamps an
    instruction with the process's task identity (run id, source node id,
    task id), which Flower sets when it starts a ServerApp or ClientApp
    process. Code that builds instructions outside such a process (a test, a
    benchmark, :class:`InProcessGrid`) sets it here: the source node is the
    SuperLink's (``SUPERLINK_NODE_ID``), as for a real ServerApp.

    Parameters
    ----------
    run_id : int
        The run the messages belong to.
    task_id : int
        The task id recorded as the messages' source task.
    """
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = task_id


class InProcessGrid(Grid):
    """A ``Grid`` whose nodes are contexts in this process, served by one ClientApp.

    Constructing it calls :func:`use_server_identity` (``run_id``), the way
    Flower's simulation sets the identity before it runs a ServerApp, so the
    server code can build messages here.

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs (``client.app.app`` for Pollinate's).
    num_nodes : int
        Virtual nodes, at least 1.
    run_dir : Path | str | None
        The run folder, passed to every node as run config ``run-dir``.
    run_config : Mapping[str, UserConfigValue] | None
        Further run config for every node (``run-dir`` wins over a key of
        the same name here).
    run_id : int
        The run id of the contexts and of the server's messages.
    catch_exceptions : bool
        True (default): an exception in the ClientApp becomes an error reply,
        as on a SuperNode. False: it propagates out of ``push_messages``.
    offline : Collection[int]
        Node ids (:meth:`node_id`) of virtual nodes that have not connected
        yet: their contexts exist (:meth:`context`), but the server neither
        sees nor reaches them until :meth:`connect`. Empty by default.

    Raises
    ------
    ValueError
        If ``num_nodes < 1`` or ``offline`` names a node id not here.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        run_dir: Path | str | None = None,
        run_config: Mapping[str, UserConfigValue] | None = None,
        run_id: int = 1,
        catch_exceptions: bool = True,
        offline: Collection[int] = (),
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.client_app = client_app
        self.catch_exceptions = catch_exceptions
        config: dict[str, UserConfigValue] = dict(run_config or {})
        if run_dir is not None:
            config[RUN_DIR_KEY] = str(run_dir)
        self._contexts = {
            self.node_id(n): Context(
                run_id=run_id,
                node_id=self.node_id(n),
                node_config={"partition-id": n, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(config),
            )
            for n in range(num_nodes)
        }
        unknown = sorted(set(offline) - set(self._contexts))
        if unknown:
            raise ValueError(f"offline nodes {unknown} are not among this grid's")
        self._offline = set(offline)
        self._run = Run.create_empty(run_id)
        self._replies: dict[str, Message] = {}
        use_server_identity(run_id)

    @staticmethod
    def node_id(partition_id: int) -> int:
        """The node id of virtual node ``partition_id`` (after the SuperLink's id)."""
        return SUPERLINK_NODE_ID + 1 + partition_id

    def context(self, node_id: int) -> Context:
        """The context node ``node_id`` runs its messages in (kept across messages).

        Raises
        ------
        KeyError
            If no node has that id.
        """
        return self._contexts[node_id]

    def connect(self, node_id: int) -> None:
        """Connect an ``offline`` node: from now on the server sees and reaches it.

        Connecting a node that is already connected does nothing.

        Raises
        ------
        KeyError
            If no node has that id.
        """
        if node_id not in self._contexts:
            raise KeyError(node_id)
        self._offline.discard(node_id)

    # -- flwr.serverapp.Grid ----------------------------------------------------
    def set_run(self, run: Run) -> None:
        """Record the run this grid serves (a Flower engine calls this first)."""
        if not isinstance(run, Run):
            raise TypeError(f"run must be a flwr Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Run:
        """The run this grid serves."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """An instruction for ``dst_node_id`` (``Message``'s constructor does the same)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """The connected virtual nodes' ids, in partition order."""
        return [n for n in self._contexts if n not in self._offline]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver each instruction to its node now; return their message ids.

        Each message gets a fresh message id (as a SuperLink assigns one),
        the destination node's ClientApp runs it in the node's context, and
        the reply waits for :meth:`pull_messages`.

        Raises
        ------
        ValueError
            If a message is a reply, or its destination is not a connected
            node here.
        """
        ids = []
        for msg in messages:
            meta = msg.metadata
            if meta.reply_to_message_id:
                raise ValueError("push_messages takes instructions, not replies")
            dst = meta.dst_node_id
            if dst not in self._contexts or dst in self._offline:
                raise ValueError(
                    f"message for node {meta.dst_node_id}, which is not one of "
                    f"{self.get_node_ids()}"
                )
            # Flower's own grids set the id this way (it has no public setter).
            meta.__dict__["_message_id"] = uuid.uuid4().hex
            self._replies[meta.message_id] = self._deliver(msg)
            ids.append(meta.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies to ``message_ids`` not pulled before (each is handed out once)."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Deliver ``messages`` and return every reply, in the order sent.

        ``timeout`` is accepted for compatibility; delivery is synchronous,
        so every message gets its reply.
        """
        del timeout
        return self.pull_messages(self.push_messages(messages))

    # -- delivery -----------------------------------------------------------------
    def _deliver(self, msg: Message) -> Message:
        context = self._contexts[msg.metadata.dst_node_id]
        try:
            reply = self.client_app(_received_copy(msg), context)
        except Exception as exc:
            if not self.catch_exceptions:
                raise
            log.exception(
                "ClientApp of node %d raised on %s",
                msg.metadata.dst_node_id,
                msg.metadata.message_type,
            )
            # The reason reads as a SuperNode's would.
            reason = f"{type(exc)}:<'{exc}'>"
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                reply_to=msg,
            )
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return reply


def _received_copy(msg: Message) -> Message:
    """``msg`` as a node receives it: same metadata, its own copy of the content."""
    if not msg.has_content():
        return msg
    content = recorddict_from_proto(recorddict_to_proto(msg.content))
    copied: Message = Message(metadata=msg.metadata, content=content)  # type: ignore[call-overload]
    return copied
