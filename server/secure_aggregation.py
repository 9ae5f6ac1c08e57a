"""Secure aggregation: a round's exchange under Flower 1.42's SecAgg+ protocol.

With ``privacy.secagg`` the round loop (:func:`server.federation.run_rounds`)
exchanges the method's instructions through :func:`secure_exchange` instead
of one send-and-receive: the four SecAgg+ stages (setup, share keys, collect
masked vectors, unmask) run on the run's ``Grid``, and the strategy gets one
reply, labelled :data:`~protocols.messages.SECURE_MEAN_LABEL`, holding the
survivors' weighted mean (:class:`~protocols.messages.SecureMean`). The server
never holds an individual update: Flower's ``secaggplus_mod`` on the node
masks the update and clears every ``ArrayRecord`` of the reply.

This is the one server module that depends on Flower's legacy SecAgg+ layer
(``flwr.server.workflow``, ``LegacyContext``, a legacy ``Strategy``,
``FitIns``/``FitRes``), pinned to ``flwr==1.42.*``; the node's side is
:mod:`client.secagg_handler`. What is Flower's and what is ours:

* Flower's: ``SecAggPlusWorkflow``'s four public stage methods, run as they
  are, and the whole cryptography and quantization.
* Ours: :class:`_Capture`, a legacy-strategy stub that names the round's
  nodes and captures the unmasked aggregate; the swap of each node's
  ``fitins.*`` content for the method's own instruction; a byte-counting
  ``Grid`` wrapper (every stage's bytes per node go into the ledger, channel
  ``secagg.<stage>``); and two work-arounds:

  - *Early dropout* (:func:`_forget_early_dropouts`): in Flower 1.42 a node
    lost in setup or share_keys stays in ``sampled_node_ids`` and in its
    neighbours' neighbourhoods, so the unmask stage names it dead, its
    neighbours hold no share of its key (``KeyError``) and the round halts.
    It handed out no shares, so it is simply forgotten after share_keys.
  - *Total weight*: the workflow discards the unmasked weight slot
    (``sum_i round(w_i / max_weight * T)``); :func:`_recording_factor_extract`
    wraps the function that reads it so that the round can report the total
    weight the clients claimed (checked against the dictated weights by
    :mod:`strategies.secure_mean`).

Security model (Flower's SecAgg+): a semi-honest server; a client can put any
value in any slot (clipping is the node's, via the mod), so robust
aggregators cannot run under it (``server.config`` refuses them).
Quantization: each weighted value ``w_i / max_weight * x_i`` is clipped to
``+-clip`` and rounded stochastically to a step ``2 clip / T``; the mean is
off by less than ``n (2 clip / T) / sum_i (w_i / max_weight)`` per value.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.secure_aggregation import secaggplus_workflow as _saw
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import (
    WorkflowState,
)
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from protocols import ByteLedger, payload_bytes
from protocols.messages import (
    MESSAGE_SECURE_MEAN,
    SECURE_MEAN_LABEL,
    SecAggTask,
    SecureMean,
    encode_secure_mean,
    put_secagg,
)
from server.config import SECAGG_MODULUS, SECAGG_QUANTIZATION, PrivacySection
from server.federation import Exchange
from strategies import LabelledReply

__all__ = [
    "SecAggSettings",
    "SecureAggregationError",
    "secure_exchange",
    "secure_mean_round",
]

log = logging.getLogger(__name__)


class SecureAggregationError(RuntimeError):
    """A SecAgg+ round halted (too few live neighbours to unmask)."""


@dataclass(frozen=True, slots=True)
class SecAggSettings:
    """The SecAgg+ parameters of a run (``[privacy]`` secagg_*).

    Attributes
    ----------
    num_shares : int
        Each node's neighbourhood size (Flower's ``num_shares``).
    threshold : int
        Shares needed to rebuild a secret (``reconstruction_threshold``).
    clip : float
        ``clipping_range``: weighted values are clipped to +-clip.
    quantization : int
        ``quantization_range`` T.
    modulus : int
        ``modulus_range`` M (sums wrap at it; n T < M).
    """

    num_shares: int
    threshold: int
    clip: float
    quantization: int = SECAGG_QUANTIZATION
    modulus: int = SECAGG_MODULUS

    @classmethod
    def from_config(cls, privacy: PrivacySection) -> SecAggSettings:
        """The settings of ``privacy`` (``secagg`` itself is the caller's test)."""
        return cls(
            num_shares=privacy.secagg_shares,
            threshold=privacy.secagg_threshold,
            clip=privacy.secagg_clip,
        )


# -- total weight: read the weight slot the workflow discards --------------------
_FACTOR = threading.local()
_factor_extract = getattr(_saw, "factor_extract")  # noqa: B009 (not re-exported)


def _recording_factor_extract(
    parameters: list[np.ndarray],
) -> tuple[int, list[np.ndarray]]:
    """Flower's ``factor_extract``, remembering the unmasked total weight slot."""
    factor, rest = _factor_extract(parameters)
    _FACTOR.value = int(factor)
    return factor, rest


setattr(_saw, "factor_extract", _recording_factor_extract)  # noqa: B010


# -- the legacy-strategy stub ----------------------------------------------------
class _Capture(LegacyStrategy):
    """Legacy-strategy stub: names the round's nodes, captures the aggregate.

    ``unmask_stage`` puts the same unmasked aggregate into every survivor's
    ``FitRes``; the survivors are the proxies in ``results``.
    """

    def __init__(self, grid: Grid, nodes: Sequence[int]) -> None:
        self.grid, self.nodes = grid, list(nodes)
        self.aggregate: list[np.ndarray] | None = None
        self.results: dict[int, FitRes] = {}

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: Any
    ) -> list[tuple[ClientProxy, FitIns]]:
        empty = FitIns(Parameters(tensors=[], tensor_type=""), {})
        run_id = self.grid.run.run_id
        return [(GridClientProxy(n, self.grid, run_id), empty) for n in self.nodes]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: Any,
    ) -> tuple[Parameters | None, dict[str, Any]]:
        self.results = {int(p.node_id): res for p, res in results}
        params = results[0][1].parameters
        self.aggregate = parameters_to_ndarrays(params)
        return params, {}

    def configure_evaluate(self, *args: Any) -> list[Any]:
        return []

    def aggregate_evaluate(self, *args: Any) -> tuple[None, dict[str, Any]]:
        return None, {}

    def evaluate(self, *args: Any) -> None:
        return None


# -- a Grid that counts each stage's bytes per node ------------------------------
def _stage_of(messages: Sequence[Message]) -> str:
    """The SecAgg+ stage a batch of workflow instructions belongs to."""
    for m in messages:
        cfg = m.content.config_records.get(RECORD_KEY_CONFIGS)
        if cfg is not None and Key.STAGE in cfg:
            return str(cfg[Key.STAGE])
    return "other"


class _LedgerGrid(Grid):
    """``grid`` with every payload of the workflow's stages recorded in ``ledger``."""

    def __init__(
        self,
        grid: Grid,
        ledger: ByteLedger,
        server_round: int,
        label: Callable[[int], str],
    ) -> None:
        self.inner, self.ledger = grid, ledger
        self.server_round, self.label = server_round, label
        self.failed: dict[int, str] = {}
        """Node id to why it left the round (first failure only)."""

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(
            content, message_type, dst_node_id, group_id, ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        batch = list(messages)
        channel = f"secagg.{_stage_of(batch)}"
        for m in batch:
            who = self.label(m.metadata.dst_node_id)
            nbytes = payload_bytes(m.content)
            self.ledger.record(self.server_round, who, "down", nbytes, channel)
        replies = list(self.inner.send_and_receive(batch, timeout=timeout))
        answered = set()
        for r in replies:
            node = r.metadata.src_node_id
            answered.add(node)
            if r.has_content():
                nbytes = payload_bytes(r.content)
                self.ledger.record(
                    self.server_round, self.label(node), "up", nbytes, channel
                )
            else:
                reason = f"{channel}: error {r.error.code}: {r.error.reason}"
                self.failed.setdefault(node, reason)
        for m in batch:
            node = m.metadata.dst_node_id
            if node not in answered:
                self.failed.setdefault(node, f"{channel}: no answer")
        return replies


# -- the round -------------------------------------------------------------------
def _forget_early_dropouts(state: WorkflowState) -> None:
    """Work around Flower 1.42: forget nodes lost before they shared their keys.

    Such a node stays in ``sampled_node_ids`` (the unmask stage would list it
    as dead, and its neighbours, holding no share of its key, fail with a
    ``KeyError``) and in ``nid_to_neighbours`` (the server would remove
    pairwise masks nobody added). It handed out no shares and masked nothing,
    so it leaves the round here, after share_keys.
    """
    live = set(state.active_node_ids)
    state.sampled_node_ids = live
    for node in list(state.nid_to_neighbours):
        state.nid_to_neighbours[node] &= live


def secure_mean_round(
    grid: Grid,
    contents: dict[int, RecordDict],
    server_round: int,
    workflow: SecAggPlusWorkflow,
) -> tuple[np.ndarray, int, dict[int, FitRes]]:
    """One SecAgg+ round over ``contents`` (node id to its instruction content).

    Each content travels, with the workflow's ``secaggplus_configs``, as the
    collect stage's ``train`` message.

    Returns
    -------
    tuple
        ``(mean, total, results)``: the flat float64 weighted mean, the unmasked
        weight slot (``sum_i round(w_i / max_weight * T)``) and each survivor's
        ``FitRes`` (empty parameters; its clear metrics).

    Raises
    ------
    SecureAggregationError
        If the protocol halts (too few live neighbours at some stage).
    """
    base = Context(
        run_id=grid.run.run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={},
    )
    capture = _Capture(grid, sorted(contents))
    ctx = LegacyContext(
        base, ServerConfig(num_rounds=1), capture, SimpleClientManager()
    )
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {"current_round": server_round}
    )
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    state = WorkflowState()
    if not workflow.setup_stage(grid, ctx, state):
        raise SecureAggregationError("SecAgg+ halted at setup")
    # Our instruction instead of the stub's empty fitins.* content.
    state.nid_to_fitins = {n: contents[n] for n in state.nid_to_fitins}
    if not workflow.share_keys_stage(grid, ctx, state):
        raise SecureAggregationError("SecAgg+ halted at share_keys")
    _forget_early_dropouts(state)
    if not workflow.collect_masked_vectors_stage(grid, ctx, state):
        raise SecureAggregationError("SecAgg+ halted at collect_masked_vectors")
    _FACTOR.value = None
    if not workflow.unmask_stage(grid, ctx, state):
        raise SecureAggregationError("SecAgg+ halted at unmask")
    total = getattr(_FACTOR, "value", None)
    if capture.aggregate is None or total is None:
        raise SecureAggregationError("SecAgg+ produced no aggregate")
    flat = np.concatenate(
        [np.asarray(a, np.float64).ravel() for a in capture.aggregate]
    )
    return flat, total, capture.results


def _clear_metrics(res: FitRes) -> dict[str, Any]:
    return {str(k): v for k, v in res.metrics.items()}


def secure_exchange(
    settings: SecAggSettings, weight_of: Callable[[str], int] | None = None
) -> Exchange:
    """The exchange that runs a round under SecAgg+ (see the module docstring).

    Parameters
    ----------
    settings : SecAggSettings
        Shares, threshold, clip, quantization.
    weight_of : Callable[[str], int], optional
        The weight the server dictates for a node's update, by label; None:
        equal weights (1 each).

    Returns
    -------
    Exchange
        It sends each instruction, with a ``secagg`` record naming its
        action, weight and the clip, as the collect stage's ``train``
        message, and returns one reply labelled ``secure-mean`` (content
        :func:`~protocols.messages.encode_secure_mean`), or no reply if the
        protocol halted (logged).
    """

    def exchange(
        grid: Grid,
        messages: list[Message],
        timeout_s: float,
        *,
        server_round: int,
        label: Callable[[int], str],
        ledger: ByteLedger,
    ) -> list[LabelledReply]:
        contents: dict[int, RecordDict] = {}
        weights: dict[int, int] = {}
        for m in messages:
            node = m.metadata.dst_node_id
            action = m.metadata.message_type.partition(".")[2]
            weights[node] = 1 if weight_of is None else int(weight_of(label(node)))
            task = SecAggTask(action=action, weight=weights[node], clip=settings.clip)
            # Each node its own RecordDict (records shared): a driver may send
            # one content to every node, and the workflow adds each node's
            # own SecAgg+ record to it.
            contents[node] = put_secagg(RecordDict(dict(m.content.items())), task)
        if not contents:
            return []
        max_weight = max(weights.values())
        workflow = SecAggPlusWorkflow(
            num_shares=settings.num_shares,
            reconstruction_threshold=settings.threshold,
            max_weight=float(max_weight),
            clipping_range=settings.clip,
            quantization_range=settings.quantization,
            modulus_range=settings.modulus,
            timeout=timeout_s,
        )
        counted = _LedgerGrid(grid, ledger, server_round, label)
        try:
            mean, total, results = secure_mean_round(
                counted, contents, server_round, workflow
            )
        except SecureAggregationError as exc:
            log.error("round %d: %s; no update this round", server_round, exc)
            return []
        survivors = sorted(results, key=label)
        result = SecureMean(
            mean=mean,
            total_weight=total * max_weight / settings.quantization,
            weight_step=max_weight / settings.quantization,
            survivors=tuple(label(n) for n in survivors),
            weights=tuple(weights[n] for n in survivors),
            metrics={label(n): _clear_metrics(results[n]) for n in survivors},
            dropped={
                label(n): counted.failed.get(n, "left out")
                for n in sorted(set(contents) - set(results), key=label)
            },
        )
        reply = Message(
            encode_secure_mean(result),
            dst_node_id=SUPERLINK_NODE_ID,
            message_type=MESSAGE_SECURE_MEAN,
        )
        return [(SECURE_MEAN_LABEL, reply)]

    return exchange
