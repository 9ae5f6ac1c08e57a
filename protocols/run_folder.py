"""The run folder: the one owner of a run's files, their names and formats.

A run is a folder. Every process that touches it (the ServerApp, simulated
clients, the simulation launcher, the server CLI, export) asks a
:class:`RunFolder` for a path or a record instead of spelling a file name::

    config.toml          the resolved configuration
    status.json          running | completed | failed | stopped | resuming
    metrics.jsonl        one JSON object per round (round 0: the initial model)
    metrics.png          the plot
    partitions.json      which groups each simulated client holds, which are edge
    edge-bundle/         the edge bundle the simulated edge clients train on
    data/eval.jsonl      the server's held-out examples
    data/client-NNNN.jsonl   one simulated client's examples
    checkpoint/state.json    the last completed round's server state
    checkpoint/<tensors>     its tensors (none for FedKSeed: seeds rebuild it)
    checkpoint/manifest.json the sha256 of both and the round, written last
    adapter/ or model/   the final artefacts of the method, each with a manifest
    .lock                the pid of the process that owns the run (flock'ed)
    simulation.log, superlink.log, server.json   engine and server bookkeeping
    app/                 the two-line Flower app that ``flwr run`` submits
    .flwr-superlink/, .flwr-cli/   Flower homes of the run's processes
    .zo-state/           simulated FedKSeed clients' seed snapshots (scratch)
    tracking/            TensorBoard event files and the MLflow store, if tracked

Every write is atomic (:mod:`protocols.durable`); every read validates what it
parses and raises a :class:`RunFolderError` that names the file, so a damaged
file is never taken at its word. A checkpoint is built in a staging folder
(tensors, then ``state.json``, then its manifest of content hashes,
:mod:`protocols.manifest`) and swapped in whole (:mod:`protocols.run_checkpoint`
owns its format); a checkpoint or final artefact whose manifest is missing or
disagrees with its files is refused. JSON files are read through
:mod:`protocols.run_json`.

One process owns a run at a time: :meth:`RunFolder.lock` holds an exclusive
``flock`` on ``.lock`` (which records the owner's pid) for as long as the owner
lives; the kernel drops it when the owner dies, however it dies.

How a client finds the run folder is one channel per engine: in simulation the
run config key ``run-dir`` (:data:`RUN_DIR_KEY`); a deployed client has no run
folder, its node config names its data file.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocols.durable import atomic_write_bytes, atomic_write_text
from protocols.manifest import ManifestError, manifest_path, seal, verify
from protocols.metrics_log import MetricsLog, read_metrics
from protocols.owner_lock import OwnerLockHeld, hold_lock, lock_holder
from protocols.run_checkpoint import Checkpoint, safetensors_bytes
from protocols.run_errors import (
    CheckpointError,
    MetricsError,
    RunFolderError,
    RunFolderLocked,
    one_line,
    wrong_type,
)
from protocols.run_json import read_json_object
from protocols.run_partitions import (
    RANKS_KEY,
    edge_partitions,
    lora_rank,
    partitions_text,
)

if TYPE_CHECKING:  # torch is imported where tensors are read or written:
    import torch  # an edge client reads its run folder without torch

__all__ = [
    "PARTITION_RANKS_KEY",
    "RUN_DIR_KEY",
    "ENDED_STATES",
    "RUN_STATES",
    "CheckpointError",
    "MetricsError",
    "MetricsLog",
    "RunFolder",
    "RunFolderError",
    "RunFolderLocked",
    "RunStatus",
    "read_metrics",
]

RUN_DIR_KEY = "run-dir"
"""Run config key that names the run folder (``flwr run --run-config``)."""

RUN_STATES = ("not started", "running", "resuming", "completed", "failed", "stopped")
"""Every state ``status.json`` may record."""

ENDED_STATES = ("completed", "failed", "stopped")

PARTITION_RANKS_KEY = RANKS_KEY  # partitions.json: partition ranks
# The types of the fields other code reads from status.json.
_STATUS_TYPES: dict[str, tuple[type, ...]] = {
    "error": (str,),
    "reason": (str,),
    "rounds": (int,),
    "rounds_planned": (int,),
}


@dataclass(frozen=True, slots=True)
class RunStatus:
    """What ``status.json`` says about a run.

    Attributes
    ----------
    state : str
        One of :data:`RUN_STATES`.
    fields : dict[str, Any]
        Everything else recorded with it (``error``, ``rounds``, ``reason``...).
    """

    state: str
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        """True when no ServerApp works on the run any more."""
        return self.state in ENDED_STATES

    @property
    def error(self) -> str | None:
        """The recorded error of a failed run, if any."""
        value = self.fields.get("error")
        return None if value is None else str(value)


class RunFolder:
    """The files of one run (see the module docstring for the layout).

    Parameters
    ----------
    path : Path or str
        The run folder; nothing is created until something is written.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def name(self) -> str:
        """The folder's name (the run's name and start time)."""
        return self.path.name

    # -- layout ---------------------------------------------------------------
    @property
    def config(self) -> Path:
        """The resolved configuration (``config.toml``)."""
        return self.path / "config.toml"

    @property
    def status_file(self) -> Path:
        """``status.json`` (read it with :meth:`read_status`)."""
        return self.path / "status.json"

    @property
    def metrics(self) -> Path:
        """``metrics.jsonl``, one row per round."""
        return self.path / "metrics.jsonl"

    @property
    def plot(self) -> Path:
        """The metrics plot."""
        return self.path / "metrics.png"

    @property
    def partitions(self) -> Path:
        """Who holds which groups (simulation)."""
        return self.path / "partitions.json"

    @property
    def data_dir(self) -> Path:
        """Held-out and per-client data."""
        return self.path / "data"

    @property
    def eval_data(self) -> Path:
        """The server's held-out examples."""
        return self.data_dir / "eval.jsonl"

    def client_data(self, partition_id: int) -> Path:
        """The examples of simulated client ``partition_id``."""
        if partition_id < 0:
            raise RunFolderError(f"partition id must be >= 0, got {partition_id}")
        return self.data_dir / f"client-{partition_id:04d}.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        """The last completed round's server state."""
        return self._checkpoint.path

    @property
    def checkpoint_state(self) -> Path:
        """``checkpoint/state.json``."""
        return self._checkpoint.state_file

    @property
    def _checkpoint(self) -> Checkpoint:
        """The checkpoint's files and format (:mod:`protocols.run_checkpoint`)."""
        return Checkpoint(self.path)

    def artefact(self, relative: str) -> Path:
        """A final artefact of the method (``adapter``, ``model/x.safetensors``).

        Raises
        ------
        RunFolderError
            If ``relative`` would leave the run folder.
        """
        return self._inside(self.path / relative)

    def _inside(self, path: Path) -> Path:
        """``path``, refused if it resolves outside the run folder."""
        if not Path(path).resolve().is_relative_to(self.path.resolve()):
            raise RunFolderError(f"{path} leaves the run folder {self.path}")
        return Path(path)

    @property
    def simulation_log(self) -> Path:
        """The simulation engine's log."""
        return self.path / "simulation.log"

    @property
    def superlink_log(self) -> Path:
        """A served run's SuperLink log."""
        return self.path / "superlink.log"

    @property
    def server_log(self) -> Path:
        """A served run's ServerApp log, streamed from Flower (``flwr log``)."""
        return self.path / "server.log"

    @property
    def server_info(self) -> Path:
        """How a served run's SuperLink was started (``server.json``)."""
        return self.path / "server.json"

    @property
    def superlink_home(self) -> Path:
        """FLWR_HOME of the run's SuperLink process."""
        return self.path / ".flwr-superlink"

    @property
    def cli_home(self) -> Path:
        """FLWR_HOME of the ``flwr`` CLI calls that submit and watch the run."""
        return self.path / ".flwr-cli"

    @property
    def app_dir(self) -> Path:
        """The two-line Flower app that ``flwr run`` submits for this run."""
        return self.path / "app"

    @property
    def zo_state(self) -> Path:
        """Simulated FedKSeed clients' snapshots (scratch, removed after a run)."""
        return self.path / ".zo-state"

    @property
    def edge_bundle_dir(self) -> Path:
        """The edge bundle of a simulation with edge clients (:meth:`edge_bundle`)."""
        return self.path / "edge-bundle"

    @property
    def tracking_dir(self) -> Path:
        """``tracking/``: the run's TensorBoard events and MLflow store (``[run] tracking``)."""
        return self.path / "tracking"

    @property
    def lock_file(self) -> Path:
        """``.lock``: flock'ed by the run's owner, holding its pid."""
        return self.path / ".lock"

    # -- ownership ------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[int]:
        """Own the run folder for the ``with`` block; yield the lock's descriptor.

        An owner lock (:mod:`protocols.owner_lock`) on :attr:`lock_file`,
        which records this process's pid: it dies with its owner (SIGKILL
        included), so a resume after a crash finds the folder free. A child
        started with the yielded descriptor in ``pass_fds`` shares the lock
        and keeps it after the owner dies, until the child exits too.

        Raises
        ------
        RunFolderLocked
            If another live process owns the folder (the message names its pid).
        RunFolderError
            If the lock file cannot be opened (no such folder, no permission).
        """
        held = contextlib.ExitStack()
        try:  # only taking the lock: the block's own errors pass through
            fd = held.enter_context(hold_lock(self.lock_file))
        except OwnerLockHeld as exc:
            raise RunFolderLocked(self._in_use(exc.pid)) from None
        except OSError as exc:
            raise RunFolderError(f"cannot lock {self.path}: {one_line(exc)}") from None
        with held:
            yield fd

    def locked_by(self) -> int | None:
        """The pid owning the folder, or None when no live process does.

        Returns 0 when it is owned but the pid is not (yet) readable.

        Raises
        ------
        RunFolderError
            If the lock file exists but cannot be opened.
        """
        try:
            return lock_holder(self.lock_file)
        except OSError as exc:
            raise RunFolderError(
                f"cannot read {self.lock_file}: {one_line(exc)}"
            ) from None

    def _in_use(self, owner: int | None) -> str:
        who = f"pid {owner}" if owner else "another process"
        return (
            f"run folder {self.path} is in use by {who}: one engine per run "
            f"(its lock is {self.lock_file})"
        )

    def check_free(self) -> None:
        """Refuse a run folder another live process owns.

        Raises
        ------
        RunFolderLocked
            If one does (the message names its pid).
        """
        owner = self.locked_by()
        if owner is not None:
            raise RunFolderLocked(self._in_use(owner))

    # -- records --------------------------------------------------------------
    def read_record(self, path: Path) -> dict[str, Any] | None:
        """A JSON object file of this run (None when it does not exist).

        Raises
        ------
        RunFolderError
            If the file is damaged, too large, or outside the run folder.
        """
        try:
            return read_json_object(self._inside(path))
        except FileNotFoundError:
            return None

    def write_record(self, path: Path, record: Mapping[str, Any]) -> None:
        """Write a JSON object file of this run atomically."""
        atomic_write_text(self._inside(path), json.dumps(dict(record), indent=1))

    # -- partitions and edge clients ------------------------------------------
    def write_partitions(
        self, summary: Mapping[str, Any], edge: Sequence[int] = ()
    ) -> None:
        """Write ``partitions.json`` (:func:`protocols.run_partitions.partitions_text`)."""
        atomic_write_text(self.partitions, partitions_text(summary, edge))

    def edge_partitions(self) -> tuple[int, ...]:
        """The partitions ``partitions.json`` lists as edge clients, checked.

        Raises
        ------
        RunFolderError
            If the record is damaged (:func:`protocols.run_partitions.edge_partitions`).
        """
        return edge_partitions(self.read_record(self.partitions), self.partitions)

    def edge_bundle(self, partition_id: int) -> Path | None:
        """The bundle simulated client ``partition_id`` trains on; None: a torch client.

        Raises
        ------
        RunFolderError
            If the partition list is damaged (:meth:`edge_partitions`), or the
            partition is an edge client and the bundle folder is missing or
            resolves outside the run folder (a link planted in it).
        """
        if partition_id < 0:
            raise RunFolderError(f"partition id must be >= 0, got {partition_id}")
        if partition_id not in self.edge_partitions():
            return None
        path = self._inside(self.edge_bundle_dir)
        if not path.is_dir():
            raise RunFolderError(
                f"partition {partition_id} is an edge client but {path} is missing"
            )
        return path

    def lora_rank(self, partition_id: int) -> int | None:
        """A partition's rank in ``partitions.json`` (None: none); RunFolderError if bad."""
        return lora_rank(
            self.read_record(self.partitions), self.partitions, partition_id
        )

    # -- status ---------------------------------------------------------------
    def read_status(self) -> RunStatus:
        """The run's recorded state (``not started`` when there is none).

        Raises
        ------
        RunFolderError
            If ``status.json`` is damaged or records an unknown state.
        """
        try:
            raw = read_json_object(self.status_file)
        except FileNotFoundError:
            return RunStatus("not started")
        state = raw.pop("state", None)
        if state not in RUN_STATES:
            raise RunFolderError(
                f"{self.status_file} is damaged: state {state!r} is not one of "
                f"{', '.join(RUN_STATES)}"
            )
        wrong = wrong_type(raw, _STATUS_TYPES)
        if wrong:
            raise RunFolderError(f"{self.status_file} is damaged: {wrong}")
        return RunStatus(str(state), raw)

    def write_status(self, state: str, **fields: Any) -> None:
        """Record the run's state (one of :data:`RUN_STATES`) with ``fields``."""
        if state not in RUN_STATES:
            raise ValueError(f"unknown run state {state!r}")
        atomic_write_text(
            self.status_file, json.dumps({"state": state, **fields}, indent=1)
        )

    # -- metrics --------------------------------------------------------------
    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows so far (empty when the run has none yet).

        Raises
        ------
        MetricsError
            If the file is damaged (see :func:`read_metrics`).
        """
        if not self.metrics.exists():
            return []
        return read_metrics(self.metrics)

    def metrics_log(self) -> MetricsLog:
        """The writer of ``metrics.jsonl``."""
        return MetricsLog(self.metrics)

    # -- checkpoint (its files and format: protocols.run_checkpoint) ----------
    def checkpoint_round(self) -> int | None:
        """The round of the last checkpoint, or None when there is none.

        Raises
        ------
        CheckpointError
            If ``state.json`` or the manifest is damaged.
        """
        return self._checkpoint.last_round()

    def verify_checkpoint(self) -> int | None:
        """Hash every file of the checkpoint; return its round (None: no checkpoint).

        What ``resume`` calls before starting anything.

        Raises
        ------
        CheckpointError
            If a file is missing, changed, unlisted or damaged (named).
        """
        return self._checkpoint.verify()

    def write_checkpoint(
        self,
        server_round: int,
        spec_fingerprint: str,
        state: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor] | None = None,
        *,
        filename: str = "adapter.safetensors",
        extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> Path:
        """Write the round's server state (and its tensors) as ``checkpoint/``.

        Built beside the old one and swapped in whole, so a crash leaves the
        previous checkpoint or this one, never a mix; ``tensors`` None: the
        method's state needs none, as FedKSeed's seed history;
        ``extra_tensors``: more tensor files by name, e.g. a server
        optimizer's moments (:mod:`protocols.run_checkpoint` has the format).

        Raises
        ------
        CheckpointError
            If ``state`` holds a non-finite number or a reserved key.
        """
        return self._checkpoint.write(
            server_round,
            spec_fingerprint,
            state,
            tensors,
            filename=filename,
            extra_tensors=extra_tensors,
        )

    def checkpoint_record(self) -> dict[str, Any]:
        """The checkpoint's ``state.json`` as written, checked against its manifest.

        Raises
        ------
        CheckpointError
            If there is none, or it is damaged (the message names the file).
        """
        return self._checkpoint.record()

    def read_checkpoint(self, spec_fingerprint: str) -> dict[str, Any]:
        """The checkpoint state, checked against the run's spec.

        Raises
        ------
        CheckpointError
            If there is none, it is damaged, or it belongs to another spec.
        """
        return self._checkpoint.read(spec_fingerprint)

    def read_checkpoint_tensors(
        self, state: Mapping[str, Any], *, file: str | None = None
    ) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint's ``state`` names, verified and finite.

        ``file``: one of the state's ``extra_tensors`` files instead.

        Raises
        ------
        CheckpointError
            If the state names no such tensors, the file differs from the
            manifest or is unreadable, or a tensor holds NaN/Inf.
        """
        return self._checkpoint.tensors(state, file=file)

    # -- final artefacts ------------------------------------------------------
    def write_tensors(
        self,
        relative: str,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, str],
    ) -> Path:
        """Write a final artefact as one safetensors file, then its manifest."""
        path = self.artefact(relative)
        manifest_path(path).unlink(missing_ok=True)  # unsealed while rewritten
        atomic_write_bytes(path, safetensors_bytes(tensors, meta))
        seal(path)
        return path

    def verify_artefact(self, relative: str) -> Path:
        """A final artefact (file or folder), checked against its manifest.

        Raises
        ------
        RunFolderError
            If it leaves the folder, has no valid manifest, or a file of it is
            missing, changed or unlisted (the message names it).
        """
        path = self.artefact(relative)
        try:
            verify(path)
        except ManifestError as exc:
            raise RunFolderError(str(exc)) from None
        return path
