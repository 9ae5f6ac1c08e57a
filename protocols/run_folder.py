"""The run folder: the one owner of a run's files, their names and formats.

A run is a folder. Every process that touches it (the ServerApp, simulated
clients, the simulation launcher, the server CLI, export) asks a
:class:`RunFolder` for a path or a record instead of spelling a file name::

    config.toml          the resolved configuration
    status.json          running | completed | failed | stopped | resuming
    metrics.jsonl        one JSON object per round (round 0: the initial model)
    metrics.png          the plot
    partitions.json      which groups each simulated client holds
    data/eval.jsonl      the server's held-out examples
    data/client-NNNN.jsonl   one simulated client's examples
    checkpoint/state.json    the last completed round's server state
    checkpoint/<tensors>     its tensors (none for FedKSeed: seeds rebuild it)
    adapter/ or model/   the final artefacts of the method
    simulation.log, superlink.log, server.json   engine and server bookkeeping
    app/                 the two-line Flower app that ``flwr run`` submits
    .flwr-superlink/, .flwr-cli/   Flower homes of the run's processes
    .zo-state/           simulated FedKSeed clients' seed snapshots (scratch)

Every write is atomic (:mod:`protocols.durable`); every read validates what it
parses and raises a :class:`RunFolderError` that names the file, so a damaged
file is never taken at its word. A checkpoint's ``state.json`` is written after
its tensors and names them, so it never points at tensors that are not there.

How a client finds the run folder is one channel per engine: in simulation the
run config key ``run-dir`` (:data:`RUN_DIR_KEY`); a deployed client has no run
folder, its node config names its data file.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from protocols.durable import append_line, atomic_write_bytes, atomic_write_text

__all__ = [
    "RUN_DIR_KEY",
    "ENDED_STATES",
    "RUN_STATES",
    "CheckpointError",
    "MetricsError",
    "MetricsLog",
    "RunFolder",
    "RunFolderError",
    "RunStatus",
    "read_metrics",
]

RUN_DIR_KEY = "run-dir"
"""Run config key that names the run folder (``flwr run --run-config``)."""

RUN_STATES = ("not started", "running", "resuming", "completed", "failed", "stopped")
"""Every state ``status.json`` may record."""

ENDED_STATES = ("completed", "failed", "stopped")

_MAX_JSON_BYTES = 64 * 1024 * 1024  # a status or checkpoint state is kilobytes


class RunFolderError(ValueError):
    """A run folder's file is missing, damaged or of another run; names the file."""


class MetricsError(RunFolderError):
    """``metrics.jsonl`` cannot be interpreted (names the file and line)."""


class CheckpointError(RunFolderError):
    """A run folder has no usable checkpoint, or one of another spec."""


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


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; FileNotFoundError passes through."""
    size = path.stat().st_size
    if size > _MAX_JSON_BYTES:
        raise RunFolderError(f"{path}: {size} bytes, more than a run file can hold")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{path} is damaged: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise RunFolderError(
            f"{path} is damaged: expected a JSON object, got {type(value).__name__}"
        )
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` into a list of per-round dicts, in file order.

    Blank lines are skipped. A final line without its newline that is not
    valid JSON (the writer died mid-write) is ignored with a warning.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist; the message names the path.
    MetricsError
        If a line is not valid JSON, not an object, or lacks an integer
        ``round``; the message names the file and the 1-based line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"metrics file not found: {path}") from None
    lines = text.split("\n")
    # "a\n" splits into ["a", ""]; a last element with text is unterminated.
    unterminated_last = len(lines) - 1 if lines[-1].strip() else None
    rows: list[dict[str, Any]] = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        lineno = index + 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if index == unterminated_last:
                warnings.warn(
                    f"{path}:{lineno}: ignoring truncated final line ({exc.msg})",
                    stacklevel=2,
                )
                break
            raise MetricsError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from exc
        if not isinstance(row, dict):
            raise MetricsError(
                f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
            )
        rnd = row.get("round")
        if not isinstance(rnd, int) or isinstance(rnd, bool):
            raise MetricsError(
                f"{path}:{lineno}: missing or non-integer 'round': {rnd!r}"
            )
        rows.append(row)
    return rows


class MetricsLog:
    """Appends one JSON object per round to ``metrics.jsonl``, durably."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, server_round: int) -> None:
        """Drop rows past ``server_round`` (and torn lines), atomically."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash
            rnd = row.get("round") if isinstance(row, dict) else None
            if isinstance(rnd, int) and rnd <= server_round:
                kept.append(line)
        atomic_write_text(self.path, "".join(f"{k}\n" for k in kept))

    def append(self, row: Mapping[str, Any]) -> None:
        """Append ``row`` as one line and fsync it (NaN/Inf are refused)."""
        append_line(self.path, json.dumps(dict(row), allow_nan=False))


def _safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]
) -> bytes:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save(cpu, metadata=dict(meta))


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
        return self.path / "checkpoint"

    @property
    def checkpoint_state(self) -> Path:
        """``checkpoint/state.json``."""
        return self.checkpoint_dir / "state.json"

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

    # -- records --------------------------------------------------------------
    def read_record(self, path: Path) -> dict[str, Any] | None:
        """A JSON object file of this run (None when it does not exist).

        Raises
        ------
        RunFolderError
            If the file is damaged, too large, or outside the run folder.
        """
        try:
            return _read_json_object(self._inside(path))
        except FileNotFoundError:
            return None

    def write_record(self, path: Path, record: Mapping[str, Any]) -> None:
        """Write a JSON object file of this run atomically."""
        atomic_write_text(self._inside(path), json.dumps(dict(record), indent=1))

    # -- status ---------------------------------------------------------------
    def read_status(self) -> RunStatus:
        """The run's recorded state (``not started`` when there is none).

        Raises
        ------
        RunFolderError
            If ``status.json`` is damaged or records an unknown state.
        """
        try:
            raw = _read_json_object(self.status_file)
        except FileNotFoundError:
            return RunStatus("not started")
        state = raw.pop("state", None)
        if state not in RUN_STATES:
            raise RunFolderError(
                f"{self.status_file} is damaged: state {state!r} is not one of "
                f"{list(RUN_STATES)}"
            )
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

    # -- checkpoint -----------------------------------------------------------
    def checkpoint_round(self) -> int | None:
        """The round of the last checkpoint, or None when there is none.

        Raises
        ------
        CheckpointError
            If ``state.json`` is damaged.
        """
        try:
            state = _read_json_object(self.checkpoint_state)
        except FileNotFoundError:
            return None
        except RunFolderError as exc:
            raise CheckpointError(str(exc)) from None
        return _round_of(state, self.checkpoint_state)

    def write_checkpoint(
        self,
        server_round: int,
        spec_fingerprint: str,
        state: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor] | None = None,
        *,
        filename: str = "adapter.safetensors",
    ) -> Path:
        """Write the round's server state (and its tensors) to ``checkpoint/``.

        The tensors are replaced first, then ``state.json``, which names the
        round, the spec fingerprint and the tensor file (``None`` when the
        method's state needs no tensors, as FedKSeed's seed history).

        Raises
        ------
        CheckpointError
            If ``state`` holds a non-finite number or a reserved key.
        """
        reserved = {"round", "spec_fingerprint", "tensors"} & set(state)
        if reserved:
            raise CheckpointError(f"checkpoint state may not set {sorted(reserved)}")
        if "/" in filename or filename.startswith("."):
            raise CheckpointError(f"bad checkpoint tensor file name {filename!r}")
        folder = self.checkpoint_dir
        if tensors is not None:
            meta = {"round": str(server_round), "spec": spec_fingerprint}
            atomic_write_bytes(folder / filename, _safetensors_bytes(tensors, meta))
        record = {
            "round": server_round,
            "spec_fingerprint": spec_fingerprint,
            "tensors": filename if tensors is not None else None,
            **state,
        }
        try:
            text = json.dumps(record, indent=1, allow_nan=False)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint state is not finite: {exc}") from None
        atomic_write_text(self.checkpoint_state, text)
        return folder

    def checkpoint_record(self) -> dict[str, Any]:
        """The checkpoint's ``state.json`` as written (the round checked).

        Raises
        ------
        CheckpointError
            If there is none or it is damaged.
        """
        path = self.checkpoint_state
        try:
            state = _read_json_object(path)
        except FileNotFoundError:
            raise CheckpointError(
                f"no checkpoint in {self.path} (looked for {path})"
            ) from None
        except RunFolderError as exc:
            raise CheckpointError(str(exc)) from None
        _round_of(state, path)
        return state

    def read_checkpoint(self, spec_fingerprint: str) -> dict[str, Any]:
        """The checkpoint state, checked against the run's spec.

        Raises
        ------
        CheckpointError
            If there is none, it is damaged, or it belongs to another spec.
        """
        path = self.checkpoint_state
        state = self.checkpoint_record()
        if state.get("spec_fingerprint") != spec_fingerprint:
            raise CheckpointError(
                f"{path} was written for spec {state.get('spec_fingerprint')}, this "
                f"run's spec is {spec_fingerprint}: the config changed since the "
                "checkpoint"
            )
        return state

    def read_checkpoint_tensors(
        self, state: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint's ``state`` names, every one finite.

        Raises
        ------
        CheckpointError
            If the state names no tensors, the file is unreadable, or a tensor
            holds NaN/Inf.
        """
        name = state.get("tensors")
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise CheckpointError(
                f"{self.checkpoint_state} names no tensor file (tensors={name!r})"
            )
        path = self.checkpoint_dir / name
        try:
            tensors = load_file(path)
        except (FileNotFoundError, OSError, SafetensorError) as exc:
            raise CheckpointError(
                f"checkpoint tensors unreadable: {path}: {exc}"
            ) from None
        for key, value in tensors.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{path}: tensor {key!r} holds NaN or Inf")
        return tensors

    # -- final artefacts ------------------------------------------------------
    def write_tensors(
        self,
        relative: str,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, str],
    ) -> Path:
        """Write a final artefact as one safetensors file, atomically."""
        path = self.artefact(relative)
        atomic_write_bytes(path, _safetensors_bytes(tensors, meta))
        return path


def _round_of(state: Mapping[str, Any], path: Path) -> int:
    rnd = state.get("round")
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        raise CheckpointError(f"{path} is damaged: 'round' is {rnd!r}")
    return rnd
