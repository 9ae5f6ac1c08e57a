"""The server's round loop, the same for every method.

One place owns the order of events:

1. wait until the federation's expected number of nodes is accepted, each
   under its stable label, one node per label, proven by the node's key
   when nodes authenticate (:func:`server.discovery.discover_nodes`, which
   this module re-exports with the rest of node discovery);
2. evaluate the initial model (round 0);
3. per round: the method's driver instructs the sampled nodes, the replies
   are collected, the driver validates and applies them to the global state,
   the model is evaluated centrally, a ``metrics.jsonl`` row is appended and
   a checkpoint written.

Every payload is measured as serialized into the :class:`~protocols.ByteLedger`.
A method plugs in through the :class:`RoundDriver` protocol.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from flwr.app import Message
from flwr.serverapp import Grid

from protocols import ByteLedger, payload_bytes
from protocols.run_folder import RunFolder
from server.discovery import (
    FederationError,
    check_hello_identity,
    discover_nodes,
    node_auth_keys,
)
from server.evaluation import EvalResult
from server.tracking import RunTracker, TrackerName, open_tracker
from strategies import Aggregate, LabelledReply, NodeBook, Nodes, Strategy
from strategies.privacy import PrivacyBudgetExhausted
from strategies.sampling import SamplingError

__all__ = [
    "Exchange",
    "FederationError",
    "RoundDriver",
    "RoundResult",
    "check_hello_identity",
    "discover_nodes",
    "node_auth_keys",
    "plain_exchange",
    "require_update",
    "run_rounds",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class RoundResult:
    """What a driver reports after applying one round."""

    clients: int
    rejected: int
    train_loss: float | None
    extra: dict[str, Any] = field(default_factory=dict)
    side_bytes: dict[str, tuple[int, int]] = field(default_factory=dict)


class RoundDriver(Protocol):
    """A method's server side: instruct, aggregate-and-apply, evaluate, save.

    The driver holds the global state and its method's strategy; the round
    loop owns the nodes (a :class:`~strategies.NodeBook`), the clock, the
    ledger and the run folder, and hands the driver the round's sampled nodes
    and their labelled replies.
    """

    method: str
    strategy: Strategy[Any, Any]

    def configure(self, server_round: int, nodes: Nodes) -> list[Message]:
        """Build the round's instructions for ``nodes``."""

    def apply(self, server_round: int, replies: Sequence[LabelledReply]) -> RoundResult:
        """Validate replies and update the global state.

        Raises FederationError when no reply is usable (the state is kept).
        """

    def evaluate(self) -> EvalResult:
        """Central evaluation of the current global model."""

    def checkpoint(
        self, folder: RunFolder, server_round: int, extra: dict[str, Any]
    ) -> None:
        """Persist everything needed to continue after ``server_round``."""

    def finish(self, folder: RunFolder) -> None:
        """Write the final artefacts (adapter, model)."""

    def close(self) -> None:
        """Release what the driver started (services), finished or not."""

    def restore(self, folder: RunFolder) -> int:
        """Load the last checkpoint of ``folder``; return its round."""


def require_update(server_round: int, result: Aggregate, new_state: T | None) -> T:
    """The round's new global state, or an error if no reply was usable.

    Raises
    ------
    FederationError
        If ``new_state`` is None: no reply survived validation (the caller
        keeps its previous state).
    """
    if new_state is None:
        total = len(result.accepted) + len(result.rejected)
        raise FederationError(
            f"round {server_round}: no usable update ({total} replies; "
            f"rejected: {result.rejected})"
        )
    return new_state


def _json_safe(value: Any, where: str, fixed: list[str]) -> Any:
    """``value`` with every non-finite float made None and every non-JSON value a string.

    ``fixed`` collects the dotted paths of what was changed.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isfinite(number):
            return number
        fixed.append(f"{where}={number!r}")
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v, f"{where}.{k}", fixed) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, f"{where}[{i}]", fixed) for i, v in enumerate(value)]
    fixed.append(f"{where}={type(value).__name__}")
    return str(value)


def _evaluates(server_round: int, rounds: int, every: int) -> bool:
    """Whether ``server_round`` is evaluated: round 0, multiples of ``every``, the last."""
    return server_round == 0 or server_round % every == 0 or server_round == rounds


def _budget_ends_after(driver: RoundDriver, nodes: NodeBook, server_round: int) -> bool:
    """Whether the privacy budget will refuse round ``server_round + 1``.

    Then ``server_round`` is the run's last and is evaluated whatever
    ``eval.every`` says, so an early stop still reports its final model. The
    next round's size is taken from today's nodes (deployed nodes may still
    change it; the loop's own check before configuring is what refuses).
    """
    try:
        sampled = len(nodes.sample(server_round + 1))
    except SamplingError:
        return False  # too few nodes now: the next round's configure decides
    return not driver.strategy.budget_allows(sampled)


def _row(
    server_round: int,
    result: RoundResult,
    ev: EvalResult | None,
    ledger: ByteLedger,
    seconds: float,
    method: str,
    eval_seconds: float | None,
) -> dict[str, Any]:
    """The round's ``metrics.jsonl`` row, always JSON-able (strict, no NaN).

    ``ev`` is None on a round not evaluated (``eval.every``): every ``eval_*``
    field is then null. ``eval_metric_low``/``eval_metric_high`` are the
    metric's bootstrap 95% interval, ``eval_examples`` the held-out examples
    scored and ``eval_s`` the seconds the evaluation took (``eval_seconds``,
    measured around the driver's evaluate, so a driver's own work counts).

    Sanitized rather than validated: the row records what happened, and a
    value JSON cannot hold (an evaluation that diverged to NaN, an infinite
    loss a driver computed) must neither kill the run nor lose the row, whose
    checkpoint holds a copy. Such a value becomes ``null`` and is logged;
    replies' metrics never get here unchecked (decoders refuse non-finite or
    out-of-bound ones).
    """
    up, down = ledger.round_totals(server_round)
    row = {
        "round": server_round,
        "clients": result.clients,
        "train_loss": result.train_loss,
        "eval_loss": None if ev is None else ev.loss,
        "eval_metric": None if ev is None else ev.metric,
        "eval_metric_name": None if ev is None else ev.metric_name,
        "eval_metric_low": None if ev is None else ev.metric_low,
        "eval_metric_high": None if ev is None else ev.metric_high,
        "eval_examples": None if ev is None else ev.num_examples,
        "eval_s": None if ev is None else eval_seconds,
        "bytes_up": up,
        "bytes_down": down,
        "seconds": seconds,
        "rejected": result.rejected,
        "method": method,
        **result.extra,
    }
    fixed: list[str] = []
    safe: dict[str, Any] = _json_safe(row, "row", fixed)
    if fixed:
        log.warning(
            "round %d: metrics not JSON-able, recorded as null/text: %s",
            server_round,
            ", ".join(fixed),
        )
    return safe


class Exchange(Protocol):
    """How a round's instructions become labelled replies (and ledger entries).

    :func:`plain_exchange` by default; :func:`server.secure_aggregation.secure_exchange`
    with ``privacy.secagg``.
    """

    def __call__(
        self,
        grid: Grid,
        messages: list[Message],
        timeout_s: float,
        *,
        server_round: int,
        label: Callable[[int], str],
        ledger: ByteLedger,
    ) -> list[LabelledReply]:
        """Send ``messages``; return the replies labelled by ``label`` (node id)."""
        ...


def plain_exchange(
    grid: Grid,
    messages: list[Message],
    timeout_s: float,
    *,
    server_round: int,
    label: Callable[[int], str],
    ledger: ByteLedger,
) -> list[LabelledReply]:
    """One send-and-receive: each reply labelled, every payload in the ledger."""
    for m in messages:
        who = label(m.metadata.dst_node_id)
        ledger.record(server_round, who, "down", payload_bytes(m.content))
    replies = [
        (label(r.metadata.src_node_id), r)
        for r in grid.send_and_receive(messages, timeout=timeout_s)
    ]
    for who, r in replies:
        if r.has_content():
            ledger.record(server_round, who, "up", payload_bytes(r.content))
    return replies


def run_rounds(
    grid: Grid,
    driver: RoundDriver,
    nodes: NodeBook,
    *,
    rounds: int,
    folder: RunFolder,
    timeout_s: float,
    ledger: ByteLedger,
    start_round: int = 0,
    crash_after: int | None = None,
    hold_after: int | None = None,
    min_replies: int = 1,
    exchange: Exchange = plain_exchange,
    eval_every: int = 1,
    tracking: Sequence[TrackerName] = (),
    tracking_uri: str | None = None,
) -> int:
    """Run rounds ``start_round + 1 .. rounds`` of ``driver``'s method; the last round done.

    ``nodes`` knows the federation's nodes and samples each round's.

    A fresh run (``start_round == 0``) first records round 0, the initial
    model. Each round's checkpoint is written before its ``metrics.jsonl``
    row, both from one row that :func:`_row` made JSON-able, so after a crash every recorded row has a checkpoint at or past it;
    a resumed run drops rows past its checkpoint and redoes them.
    ``crash_after`` (fault injection for tests) kills the process like a
    SIGKILL right after that round is recorded; ``hold_after`` makes it hang
    there instead, until something kills it. ``exchange`` sends a round's
    instructions and returns the labelled replies, recording every payload
    in ``ledger`` (:func:`plain_exchange`; SecAgg+ runs pass
    :func:`server.secure_aggregation.secure_exchange`).
    ``eval_every`` (``eval.every``) evaluates round 0, the rounds that are its
    multiples and round ``rounds``; the others' rows have null ``eval_*``.

    A run with a privacy budget (``privacy.target_epsilon``) ends early, as a
    completed run with its final artefacts, when the driver refuses to
    configure a round that would spend past it
    (:class:`~strategies.privacy.PrivacyBudgetExhausted`); the return value
    says how many rounds were done.

    ``tracking`` (``run.tracking``) names the trackers that also log every
    row, as it is recorded (:mod:`server.tracking`), MLflow into
    ``tracking_uri`` (``run.tracking_uri``) if given; they are closed when the
    rounds end, however they end.

    Raises
    ------
    FederationError
        If a round has no usable update.
    TrackingError
        If a tracker cannot be opened (before any round).
    """
    tracker = open_tracker(
        folder,
        tracking,
        start_round=start_round,
        method=driver.method,
        mlflow_store=tracking_uri,
    )
    try:
        done = _play_rounds(
            grid,
            driver,
            nodes,
            rounds=rounds,
            folder=folder,
            timeout_s=timeout_s,
            ledger=ledger,
            start_round=start_round,
            crash_after=crash_after,
            hold_after=hold_after,
            min_replies=min_replies,
            exchange=exchange,
            eval_every=eval_every,
            tracker=tracker,
        )
    except (KeyboardInterrupt, SystemExit):
        tracker.close("KILLED")
        raise
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close("FINISHED")
    return done


def _play_rounds(
    grid: Grid,
    driver: RoundDriver,
    nodes: NodeBook,
    *,
    rounds: int,
    folder: RunFolder,
    timeout_s: float,
    ledger: ByteLedger,
    start_round: int,
    crash_after: int | None,
    hold_after: int | None,
    min_replies: int,
    exchange: Exchange,
    eval_every: int,
    tracker: RunTracker,
) -> int:
    """:func:`run_rounds` with its trackers open."""
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    metrics = folder.metrics_log()
    if start_round == 0:
        metrics.truncate_after(-1)
        t0 = time.monotonic()
        first = driver.evaluate()
        spent = time.monotonic() - t0
        row0 = _row(
            0, RoundResult(0, 0, None), first, ledger, spent, driver.method, spent
        )
        metrics.append(row0)
        tracker.log_row(row0)
    else:
        metrics.truncate_after(start_round)
    done = start_round
    for server_round in range(start_round + 1, rounds + 1):
        t0 = time.monotonic()
        try:
            messages = driver.configure(server_round, nodes.sample(server_round))
        except PrivacyBudgetExhausted as exc:
            log.warning("stopping before round %d: %s", server_round, exc)
            break
        replies = exchange(
            grid,
            messages,
            timeout_s,
            server_round=server_round,
            label=nodes.label,
            ledger=ledger,
        )
        result = driver.apply(server_round, replies)
        if result.clients < min_replies:
            raise FederationError(
                f"round {server_round}: {result.clients} usable replies of "
                f"{len(messages)} sampled clients, the run needs at least {min_replies} "
                "(federation.min_replies); the last checkpoint is round "
                f"{server_round - 1}: resume when clients are back"
            )
        for who, (up, down) in sorted(result.side_bytes.items()):
            ledger.record(server_round, who, "up", up, channel="side")
            ledger.record(server_round, who, "down", down, channel="side")
        ev, eval_s = None, None
        if _evaluates(server_round, rounds, eval_every) or _budget_ends_after(
            driver, nodes, server_round
        ):
            t_eval = time.monotonic()
            ev = driver.evaluate()
            eval_s = time.monotonic() - t_eval
        row = _row(
            server_round,
            result,
            ev,
            ledger,
            time.monotonic() - t0,
            driver.method,
            eval_s,
        )
        driver.checkpoint(
            folder, server_round, {"metrics": row, "ledger": ledger.to_json()}
        )
        metrics.append(row)
        tracker.log_row(row)
        log.info("round %d/%d: %s", server_round, rounds, row)
        if crash_after == server_round:
            log.error(
                "fault injection: killing the server after round %d", server_round
            )
            os._exit(137)
        if hold_after == server_round:
            log.error(
                "fault injection: holding the server after round %d", server_round
            )
            threading.Event().wait()  # until the process is killed
        done = server_round
    driver.finish(folder)
    return done
