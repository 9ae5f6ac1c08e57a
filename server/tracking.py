"""Experiment tracking: a run's ``metrics.jsonl`` rows mirrored to TensorBoard and MLflow.

``[run] tracking = ["tensorboard", "mlflow"]`` makes the round loop
(:func:`server.federation.run_rounds`) log every row it records, through each
tracker's own library, offline, into the run folder's ``tracking/``::

    tracking/tensorboard/        TensorBoard event files (``tensorboard --logdir``)
    tracking/mlflow.db           MLflow's SQLite tracking store
    tracking/mlflow-artifacts/   the MLflow experiment's artifact root (unused yet)
    tracking/state.json          the MLflow run id and the last round logged

MLflow 3 refuses its file store (``./mlruns``) unless
``MLFLOW_ALLOW_FILE_STORE`` is set, and documents a SQLite URI for local use,
so the store is ``sqlite:///<run>/tracking/mlflow.db`` (:func:`mlflow_uri`).
``[run] tracking_uri`` names one store for many runs instead, so that one
MLflow UI compares them: another SQLite file (``sqlite:////abs/runs.db``,
artifacts beside it) or an MLflow server (``http(s)://host:port``, which
places artifacts itself); each run is an MLflow run named as its folder in the
``pollinate`` experiment, and ``state.json`` still lives in the run folder.

What becomes a metric (:func:`row_scalars`): every finite number of a row,
at step = round, one level of nested tables flattened with ``/``
(``ranks/n1``); null (a round not evaluated), NaN, text and lists are skipped.
The resolved configuration is logged once per tracker run as parameters.

``metrics.jsonl`` stays the record; the trackers follow it. A resumed run
continues the same TensorBoard run (``purge_step``: events past the last
round logged are hidden) and the same MLflow run (its id in ``state.json``),
and first logs the rows ``metrics.jsonl`` holds that the trackers lack. A
damaged or unknown ``state.json`` is not fatal: a warning, a new MLflow run,
and both trackers rebuilt from ``metrics.jsonl``. A tracker that fails while
logging is dropped with a warning; the run goes on, and a resume fills it in.

The libraries are imported only when a tracker is opened: ``pip install
'pollinate[tracking]'`` (``tensorboard``, ``mlflow-skinny``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import numbers
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

from protocols.durable import atomic_write_text
from protocols.run_errors import RunFolderError
from protocols.run_folder import RunFolder, read_metrics
from protocols.run_json import read_json_object

__all__ = [
    "TRACKERS",
    "TRACKING_EXTRA",
    "RunTracker",
    "TrackerName",
    "TrackingError",
    "mlflow_uri",
    "open_tracker",
    "row_scalars",
    "tracker_problem",
    "tracking_uri_problem",
]

log = logging.getLogger(__name__)

TrackerName = Literal["tensorboard", "mlflow"]
TRACKERS: tuple[str, ...] = get_args(TrackerName)
TRACKING_EXTRA = "pip install 'pollinate[tracking]'"
"""How to install every tracker's library."""

# The module find_spec looks for: the tracker's library (torch's SummaryWriter
# needs the tensorboard package, which also holds the reader).
_LIBRARY = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
_EXPERIMENT = "pollinate"
_STATE_VERSION = 1
_PARAM_CHARS = 500  # MLflow bounds a parameter value (6,000 chars); stay well inside
_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")  # MLflow's metric-name alphabet


class TrackingError(RuntimeError):
    """A tracker that cannot be opened (its library missing, its store unusable)."""


def tracker_problem(names: Sequence[str]) -> str | None:
    """What is wrong with a ``run.tracking`` list, in one line, or None.

    Unknown or repeated names, and trackers whose library is not installed.
    """
    unknown = [n for n in names if n not in _LIBRARY]
    if unknown:
        return f"unknown tracker(s) {unknown} (choose from {', '.join(TRACKERS)})"
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        return f"lists {', '.join(repeated)} more than once"
    missing = [n for n in names if importlib.util.find_spec(_LIBRARY[n]) is None]
    if missing:
        libraries = ", ".join(_LIBRARY[n] for n in missing)
        return f"{', '.join(missing)} needs {libraries}: {TRACKING_EXTRA}"
    return None


_SQLITE = "sqlite:///"
_SERVERS = ("http://", "https://")


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other scheme."""
    return Path(uri[len(_SQLITE) :]) if uri.startswith(_SQLITE) else None


def tracking_uri_problem(uri: str) -> str | None:
    """What is wrong with a ``run.tracking_uri``, in one line, or None.

    Accepted: ``sqlite:///`` + an absolute path to a ``.db`` file whose folder
    exists, or ``http(s)://`` + a host (an MLflow tracking server).
    """
    path = _sqlite_file(uri)
    if path is not None:
        if not path.is_absolute() or path.suffix != ".db":
            return f"a SQLite store must be sqlite:////absolute/path.db, got {uri!r}"
        if not path.parent.is_dir():
            return f"the folder of {path} does not exist"
        return None
    scheme = next((s for s in _SERVERS if uri.startswith(s)), None)
    if scheme is None or not uri[len(scheme) :].split("/")[0]:
        return (
            "must be sqlite:////absolute/path.db or http(s)://host[:port] "
            f"(an MLflow server), got {uri!r}"
        )
    return None


def mlflow_uri(folder: RunFolder, store: str | None = None) -> str:
    """The MLflow tracking URI of a run's MLflow store.

    ``store`` (``run.tracking_uri``) if given, else the run folder's own SQLite
    store, ``sqlite:////abs/<run>/tracking/mlflow.db``.
    """
    if store is not None:
        return store
    return _SQLITE + str((folder.tracking_dir / "mlflow.db").resolve())


def _artifact_root(folder: RunFolder, store: str | None) -> str | None:
    """Where the ``pollinate`` experiment's artifacts go (None: the server's choice).

    Beside the database: the run folder's own store, or a shared SQLite file.
    """
    database = (
        folder.tracking_dir / "mlflow.db" if store is None else _sqlite_file(store)
    )
    if database is None:
        return None
    return (database.resolve().parent / "mlflow-artifacts").as_uri()


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def row_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics row's finite numbers by metric name (``round`` is the step).

    A nested table contributes ``key/sub`` for each finite number in it; None,
    NaN, infinities, booleans, text and lists are skipped. Characters MLflow
    refuses in a metric name become ``_``.
    """
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "round":
            continue
        items = (
            [(f"{key}/{sub}", v) for sub, v in value.items()]
            if isinstance(value, Mapping)
            else [(str(key), value)]
        )
        for name, item in items:
            number = _finite(item)
            if number is not None:
                out[_BAD_KEY_CHARS.sub("_", name)] = number
    return out


def _config_params(folder: RunFolder, method: str) -> dict[str, str]:
    """The resolved configuration as flat ``section.field`` strings."""
    if not folder.config.exists():  # a bare loop (tests): only what it knows
        return {"run.method": method}
    from server.config import load_config  # config imports this module

    tree = load_config(folder.config).model_dump(mode="json")
    tree["run"].pop("tracking_uri", None)  # may hold a server's credentials
    return {
        f"{section}.{key}": (v if isinstance(v, str) else json.dumps(v))[:_PARAM_CHARS]
        for section, table in tree.items()
        for key, v in table.items()
    }


@dataclass(frozen=True)
class _State:
    """``state.json``: the MLflow run and the last round every tracker holds."""

    mlflow_run_id: str | None
    logged_through: int

    def write(self, path: Path) -> None:
        record = {
            "version": _STATE_VERSION,
            "mlflow_run_id": self.mlflow_run_id,
            "logged_through": self.logged_through,
        }
        atomic_write_text(path, json.dumps(record) + "\n")

    @classmethod
    def read(cls, path: Path) -> _State | None:
        """The state, or None (with a warning if the file is damaged)."""
        try:
            record = read_json_object(path)
        except FileNotFoundError:
            return None
        except (RunFolderError, OSError) as exc:
            log.warning("%s; starting a new MLflow run", " ".join(str(exc).split()))
            return None
        run_id, through = record.get("mlflow_run_id"), record.get("logged_through")
        if (
            record.get("version") != _STATE_VERSION
            or not (
                run_id is None
                or (isinstance(run_id, str) and _RUN_ID.fullmatch(run_id))
            )
            or isinstance(through, bool)
            or not isinstance(through, int)
            or through < -1
        ):
            log.warning("%s is damaged; starting a new MLflow run", path)
            return None
        return cls(run_id, through)


class _Backend(Protocol):
    name: str

    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self, status: str) -> None: ...


class _TensorBoard:
    """A :class:`torch.utils.tensorboard.SummaryWriter` on ``tracking/tensorboard``."""

    name = "tensorboard"

    def __init__(self, path: Path, purge_step: int, params: Mapping[str, str] | None):
        from torch.utils.tensorboard import SummaryWriter

        # Events at or past purge_step from an earlier process are hidden by
        # TensorBoard's reader: rounds that are logged again are not doubled.
        self.writer = SummaryWriter(log_dir=str(path), purge_step=purge_step)
        if params is not None:
            table = "\n".join(f"| {k} | {v} |" for k, v in sorted(params.items()))
            self.writer.add_text(
                "config", f"| setting | value |\n|---|---|\n{table}", 0
            )

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed server loses nothing it logged

    def close(self, status: str) -> None:
        self.writer.close()


class _MLflow:
    """One MLflow run in the run folder's SQLite store, through ``MlflowClient``."""

    name = "mlflow"

    def __init__(
        self, folder: RunFolder, run_id: str | None, method: str, store: str | None
    ) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline
        from mlflow.tracking import MlflowClient

        self.uri = mlflow_uri(folder, store)
        self.store = store
        self.client = MlflowClient(self.uri)
        resumed = self._continue(run_id) if run_id is not None else None
        self.resumed = resumed is not None
        self.run_id: str = resumed or self._start(folder, method)

    def _continue(self, run_id: str) -> str | None:
        """``run_id`` marked running again, or None if the store lacks it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException as exc:
            log.warning(
                "MLflow run %s is not in %s (%s); starting a new MLflow run",
                run_id,
                self.uri,
                " ".join(str(exc).split())[:200],
            )
            return None
        return run_id

    def _start(self, folder: RunFolder, method: str) -> str:
        """A new run (named as the run folder) in the ``pollinate`` experiment."""
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(_EXPERIMENT)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = self.client.create_experiment(
                    _EXPERIMENT,
                    artifact_location=_artifact_root(folder, self.store),
                )
            except MlflowException:  # another run sharing the store made it first
                experiment = self.client.get_experiment_by_name(_EXPERIMENT)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        tags = {"pollinate.run_dir": str(folder.path), "pollinate.method": method}
        run = self.client.create_run(experiment_id, tags=tags, run_name=folder.name)
        return str(run.info.run_id)

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _PARAMS_PER_BATCH])

    def steps(self) -> set[int]:
        """The rounds this run holds (``seconds`` is in every row)."""
        return {m.step for m in self.client.get_metric_history(self.run_id, "seconds")}

    def log(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class RunTracker:
    """The open trackers of one run: :meth:`log_row` each row, then :meth:`close`."""

    def __init__(
        self, backends: Sequence[_Backend], state: Path | None, run_id: str | None
    ) -> None:
        self.backends = list(backends)
        self._state = state  # state.json, None: nothing to record
        self._run_id = run_id
        self._healthy = True  # every tracker holds every row logged so far

    def log_row(self, row: Mapping[str, Any]) -> None:
        """Log ``row``'s :func:`row_scalars` at step ``row["round"]`` to every tracker.

        A tracker that fails is dropped with a warning (the run goes on).
        """
        self._log(row, skip=None)

    def _log(self, row: Mapping[str, Any], skip: _Backend | None) -> None:
        """:meth:`log_row`, except to ``skip`` (which holds the row already)."""
        if not self.backends:
            return
        step, values = int(row["round"]), row_scalars(row)
        for backend in list(self.backends):
            if backend is skip:
                continue
            try:
                backend.log(step, values)
            except Exception as exc:  # a tracker never stops the run
                log.warning(
                    "%s tracking failed at round %d and stops for this process "
                    "(resume fills it in): %s",
                    backend.name,
                    step,
                    " ".join(str(exc).split())[:300],
                )
                self.backends.remove(backend)
                self._healthy = False
        if self._healthy and self._state is not None:
            _State(self._run_id, step).write(self._state)

    def close(
        self, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED"
    ) -> None:
        """Close every tracker; MLflow records ``status`` as the run's."""
        for backend in self.backends:
            try:
                backend.close(status)
            except Exception as exc:
                log.warning("closing %s tracking failed: %s", backend.name, exc)
        self.backends = []


def open_tracker(
    folder: RunFolder,
    names: Iterable[str],
    *,
    start_round: int,
    method: str,
    mlflow_store: str | None = None,
) -> RunTracker:
    """Open ``names``' trackers for a run that continues after ``start_round``.

    A fresh run (``start_round == 0``) starts new tracker runs; a resumed one
    continues them and first logs the rows of ``metrics.jsonl`` (rounds up to
    ``start_round``) they lack. No names: a tracker that logs nothing.
    ``mlflow_store`` (``run.tracking_uri``) is a store shared by many runs;
    None: the run folder's own.

    Raises
    ------
    TrackingError
        If a tracker's library is missing or its store cannot be opened.
    """
    names = list(names)
    if not names:
        return RunTracker([], None, None)
    problem = tracker_problem(names)
    if problem is not None:
        raise TrackingError(f"run.tracking {names}: {problem}")
    root = folder.tracking_dir
    root.mkdir(parents=True, exist_ok=True)
    state = _State.read(root / "state.json") if start_round > 0 else None
    through = min(state.logged_through, start_round) if state else -1
    params = _config_params(folder, method)
    backends: list[_Backend] = []
    run_id: str | None = None
    try:
        if "mlflow" in names:
            mlflow = _MLflow(
                folder, state.mlflow_run_id if state else None, method, mlflow_store
            )
            if not mlflow.resumed:
                through = -1  # a new MLflow run: rebuild both from metrics.jsonl
                mlflow.log_params(params)
            run_id = mlflow.run_id
            backends.append(mlflow)
        if "tensorboard" in names:
            fresh = through < 0
            backends.insert(
                0,
                _TensorBoard(
                    root / "tensorboard", through + 1, params if fresh else None
                ),
            )
    except Exception as exc:
        for backend in backends:
            backend.close("FAILED")
        raise TrackingError(
            f"cannot open tracking in {root}: {' '.join(str(exc).split())[:300]}"
        ) from None
    _State(run_id, through).write(root / "state.json")  # the MLflow run, at once
    tracker = RunTracker(backends, root / "state.json", run_id)
    _backfill(tracker, folder, through, start_round)
    return tracker


def _backfill(
    tracker: RunTracker, folder: RunFolder, through: int, start_round: int
) -> None:
    """Log the recorded rows after ``through`` up to ``start_round`` (a resume's gap)."""
    if start_round <= 0 or through >= start_round or not folder.metrics.exists():
        return
    mlflow = next((b for b in tracker.backends if isinstance(b, _MLflow)), None)
    # A round MLflow already holds (it logged, then the state write was lost):
    # not logged there twice. TensorBoard's purge_step hides its copy instead.
    held = mlflow.steps() if mlflow is not None and mlflow.resumed else set()
    for row in read_metrics(folder.metrics):
        if through < row["round"] <= start_round:
            tracker._log(row, skip=mlflow if row["round"] in held else None)
