"""Reading the run folders ``pollinate simulate`` leaves behind.

On top of :class:`protocols.run_folder.RunFolder`, the run folder's one owner;
it is imported inside the functions, so importing this module stays lean.
:func:`simulate_args` builds a ``pollinate simulate`` command line and
:func:`run_and_read` runs one with a log and reads its folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.harness.processes import run_logged
from bench.harness.results import read_json


def newest_run_dir(folder: Path) -> Path | None:
    """The last run folder (by name: names end in their start time) under ``folder``."""
    if not folder.exists():
        return None
    runs = sorted(p for p in folder.iterdir() if p.is_dir())
    return runs[-1] if runs else None


def read_run(run_dir: Path) -> dict[str, Any]:
    """What a finished (or stopped) ``pollinate simulate`` run folder holds.

    Reads through :class:`protocols.run_folder.RunFolder`; a damaged file is
    recorded under ``read_errors``, not raised.

    Returns
    -------
    dict[str, Any]
        ``run_dir``; ``status`` (``status.json`` as a dict with ``state``, or
        ``None`` when there is none); ``partition_sizes`` and
        ``tasks_per_client`` from ``partitions.json``; ``metrics`` (the rows
        of ``metrics.jsonl``); then, when there are rows,
        ``eval_loss_first/last``, ``metric_first/last``, ``metric_name``,
        ``rounds_done`` and ``round0_seconds``; and over the trained rounds
        (round >= 1 with clients), per client: ``bytes_up_per_client_round``,
        ``bytes_down_per_client_round``, ``bytes_per_client_round`` (up +
        down), ``bytes_per_client_round_mean``, and ``round_seconds``, plus
        the method's extra columns (``replay_seconds``, ``distinct_seeds``;
        ``kept_examples``, ``local_loss``) where the rows have them.
    """
    from protocols.run_folder import RunFolder, RunFolderError

    folder = RunFolder(run_dir)
    out: dict[str, Any] = {"run_dir": str(run_dir)}
    errors: list[str] = []
    out["status"] = None
    if folder.status_file.exists():
        try:
            status = folder.read_status()
            out["status"] = {"state": status.state, **status.fields}
        except RunFolderError as exc:
            errors.append(str(exc))
    if folder.partitions.exists():
        try:
            parts = read_json(folder.partitions)
            out["partition_sizes"] = parts.get("sizes")
            groups = parts.get("groups")
            out["tasks_per_client"] = (
                [len(g) for g in groups] if isinstance(groups, list) else None
            )
        except (ValueError, AttributeError, TypeError) as exc:
            errors.append(f"{folder.partitions}: {exc}")
    try:
        rows = folder.read_metrics()
    except RunFolderError as exc:
        errors.append(str(exc))
        rows = []
    out["metrics"] = rows
    if errors:
        out["read_errors"] = errors
    if rows:
        first, last = rows[0], rows[-1]
        out.update(
            eval_loss_first=first.get("eval_loss"),
            eval_loss_last=last.get("eval_loss"),
            metric_first=first.get("eval_metric"),
            metric_last=last.get("eval_metric"),
            metric_name=last.get("eval_metric_name"),
            rounds_done=last["round"],
            round0_seconds=first.get("seconds"),
        )
    trained = [r for r in rows if r["round"] >= 1 and r.get("clients")]
    if trained:
        up = [r["bytes_up"] / r["clients"] for r in trained]
        down = [r["bytes_down"] / r["clients"] for r in trained]
        total = [u + d for u, d in zip(up, down, strict=True)]
        out.update(
            bytes_up_per_client_round=up,
            bytes_down_per_client_round=down,
            bytes_per_client_round=total,
            bytes_per_client_round_mean=sum(total) / len(total),
            round_seconds=[r["seconds"] for r in trained],
        )
        for first_key, keys in (
            ("replay_seconds", ("replay_seconds", "distinct_seeds")),
            ("kept_examples", ("kept_examples", "local_loss")),
        ):
            if first_key in trained[0]:
                for k in keys:
                    out[k] = [r.get(k) for r in trained]
    return out


def run_and_read(
    cmd: Sequence[str],
    out_dir: Path,
    log_path: Path,
    timeout: float,
    *,
    labels: Mapping[str, Any],
    append: bool = False,
) -> dict[str, Any]:
    """Run ``cmd`` with :func:`~bench.harness.processes.run_logged`; its outcome.

    Parameters
    ----------
    cmd : Sequence[str]
        The run's command (empty: nothing runs, the folder is only read).
    out_dir : Path
        Where the run writes its run folders; the newest one is read.
    log_path : Path
        The log of the run's stdout and stderr.
    timeout : float
        Seconds before the run is stopped.
    labels : Mapping[str, Any]
        The first keys of the outcome (the run's name, ...).
    append : bool
        Append to ``log_path`` instead of overwriting it.

    Returns
    -------
    dict[str, Any]
        ``labels``, then ``command``, ``returncode``, ``timed_out``,
        ``timeout_s``, ``wall_s`` and ``log_tail`` (its last 3,000
        characters), then what :func:`read_run` reads from the newest run
        folder under ``out_dir``, if there is one.
    """
    returncode, timed_out, wall = run_logged(cmd, log_path, timeout, append=append)
    result: dict[str, Any] = {
        **labels,
        "command": cmd,
        "returncode": returncode,
        "timed_out": timed_out,
        "timeout_s": timeout,
        "wall_s": wall,
        "log_tail": log_path.read_text()[-3000:],
    }
    run_dir = newest_run_dir(out_dir)
    if run_dir is not None:
        result.update(read_run(run_dir))
    return result


def simulate_args(
    name: str,
    out_dir: Path,
    *,
    model: str,
    dataset: Path,
    clients: int,
    partition: str,
    limit: int,
    rounds: int,
    eval_examples: int,
    new_tokens: int,
    alpha: float | None = None,
) -> list[str]:
    """The ``pollinate simulate`` arguments of a benchmark's Rouge-L run.

    Parameters
    ----------
    name : str
        The run's name.
    out_dir : Path
        Where its run folders go.
    model : str
        The model name.
    dataset : Path
        The dataset file.
    clients : int
        Clients (all sampled).
    partition : str
        The partition scheme (``"task"``, ``"dirichlet"``, ...).
    limit : int
        Examples read from ``dataset``.
    rounds : int
        Federated rounds.
    eval_examples : int
        Held-out examples of the central evaluation.
    new_tokens : int
        Tokens generated per held-out example.
    alpha : float | None
        ``--alpha`` of the Dirichlet partition; ``None`` leaves it out.

    Returns
    -------
    list[str]
        ``simulate`` and its options, without the method's.
    """
    args = [
        "simulate",
        "--name",
        name,
        "--output-dir",
        str(out_dir),
        "--model",
        model,
        "--dataset",
        str(dataset),
        "--clients",
        str(clients),
        "--partition",
        partition,
    ]
    if alpha is not None:
        args += ["--alpha", str(alpha)]
    return [
        *args,
        "--limit",
        str(limit),
        "--rounds",
        str(rounds),
        "--set",
        'eval.metric="rouge_l"',
        "--set",
        f"data.eval_examples={eval_examples}",
        "--set",
        f"eval.max_new_tokens={new_tokens}",
    ]
