"""Experiment tracking round-trips: what a run logs, each tracker's own reader reads.

TensorBoard is read back with ``EventAccumulator`` (values are float32 there),
MLflow with ``MlflowClient.get_metric_history`` on the run folder's SQLite
store. The trackers follow ``metrics.jsonl``: one entry per round and metric,
across resumes, with null and non-finite values skipped.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import server.tracking as tracking
from protocols.run_folder import RunFolder
from server.config import ConfigError, load_config
from server.tracking import (
    TrackingError,
    mlflow_uri,
    open_tracker,
    row_scalars,
)
from tests.lora_runs import lora_config, run

BOTH = ("tensorboard", "mlflow")


def _row(r: int, loss: float | None, **extra: Any) -> dict[str, Any]:
    return {
        "round": r,
        "clients": 2,
        "eval_loss": loss,
        "eval_metric_name": "rouge_l",
        "bytes_up": 1000 * r,
        "seconds": 0.5 + r,
        "method": "lora",
        **extra,
    }


def _tensorboard(folder: RunFolder, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(
        str(folder.tracking_dir / "tensorboard"), size_guidance={"scalars": 0}
    )
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _mlflow_runs(folder: RunFolder) -> list[str]:
    client = MlflowClient(mlflow_uri(folder))
    experiment = client.get_experiment_by_name("pollinate")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    return [r.info.run_id for r in runs]


def _mlflow(folder: RunFolder, tag: str, run_id: str | None = None) -> list:
    (only,) = [run_id] if run_id else _mlflow_runs(folder)
    history = MlflowClient(mlflow_uri(folder)).get_metric_history(only, tag)
    return sorted((m.step, m.value) for m in history)


def _f32(value: float) -> float:
    return float(np.float32(value))


def _log_rows(folder: RunFolder, rows: list[dict], start_round: int = 0) -> None:
    """Record ``rows`` in metrics.jsonl and log them, as the round loop does."""
    metrics = folder.metrics_log()
    metrics.truncate_after(start_round if start_round else -1)
    tracker = open_tracker(folder, BOTH, start_round=start_round, method="lora")
    for row in rows:
        finite = {  # metrics.jsonl holds NaN as null (federation._row)
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in row.items()
        }
        metrics.append(finite)
        tracker.log_row(row)
    tracker.close()


def test_row_scalars_keep_finite_numbers_and_flatten_one_level() -> None:
    """Breaks if null, NaN, infinities, booleans, text or lists became metrics,
    if ``round`` (the step) were logged as a metric, or a nested table were
    dropped instead of flattened with '/' (a bad name character made '_')."""
    row = {
        "round": 3,
        "train_loss": 1.5,
        "eval_loss": None,
        "eval_metric": float("nan"),
        "clip_bound": float("inf"),
        "clients": 4,
        "secagg": True,
        "method": "lora",
        "aggregator_used": ["n1", "n2"],
        "ranks": {"n1": 4, "n:2": 8, "gone": None},
        "epsilon": 2.5,
    }
    assert row_scalars(row) == {
        "train_loss": 1.5,
        "clients": 4.0,
        "ranks/n1": 4.0,
        "ranks/n_2": 8.0,
        "epsilon": 2.5,
    }


def test_config_takes_trackers_and_refuses_repeats_and_unknown_names() -> None:
    """Breaks if ``run.tracking`` is not an empty list by default, takes a
    repeated or unknown tracker, or does not survive config.toml."""
    assert load_config(None).run.tracking == ()
    both = load_config(None, {"run.tracking": ["tensorboard", "mlflow"]})
    assert both.run.tracking == BOTH
    with pytest.raises(ConfigError, match="run.tracking: lists mlflow more than once"):
        load_config(None, {"run.tracking": ["mlflow", "mlflow"]})
    with pytest.raises(ConfigError, match="run.tracking.0"):
        load_config(None, {"run.tracking": ["wandb"]})


def test_a_missing_library_is_one_line_naming_the_extra(monkeypatch) -> None:
    """Breaks if selecting a tracker whose library is absent passes config
    validation or opening, or if the error does not say what to install."""
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlflow" else real(name, *a),
    )
    with pytest.raises(ConfigError) as info:
        load_config(None, {"run.tracking": ["tensorboard", "mlflow"]})
    message = str(info.value)
    assert "\n" not in message and "pip install 'pollinate[tracking]'" in message
    assert load_config(None, {"run.tracking": ["tensorboard"]}).run.tracking
    with pytest.raises(TrackingError, match=r"mlflow needs mlflow: pip install"):
        open_tracker(RunFolder("unused"), ["mlflow"], start_round=0, method="lora")


def test_logged_rows_read_back_with_each_trackers_reader(tmp_path: Path) -> None:
    """Breaks if a value is logged at the wrong step or altered, if a null or
    NaN value becomes a point, or if the run's parameters are not recorded."""
    folder = RunFolder(tmp_path)
    rows = [
        _row(0, 2.25),
        _row(1, None, epsilon=0.75),
        _row(2, 1.125, epsilon=1.5, eval_metric=float("nan")),
    ]
    _log_rows(folder, rows)
    assert _tensorboard(folder, "eval_loss") == [(0, 2.25), (2, 1.125)]
    assert _mlflow(folder, "eval_loss") == [(0, 2.25), (2, 1.125)]
    assert _mlflow(folder, "epsilon") == [(1, 0.75), (2, 1.5)]
    expected = [(r["round"], r["seconds"]) for r in rows]
    assert _tensorboard(folder, "seconds") == [(s, _f32(v)) for s, v in expected]
    assert _mlflow(folder, "seconds") == expected
    assert _tensorboard(folder, "eval_metric") == [] == _mlflow(folder, "eval_metric")
    (run_id,) = _mlflow_runs(folder)
    run = MlflowClient(mlflow_uri(folder)).get_run(run_id)
    assert run.data.params == {"run.method": "lora"}  # no config.toml here
    assert run.info.status == "FINISHED"


def test_a_resume_continues_both_runs_without_duplicate_steps(
    tmp_path: Path,
) -> None:
    """A server killed after round 2 was logged but before the tracker's
    state said so (it records round 1) resumes after round 2. Breaks if the
    resume opens a second MLflow run, logs round 2 to MLflow twice, shows
    round 2 twice in TensorBoard, or misses a round."""
    folder = RunFolder(tmp_path)
    metrics = folder.metrics_log()
    tracker = open_tracker(folder, BOTH, start_round=0, method="lora")
    for row in [_row(r, 3.0 - r) for r in range(3)]:
        metrics.append(row)
        tracker.log_row(row)
    # Killed: no close, and the state write of round 2 lost.
    state = folder.tracking_dir / "state.json"
    record = json.loads(state.read_text())
    (run_id,) = _mlflow_runs(folder)
    assert record["mlflow_run_id"] == run_id and record["logged_through"] == 2
    state.write_text(json.dumps({**record, "logged_through": 1}))

    _log_rows(folder, [_row(3, 0.5), _row(4, 0.25)], start_round=2)
    losses = [(0, 3.0), (1, 2.0), (2, 1.0), (3, 0.5), (4, 0.25)]
    assert _tensorboard(folder, "eval_loss") == losses
    assert _mlflow_runs(folder) == [run_id]
    assert _mlflow(folder, "eval_loss") == losses
    assert json.loads(state.read_text())["logged_through"] == 4


def test_a_damaged_state_starts_a_new_mlflow_run_with_every_row(
    tmp_path: Path, caplog
) -> None:
    """Breaks if a damaged ``state.json`` is taken at its word or kills the
    run, if the new MLflow run lacks the rows recorded before the resume, or
    if TensorBoard then shows a round twice."""
    folder = RunFolder(tmp_path)
    _log_rows(folder, [_row(r, 3.0 - r) for r in range(3)])
    (old,) = _mlflow_runs(folder)
    (folder.tracking_dir / "state.json").write_text('{"mlflow_run_id": 7}')
    with caplog.at_level(logging.WARNING, logger="server.tracking"):
        _log_rows(folder, [_row(3, 0.5)], start_round=2)
    assert "damaged; starting a new MLflow run" in caplog.text
    (new,) = set(_mlflow_runs(folder)) - {old}
    losses = [(0, 3.0), (1, 2.0), (2, 1.0), (3, 0.5)]
    assert _mlflow(folder, "eval_loss", new) == losses
    assert _tensorboard(folder, "eval_loss") == losses


def test_a_stopped_and_resumed_run_tracks_eval_loss_of_every_evaluated_round(
    tmp_path: Path,
) -> None:
    """A whole tiny-llama run in process, stopped when round 2 is sent and
    resumed, evaluating rounds 0, 2 and 3 (``eval.every = 2``). Breaks if the
    config does not reach the round loop, a round's eval_loss differs from
    metrics.jsonl, the unevaluated round 1 gets a point, the resume opens a
    second MLflow run, or the resolved config is not logged."""
    config = lora_config(
        tmp_path,
        "tracked",
        2,
        {"run.tracking": list(BOTH), "eval.every": 2},
    )
    recorded = run(config, stop_at=2)
    folder = recorded.folder
    rows = [json.loads(line) for line in folder.metrics.read_text().splitlines()]
    losses = [(r["round"], r["eval_loss"]) for r in rows if r["eval_loss"] is not None]
    assert [s for s, _ in losses] == [0, 2, 3]
    assert all(math.isfinite(v) for _, v in losses)
    assert _mlflow(folder, "eval_loss") == losses
    assert _tensorboard(folder, "eval_loss") == [(s, _f32(v)) for s, v in losses]
    assert [s for s, _ in _mlflow(folder, "bytes_up")] == [0, 1, 2, 3]
    (run_id,) = _mlflow_runs(folder)
    run_info = MlflowClient(mlflow_uri(folder)).get_run(run_id)
    assert run_info.data.params["model.name"] == "tiny-llama"
    assert run_info.data.params["run.tracking"] == '["tensorboard", "mlflow"]'
    assert run_info.info.status == "FINISHED"


def test_a_tracking_uri_is_checked_and_needs_mlflow(tmp_path: Path) -> None:
    """Breaks if ``run.tracking_uri`` took a relative or non-.db SQLite path,
    a folder that does not exist, another scheme, or a URI with no MLflow to
    log to; each refusal is one line naming the setting."""
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    ok = {"run.tracking": ["mlflow"], "run.tracking_uri": store}
    assert load_config(None, ok).run.tracking_uri == store
    server = {"run.tracking": ["mlflow"], "run.tracking_uri": "http://127.0.0.1:5000"}
    assert load_config(None, server).run.tracking_uri == "http://127.0.0.1:5000"
    for bad in (
        "sqlite:///runs.db",
        f"sqlite:///{tmp_path / 'runs.txt'}",
        f"sqlite:///{tmp_path / 'missing' / 'runs.db'}",
        "ftp://host/runs",
        "http://",
    ):
        with pytest.raises(ConfigError, match="run.tracking_uri") as info:
            load_config(None, {"run.tracking": ["mlflow"], "run.tracking_uri": bad})
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="does not list mlflow"):
        load_config(None, {"run.tracking": ["tensorboard"], "run.tracking_uri": store})


def test_runs_sharing_a_store_are_runs_of_one_experiment(tmp_path: Path) -> None:
    """Two run folders logging to one ``run.tracking_uri`` are two MLflow runs,
    named as their folders, in the one ``pollinate`` experiment of that store,
    and a resume continues its own run there.

    Breaks if a run logged to its folder's own store instead, if the runs'
    values mixed, or if the resume started a third MLflow run.
    """
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    folders = {name: RunFolder(tmp_path / name) for name in ("a", "b")}
    for i, folder in enumerate(folders.values()):
        folder.path.mkdir()
        tracker = open_tracker(
            folder, ["mlflow"], start_round=0, method="lora", mlflow_store=store
        )
        for r in range(2):
            row = _row(r, 2.0 + i - r)
            folder.metrics_log().append(row)
            tracker.log_row(row)
        tracker.close()
        assert not (folder.tracking_dir / "mlflow.db").exists()
    a = folders["a"]
    resumed = open_tracker(
        a, ["mlflow"], start_round=1, method="lora", mlflow_store=store
    )
    resumed.log_row(_row(2, 0.5))
    resumed.close()

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("pollinate")
    assert experiment is not None
    runs = {
        r.info.run_name: r.info.run_id
        for r in client.search_runs([experiment.experiment_id])
    }
    assert set(runs) == {"a", "b"}

    def losses(name: str) -> list[tuple[int, float]]:
        history = client.get_metric_history(runs[name], "eval_loss")
        return sorted((m.step, m.value) for m in history)

    assert losses("a") == [(0, 2.0), (1, 1.0), (2, 0.5)]
    assert losses("b") == [(0, 3.0), (1, 2.0)]
    assert (
        json.loads((a.tracking_dir / "state.json").read_text())["mlflow_run_id"]
        == runs["a"]
    )
