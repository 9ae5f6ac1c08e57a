"""Running a prepared run folder on Flower's simulation runtime, owned and watched.

``pollinate simulate`` and ``pollinate resume`` run a simulation the way
Flower 1.42 supports it going forward, ``flwr run`` against a SuperLink in
simulation mode, and :func:`launch` owns every process it starts:

- ``flower-superlink --simulation --isolation subprocess`` on 127.0.0.1 and a
  free port, in a session of its own, state in memory, no per-run dependency
  install, its ``FLWR_HOME`` in the run folder
  (:func:`server.deploy.start_superlink`). For the run, its SuperExec starts
  one ``flwr-simulation`` process holding the ServerApp and Ray, whose actors
  run the ClientApps; all of them inherit the SuperLink's environment
  (:func:`simulation_env`).
- ``flwr run`` submits the run folder's two-line app (``server.app:app`` and
  ``client.app:app``, or ``simulation.attacks:app`` when ``[attack]`` makes
  some clients send hostile replies: :func:`simulation.attacks.client_app_ref`)
  with the run config ``run-dir`` and ``resume`` and the federation's size and
  resources (:func:`federation_config`); the run folder reaches the apps
  through ``run-dir`` only.
- ``flwr log --stream`` copies the run's log into ``simulation.log`` (Flower
  discards the simulation's output and keeps its log); the SuperLink's own
  output goes to ``superlink.log``.

The launch owns the run folder: it holds its lock
(:meth:`~protocols.run_folder.RunFolder.lock`) from before anything starts
until every process is gone, so a second ``simulate``/``resume`` on the folder
is refused naming this process. A watchdog (:mod:`simulation.watchdog`) shares
that lock and takes the SuperLink and everything under it down if this
process dies without cleaning up (SIGKILL, SIGTERM).

A progress bar follows ``metrics.jsonl``. The run has ended when Flower has
finished it, or when its ``flwr-simulation`` process is gone (a hard crash,
which Flower only notices when heartbeats time out). Then, and on Ctrl-C or any
failure, the SuperLink and every process under it are stopped before this
returns. A run counts as successful only if Flower reports it
``finished:completed`` *and* ``status.json`` says ``completed``: ``flwr run``
itself says nothing about the outcome.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from protocols.installation import check_installation
from protocols.run_folder import RunFolder, RunFolderError, RunStatus
from server.config import RunConfig, load_config
from server.deploy import start_superlink
from server.flower_cli import flower_run_status, stream_run_log, submit_run
from server.processes import DeployError, stop_process_tree
from simulation.attacks import client_app_ref, describe_attack
from simulation.watchdog import Watchdog, stop_marked

__all__ = ["LaunchResult", "federation_config", "launch", "simulation_env"]

HOST = "127.0.0.1"
INTERRUPTED = 130  # the shell's status for a process ended by SIGINT
_POLL_S = 0.5  # the progress bar's refresh rate
_LOG_DRAIN_S = 10.0  # time for the log stream to end once the simulation exited
_SHUTDOWN_S = 60.0  # time for Flower to finish a run whose ServerApp has ended


@dataclass(frozen=True, slots=True)
class LaunchResult:
    """How a simulation ended.

    Attributes
    ----------
    returncode : int
        0 when Flower finished the run as completed, 130 after Ctrl-C, 1 for
        anything else (a failed, stopped or crashed run, a SuperLink that did
        not start).
    state : str
        What ``status.json`` says after the launch (``not started`` if nothing
        ran).
    error : str or None
        The recorded error, or why the simulation could not be started.
    log_path : Path
        The log that tells what happened: ``simulation.log`` (the run's),
        or ``superlink.log`` when the run could not be submitted.
    """

    returncode: int
    state: str
    error: str | None
    log_path: Path

    @property
    def ok(self) -> bool:
        """True when the run completed."""
        return self.returncode == 0 and self.state == "completed"


def simulation_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Variables the simulation's processes get on top of Flower's defaults.

    The SuperLink passes its environment down to its SuperExec, the
    ``flwr-simulation`` process and Ray's workers, so this is how settings
    reach the ServerApp and ClientApps. ``RAY_ADDRESS`` is kept when set (join
    that Ray cluster) and is ``local`` otherwise: left to itself, Ray connects
    to the last cluster named in ``$TMPDIR/ray/ray_current_cluster``, and a
    head killed without ``ray stop`` leaves that file behind, so ``ray.init``
    would wait forever. ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0`` takes Ray's
    announced behaviour now (a worker with no GPU share keeps
    ``CUDA_VISIBLE_DEVICES`` as it is; Ray 2.5x warns on every start without
    it): a client's device is its node config's ``device`` (``cpu`` unless
    set), never Ray's. ``extra`` (e.g. ``POLLINATE_FAULT_AFTER_ROUND``)
    overrides all of it.
    """
    return {
        "RAY_ADDRESS": os.environ.get("RAY_ADDRESS") or "local",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    }


def federation_config(clients: int) -> dict[str, int | float | bool]:
    """Flower's ``SimulationConfig`` for ``clients`` virtual clients.

    Each gets one CPU, so that clients train in parallel on the cores there
    are (Flower's default of two serialises them on a two-core machine).
    """
    return {
        "num-supernodes": clients,
        "client-resources-num-cpus": 1,  # a whole number in Flower 1.42
        "client-resources-num-gpus": 0.0,
        "init-args-log-to-driver": True,
    }


def _begin(folder: RunFolder, config: RunConfig, *, resume: bool, cluster: str) -> None:
    """Set the run folder's bookkeeping up for this attempt."""
    if resume:
        # The last attempt's end must not end the watch of this one.
        folder.write_status("resuming")
    else:
        folder.simulation_log.unlink(missing_ok=True)
        folder.superlink_log.unlink(missing_ok=True)
    where = (
        "a fresh local instance"
        if cluster == "local"
        else f"joining the existing Ray cluster at {cluster}"
    )
    _note(folder, f"Ray: {where}")
    attack = describe_attack(config)
    if attack is not None:
        _note(
            folder,
            f"attack: partitions {attack['malicious']} are malicious "
            f"({attack['behaviour']}; ClientApp {client_app_ref(config)})",
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _note(folder: RunFolder, text: str) -> None:
    """Add one line of ours to ``simulation.log``."""
    stamp = datetime.now().isoformat(sep=" ", timespec="milliseconds")
    with folder.simulation_log.open("a", encoding="utf-8") as log:
        log.write(f"{stamp} simulation.launcher INFO: {text}\n")


def _status(folder: RunFolder) -> RunStatus:
    try:
        return folder.read_status()
    except RunFolderError:
        return RunStatus("running")  # mid-write or damaged: not an end


def _show(bar: Progress, task: TaskID, folder: RunFolder) -> None:
    try:
        rows = folder.read_metrics()
    except RunFolderError:
        return  # a row being written; the next refresh reads it
    if rows:
        last = rows[-1]
        loss, metric = last.get("eval_loss"), last.get("eval_metric")
        text = f"round {last['round']}"
        if loss is not None and metric is not None:  # types checked on reading
            text += (
                f": eval loss {loss:.3f}, "
                f"{last.get('eval_metric_name', 'metric')} {100 * metric:.1f}%"
            )
        bar.update(task, completed=int(last["round"]), last=text)


def _simulation_process(superlink: psutil.Process) -> psutil.Process | None:
    """The ``flwr-simulation`` process under the SuperLink, once it started."""
    try:
        for proc in superlink.children(recursive=True):
            cmd = proc.cmdline()
            if any(Path(part).name == "flwr-simulation" for part in cmd[:2]):
                return proc
    except psutil.Error:
        return None
    return None


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _watch(
    folder: RunFolder,
    rounds: int,
    console: Console,
    superlink: subprocess.Popen[bytes],
    streamer: subprocess.Popen[bytes],
    ask_flower: Callable[[], str],
) -> str:
    """Show a progress bar over rounds until the run has ended.

    The log stream ending is the usual sign (Flower finished the run and sent
    its log); if it ended for another reason, Flower is asked every few
    seconds instead. Returns what Flower last said about the run (``""`` if
    it was not asked).
    """
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TextColumn("{task.fields[last]}"),
        TimeElapsedColumn(),
    )
    root = psutil.Process(superlink.pid)
    simulation: psutil.Process | None = None
    exited_at: float | None = None  # when flwr-simulation was seen gone
    ended_at: float | None = None  # when status.json recorded an end
    ask_at: float | None = None  # when to ask Flower, once the stream is gone
    flower = ""
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("federated training", total=rounds, last="starting")
        while superlink.poll() is None:
            _show(bar, task, folder)
            now = time.monotonic()
            if ask_at is None and streamer.poll() is not None:
                ask_at = now
            if ask_at is not None and now >= ask_at:
                flower = ask_flower()
                if flower.startswith("finished"):
                    break
                ask_at = now + 5.0  # each question starts the flwr CLI
            simulation = simulation or _simulation_process(root)
            if simulation is not None and exited_at is None and _gone(simulation):
                exited_at = now
            if exited_at is not None and now - exited_at > _LOG_DRAIN_S:
                break  # ended without Flower knowing yet (killed, crashed)
            if ended_at is None and _status(folder).ended:
                ended_at = now
            if ended_at is not None and now - ended_at > _SHUTDOWN_S:
                break  # the ServerApp is done, Flower never finishes
            time.sleep(_POLL_S)
        _show(bar, task, folder)
    return flower


def _flower_outcome(ask: Callable[[], str], tries: int = 3) -> str:
    """Flower's status of the run (``finished:completed``...), or ``""``."""
    status = ""
    for attempt in range(tries):
        status = ask()
        if status.startswith("finished"):
            return status
        if attempt + 1 < tries:
            time.sleep(2.0)  # the run's final push may still be on its way
    return status


def _result(
    folder: RunFolder,
    flower: str,
    log: Path,
    *,
    submitted: bool,
    interrupted: bool,
    error: str | None,
) -> LaunchResult:
    """Record an end the ServerApp could not record; say how the run ended.

    A fresh run that never reached Flower stays ``not started``.
    """
    status = _status(folder)
    if not status.ended and (submitted or status.state != "not started"):
        if interrupted:
            folder.write_status("stopped", reason="interrupted (Ctrl-C)")
        else:
            why = error or (
                f"the simulation ended without recording an outcome (Flower: "
                f"{flower or 'no answer'}); see {log}"
            )
            folder.write_status("failed", error=why)
        status = _status(folder)
    if interrupted:
        code = INTERRUPTED
    elif flower == "finished:completed" and status.state == "completed":
        code = 0
    else:
        code = 1
    return LaunchResult(
        returncode=code,
        state=status.state,
        error=status.error or error,
        log_path=log,
    )


def launch(
    run_dir: Path,
    *,
    rounds: int,
    console: Console | None = None,
    resume: bool = False,
    env: dict[str, str] | None = None,
) -> LaunchResult:
    """Run a prepared ``run_dir`` on Flower's simulation runtime and wait for it.

    Parameters
    ----------
    run_dir : Path
        A folder written by :func:`simulation.prepare_run`.
    rounds : int
        The run's rounds (the length of the progress bar).
    console : Console, optional
        Where the progress bar goes (stderr by default).
    resume : bool
        Continue from the run's last checkpoint instead of starting over.
    env : dict, optional
        Variables added to the environment of the SuperLink and all it starts.

    Returns
    -------
    LaunchResult
        How it ended; every process this started is gone by then.

    Raises
    ------
    RunFolderLocked
        If another live process owns ``run_dir`` (nothing is started or
        written then).
    """
    check_installation()  # before starting Flower, whose apps import our packages
    folder = RunFolder(run_dir)
    config = load_config(folder.config)
    with (
        folder.lock() as lock_fd,
        Watchdog(lock_fd, run_dir=folder.path) as watchdog,
    ):
        return _launch_owned(
            folder,
            rounds,
            config,
            console or Console(stderr=True),
            watchdog,
            resume=resume,
            env={**(env or {}), **watchdog.env()},
        )


def _launch_owned(
    folder: RunFolder,
    rounds: int,
    config: RunConfig,
    console: Console,
    watchdog: Watchdog,
    *,
    resume: bool,
    env: dict[str, str],
) -> LaunchResult:
    """:func:`launch` once the run folder is ours and the watchdog is up."""
    run_dir = folder.path
    process_env = simulation_env(env)
    _begin(folder, config, resume=resume, cluster=process_env["RAY_ADDRESS"])
    superlink = streamer = None
    run_id: int | None = None
    flower, error, interrupted = "", None, False
    try:
        port = _free_port()
        superlink = start_superlink(
            run_dir, HOST, port, tls=None, auth=False, simulation=True, env=process_env
        )
        watchdog.watch(superlink.pid)
        address = f"{HOST}:{port}"
        run_id = submit_run(
            run_dir,
            address,
            None,
            resume=resume,
            federation_config=federation_config(config.federation.clients),
            clientapp=client_app_ref(config),
        )
        _note(folder, f"Flower run {run_id} on the SuperLink at {address}")
        streamer = stream_run_log(run_dir, address, None, run_id, folder.simulation_log)
        watchdog.watch(streamer.pid)
        ask_flower = functools.partial(
            flower_run_status, run_dir, address, None, run_id
        )
        flower = _watch(folder, rounds, console, superlink, streamer, ask_flower)
        if superlink.poll() is not None:
            _note(
                folder,
                f"the SuperLink exited by itself (status {superlink.returncode}); "
                f"its log: {folder.superlink_log}",
            )
        elif not flower.startswith("finished"):
            flower = _flower_outcome(ask_flower)
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]interrupted: stopping the simulation[/]")
    except (DeployError, subprocess.TimeoutExpired) as exc:
        error = f"the simulation could not run: {exc}"
    finally:
        for proc in (streamer, superlink):
            if proc is not None:
                stop_process_tree(proc.pid)
        # Whatever escaped the trees (re-parented, or a SuperLink that never
        # listened) still carries the watchdog's mark.
        stop_marked(watchdog.token, [])
        # Clients' seed-sync snapshots are scratch: the checkpoint has the state.
        shutil.rmtree(folder.zo_state, ignore_errors=True)
    if flower:
        _note(folder, f"Flower reports the run {flower}")
    log = folder.simulation_log if run_id is not None else folder.superlink_log
    return _result(
        folder,
        flower,
        log,
        submitted=run_id is not None,
        interrupted=interrupted,
        error=error,
    )
