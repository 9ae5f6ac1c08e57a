"""The Pollinate ServerApp: builds the run from its config and drives it.

``server.app:app`` is the ServerApp Flower loads with ``flwr run`` (in
deployment and in simulation alike); it reads the prepared run folder named by
the run-config key ``run-dir``.

The run folder (:class:`~protocols.run_folder.RunFolder`) is the unit of
state; the method's behaviour comes from its server plug-in
(:func:`server.methods.server_method`), so nothing here knows a method.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import psutil
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from corpora import DatasetError, Example, read_jsonl
from protocols import ByteLedger, LoraSpec
from protocols.installation import check_installation
from protocols.run_folder import (
    RUN_DIR_KEY,
    CheckpointError,
    RunFolder,
    RunFolderError,
)
from server.config import RunConfig, load_config
from server.evaluation import pick_device
from server.federation import (
    Exchange,
    RoundDriver,
    discover_nodes,
    node_auth_keys,
    plain_exchange,
    run_rounds,
)
from server.methods import server_method
from strategies import NodeBook
from strategies.robust import Bounds, capped_weights

check_installation()  # Flower puts the app folder first: a models.py there shadows

__all__ = ["app", "build_driver", "run_server"]

log = logging.getLogger(__name__)

FAULT_ENV = "POLLINATE_FAULT_AFTER_ROUND"
HOLD_ENV = "POLLINATE_HOLD_AFTER_ROUND"


def run_server(
    grid: Grid,
    config: RunConfig,
    run_dir: Path | RunFolder,
    *,
    resume: bool = False,
    simulation: bool = False,
) -> None:
    """Run a whole federated job; record the outcome in ``status.json``.

    With ``resume`` the run continues from the last checkpoint in ``run_dir``
    (rounds already recorded are not redone). In a ``simulation`` every node
    exists from the start, so the federation does not wait
    ``federation.join_grace_s`` for late nodes to replace refused ones.

    Fault injection, tests only: ``$POLLINATE_FAULT_AFTER_ROUND`` kills the
    server right after that round is recorded; ``$POLLINATE_HOLD_AFTER_ROUND``
    makes it hang there until something kills it (a server stuck mid-run).

    The run folder is this process's while it runs (:func:`owned`): a second
    ServerApp on it is refused before it writes anything.

    Raises
    ------
    RunFolderLocked
        If another live process owns the run folder.
    Exception
        Whatever stopped the run, after ``status.json`` says ``failed``.
    """
    folder = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
    with owned(folder):
        _run_owned(grid, config, folder, resume=resume, simulation=simulation)


@contextlib.contextmanager
def owned(folder: RunFolder) -> Iterator[None]:
    """Hold ``folder``'s lock for the block, unless an ancestor already holds it.

    In simulation the launcher that started this process's SuperLink owns
    the folder (and its watchdog keeps it locked until this process is gone);
    in deployment nobody does, and the ServerApp's own lock dies with it.

    Raises
    ------
    RunFolderLocked
        If a process that is not an ancestor of this one owns the folder.
    """
    owner = folder.locked_by()
    if owner and owner in {p.pid for p in psutil.Process().parents()}:
        yield
        return
    with folder.lock():
        yield


@runtime_checkable
class _RankedStrategy(Protocol):
    """A strategy whose nodes each train their own LoRA rank (LoRA's).

    ``hello_ranks`` (label to the rank the node trains) is filled in, like
    ``hello_counts``, once the federation has assembled.
    """

    spec: Any
    hello_ranks: dict[str, int]


def _lora_spec(driver: RoundDriver) -> LoraSpec | None:
    """The LoRA spec whose ranks hellos are checked against (None: no LoRA)."""
    strategy = driver.strategy
    if isinstance(strategy, _RankedStrategy) and isinstance(strategy.spec, LoraSpec):
        return strategy.spec
    return None


def _eval_examples(folder: RunFolder) -> list[Example]:
    """The held-out set; a damaged file is a :class:`RunFolderError` naming it."""
    try:
        return read_jsonl(folder.eval_data)
    except (DatasetError, UnicodeDecodeError, OSError) as exc:
        raise RunFolderError(
            f"{folder.eval_data} is damaged: {' '.join(str(exc).split())}"
        ) from None


def _checkpoint_ledger(folder: RunFolder) -> ByteLedger:
    """The byte ledger the checkpoint recorded."""
    try:
        return ByteLedger.from_json(folder.checkpoint_record()["ledger"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"{folder.checkpoint_state} is damaged: bad ledger ({exc!r})"
        ) from None


def _run_owned(
    grid: Grid, config: RunConfig, folder: RunFolder, *, resume: bool, simulation: bool
) -> None:
    """:func:`run_server` once the run folder is this process's."""
    folder.write_status("running", rounds_planned=config.run.rounds)
    driver: RoundDriver | None = None
    done = 0
    fault, hold = os.environ.get(FAULT_ENV), os.environ.get(HOLD_ENV)
    try:
        driver = build_driver(config, _eval_examples(folder), folder.path)
        start, ledger = 0, ByteLedger()
        if resume:
            start = driver.restore(folder)
            ledger = _checkpoint_ledger(folder)
            log.info("resuming %s after round %d", folder.path, start)
        # On resume the hello goes to a scratch ledger: round 0 is already counted.
        hello_ledger = ByteLedger() if resume else ledger
        counts: dict[str, int] = {}
        ranks: dict[str, int] = {}
        lora = _lora_spec(driver)
        labels = discover_nodes(
            grid,
            expected=config.federation.clients,
            # After the timeout, as few as a round can train with will do.
            minimum=max(config.federation.min_clients, config.federation.min_replies),
            timeout_s=config.federation.round_timeout_s,
            late_join_s=0.0 if simulation else config.federation.join_grace_s,
            ledger=hello_ledger,
            auth_keys=node_auth_keys(folder),  # labels are key names then
            counts=counts,
            lora=lora,  # refuses a node whose LoRA rank the spec does not allow
            ranks=ranks,
        )
        # A reply's example count (its weight) is capped by what hello said.
        driver.strategy.hello_counts.update(counts)
        if isinstance(driver.strategy, _RankedStrategy):
            driver.strategy.hello_ranks.update(ranks)  # label -> its LoRA rank
        nodes = NodeBook(
            labels,
            fraction=config.federation.fraction,
            min_nodes=config.federation.min_clients,
            seed=config.run.seed,
        )
        done = run_rounds(
            grid,
            driver,
            nodes,
            rounds=config.run.rounds,
            folder=folder,
            timeout_s=config.federation.round_timeout_s,
            ledger=ledger,
            start_round=start,
            crash_after=int(fault) if fault else None,
            hold_after=int(hold) if hold else None,
            min_replies=config.federation.min_replies,
            exchange=_exchange(config, counts),
            eval_every=config.eval.every,
            tracking=config.run.tracking,
            tracking_uri=config.run.tracking_uri,
        )
    except (KeyboardInterrupt, SystemExit) as exc:
        # Told to stop (``server stop``, Ctrl-C, the SuperLink going away):
        # the checkpoint holds every finished round; ``resume`` continues.
        folder.write_status("stopped", reason=f"{type(exc).__name__}: {exc}")
        raise
    except BaseException as exc:
        folder.write_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if driver is not None:
            driver.close()
    folder.write_status("completed", rounds=done)


def _exchange(config: RunConfig, hello_counts: Mapping[str, int]) -> Exchange:
    """How rounds exchange messages: SecAgg+ with ``privacy.secagg``, else plainly.

    Under SecAgg+ the server never sees a reply's claimed count, so it
    dictates each node's weight: with ``federation.weighting = "examples"``
    the count the node reported at hello, capped as
    :func:`strategies.robust.capped_weights` caps claims (``max_examples``,
    ``weight_multiple`` times the federation's low median count); with
    ``"equal"``, 1. The unmasked total weight is checked against the sum of
    the survivors' dictated weights.
    """
    if not config.privacy.secagg:
        return plain_exchange
    from server.secure_aggregation import SecAggSettings, secure_exchange

    settings = SecAggSettings.from_config(config.privacy)
    if config.federation.weighting == "equal" or not hello_counts:
        return secure_exchange(settings)
    labels = sorted(hello_counts)
    capped = capped_weights(
        [hello_counts[k] for k in labels],
        Bounds.from_config(config.federation, fixed_bound=None),
    )
    dictated = {k: max(1, round(w)) for k, w in zip(labels, capped, strict=True)}
    return secure_exchange(settings, weight_of=lambda label: dictated.get(label, 1))


def build_driver(
    config: RunConfig, eval_examples: list[Example], run_dir: Path | None = None
) -> RoundDriver:
    """The configured method's server side, with its model on the server's device.

    ``run_dir`` is the run folder (its ``server.json`` tells a method's
    services whether the deployment uses TLS).
    """
    method = server_method(config.run.method)
    device = pick_device(config.eval.device)
    driver = method.driver(config, eval_examples, device, run_dir=run_dir)
    log.info("%s", driver.strategy.summary())
    return driver


OUR_LOGGERS = ("server", "strategies", "protocols", "models", "corpora")


def _log_to_flower() -> None:
    """Send Pollinate's INFO lines to the process's log, others' warnings only.

    Only our loggers go to INFO: the root stays at WARNING, so that the HTTP
    client that uploads the log does not log each upload (which it would
    then upload, and log again).
    """
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: the run config names a prepared run folder.

    The process is Flower's (``flwr-simulation`` or ``flwr-serverapp``), so
    this entry point sets up its logging: Flower uploads the process's log to
    the SuperLink, where ``flwr log`` (and the run's ``simulation.log``) reads
    the per-round lines.
    """
    _log_to_flower()
    run_dir = context.run_config.get(RUN_DIR_KEY)
    if not run_dir:
        raise ValueError(
            f"run config key '{RUN_DIR_KEY}' is empty: prepare a run folder with "
            "`pollinate simulate --prepare-only` and pass "
            f"--run-config '{RUN_DIR_KEY}=\"PATH\"'"
        )
    folder = RunFolder(str(run_dir))
    resume = bool(context.run_config.get("resume", False))
    simulation = bool(context.run_config.get("simulation", False))
    config = load_config(folder.config)
    run_server(grid, config, folder, resume=resume, simulation=simulation)
