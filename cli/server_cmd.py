"""``pollinate server start|status|stop|resume``: a real federation server.

``start`` prepares a run folder, starts the SuperLink (TLS by default) on
127.0.0.1 behind the fleet gateway on ``--host/--port`` (Fleet API only:
keys, runs and logs are reachable from this machine alone) and submits the
run; by default it then watches the run, shows progress and stops the server
when the run ends (``--detach`` returns at once). ``status`` reads the run
folder (and asks the SuperLink which nodes are connected); ``stop`` stops the
gateway and the SuperLink; ``resume`` continues a stopped or crashed run from
its last checkpoint, restarting the server if it is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from cli.overrides import add_config_arguments
from cli.simulate import report_run

if TYPE_CHECKING:
    from server.certificates import TlsFiles
    from server.config import RunConfig
    from server.deploy import ServerInfo

__all__ = ["add_parser"]

LOG_TAIL_S = 30.0
"""How long a finished run's log streamer may take to copy the log's tail."""

EPILOG = """examples:
  pollinate certs certs/ --host 10.0.0.5
  pollinate server start run.toml --certs certs/ --host 0.0.0.0 --port 9092
  pollinate server start run.toml --insecure --port 9092        # local experiments only
  pollinate server status runs/<run>
  pollinate server stop runs/<run>
  pollinate server resume runs/<run>
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``server`` and its subcommands."""
    parser = sub.add_parser(
        "server",
        help="run a federation server (SuperLink) for real clients",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmds = parser.add_subparsers(dest="server_command", required=True)
    start = cmds.add_parser("start", help="start a server and a run")
    add_config_arguments(start, config_required=True)
    _serving_arguments(start)
    start.add_argument("--run-dir", type=Path, help="run folder (default: a new one)")
    start.set_defaults(handler=_start)
    for name, handler, text in (
        ("status", _status, "rounds done, clients, metrics and bytes so far"),
        ("stop", _stop, "stop the server of a run"),
        ("resume", _resume, "continue a stopped or crashed run from its checkpoint"),
    ):
        cmd = cmds.add_parser(name, help=text)
        cmd.add_argument("run_dir", type=Path)
        if name == "resume":
            cmd.add_argument(
                "--detach", action="store_true", help="return after submitting"
            )
        cmd.set_defaults(handler=handler)


def _serving_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface the fleet gateway listens on (the SuperLink: 127.0.0.1)",
    )
    parser.add_argument(
        "--port", type=int, default=9092, help="port clients connect to"
    )
    tls = parser.add_mutually_exclusive_group(required=True)
    tls.add_argument("--certs", type=Path, help="folder from pollinate certs (TLS)")
    tls.add_argument("--insecure", action="store_true", help="plaintext (local only)")
    parser.add_argument(
        "--auth-keys",
        type=Path,
        help="folder of node public keys (*.pub): only they may join",
    )
    parser.add_argument("--detach", action="store_true", help="return after submitting")
    bounds = parser.add_argument_group("fleet gateway bounds (default: the gateway's)")
    bounds.add_argument(
        "--header-timeout-s",
        type=_positive(float),
        help="seconds a connection has to send a request's line and headers "
        "(the gateway's default: 10)",
    )
    bounds.add_argument(
        "--max-connections-per-peer",
        type=_positive(int),
        help="open connections from one address; raise it for many SuperNodes "
        "behind one NAT (the gateway's default: 64)",
    )


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse type: a finite number of ``kind`` above zero."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(
                f"must be a positive {kind.__name__}, got {text!r}"
            )
        return value

    return parse


def _tls(info: ServerInfo) -> TlsFiles | None:
    from server.certificates import TlsFiles  # here, not at import: --help stays light

    return TlsFiles.in_folder(Path(info.certs)) if info.certs else None


def _serve(
    info: ServerInfo, run_dir: Path, *, resume: bool, console: Console
) -> tuple[ServerInfo, subprocess.Popen[bytes]]:
    """Start the server if needed, register keys, submit the run.

    The ServerApp's log is streamed into the run folder's ``server.log``
    (``flwr log --stream``; that process, returned with the server's record,
    ends with the run). A server this call started is stopped again if the
    run cannot be submitted.

    Raises
    ------
    DeployError
        If the server does not come up or ``flwr run`` fails.
    """
    # Here, not at import: --help stays light.
    from dataclasses import replace

    from protocols.run_folder import RunFolder
    from server.deploy import start_server, stop_server, write_server_info
    from server.flower_cli import register_node_keys, stream_run_log, submit_run
    from server.processes import DeployError, process_alive

    tls = _tls(info)
    started = not process_alive(info.pid)
    if started:
        info = start_server(run_dir, info, auth=bool(info.auth_keys))
        write_server_info(run_dir, info)
    try:
        if started and info.auth_keys and tls is not None:
            keys = sorted(Path(info.auth_keys).glob("*.pub"))
            register_node_keys(run_dir, info.control_address, tls, keys)
            console.print(f"registered {len(keys)} node key(s)")
        run_id = submit_run(run_dir, info.control_address, tls, resume=resume)
    except DeployError:
        if started:
            stop_server(info)
        raise
    info = replace(info, run_id=run_id)
    write_server_info(run_dir, info)
    log = RunFolder(run_dir).server_log
    streamer = stream_run_log(run_dir, info.control_address, tls, run_id, log)
    console.print(
        f"server listening on {info.host}:{info.port} "
        f"({'TLS' if tls else 'plaintext'}, Fleet API only), run {run_id}; "
        f"SuperLink on {info.control_address} (this machine only); log: {log}"
    )
    return info, streamer


def _watch(
    info: ServerInfo,
    streamer: subprocess.Popen[bytes],
    run_dir: Path,
    config: RunConfig,
    console: Console,
) -> int:
    """Follow the run until it ends, then stop the server and report.

    After a run that ended by itself, the ServerApp's log streamer is given
    a bounded time to copy the log's tail before the server goes down.
    """
    # Here, not at import: --help stays light.
    from protocols.run_folder import RunFolder
    from server.deploy import stop_server
    from server.flower_cli import flower_run_status
    from server.processes import process_alive, stop_process_tree
    from simulation import LaunchResult

    folder = RunFolder(run_dir)
    shown = -1
    last_check = time.monotonic()
    try:
        while process_alive(info.pid):
            rows = folder.read_metrics()
            if rows and rows[-1]["round"] != shown:
                shown = int(rows[-1]["round"])
                loss = rows[-1]["eval_loss"]  # None when it was not finite
                console.print(
                    f"round {shown}/{config.run.rounds}: eval loss "
                    f"{'-' if loss is None else format(loss, '.4f')}, "
                    f"clients {rows[-1]['clients']}"
                )
            if folder.read_status().ended:
                break
            if info.run_id is not None and time.monotonic() - last_check > 5.0:
                last_check = time.monotonic()
                flower = flower_run_status(
                    run_dir, info.control_address, _tls(info), info.run_id
                )
                if flower.startswith("finished"):
                    # Re-read: the ServerApp may have recorded its end since.
                    if not folder.read_status().ended:
                        # The ServerApp process died without a word (killed).
                        folder.write_status(
                            "failed", error=f"Flower reports the run {flower}"
                        )
                    break
            time.sleep(1.0)  # polling the run folder: the UI's refresh rate
        with contextlib.suppress(subprocess.TimeoutExpired):
            streamer.wait(timeout=LOG_TAIL_S)  # ends once Flower sent the log
    except KeyboardInterrupt:
        console.print("interrupted: stopping the server")
    finally:  # a damaged run folder (RunFolderError) must not leave it running
        stop_process_tree(streamer.pid, grace_s=2.0)
        stop_server(info)
    status = folder.read_status()
    result = LaunchResult(
        0 if status.state == "completed" else 1,
        status.state,
        status.error,
        folder.superlink_log,
    )
    return report_run(result, run_dir, config, console)


def _start(args: argparse.Namespace, console: Console) -> int:
    """Prepare, serve and (unless ``--detach``) watch a new run.

    The config and its data are checked as ``pollinate validate`` checks
    them before anything is written or started; a user's mistake is a
    ConfigError, DatasetError or DeployError (one line, exit 2 in cli.main).
    """
    # Here, not at import: --help stays light.
    from cli.validate import load_checked_config
    from server.deploy import ServerInfo, prepare_server_run
    from simulation import new_run_dir

    config = load_checked_config(Path(args.config), args, deployed=True)
    run_dir = args.run_dir or new_run_dir(config)
    prepare_server_run(config, run_dir)
    certs = str(args.certs.resolve()) if args.certs else None
    keys = str(args.auth_keys.resolve()) if args.auth_keys else None
    connect = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    info = ServerInfo(
        -1,
        args.host,
        args.port,
        f"{connect}:{args.port}",
        certs,
        keys,
        header_timeout_s=args.header_timeout_s,
        max_connections_per_peer=args.max_connections_per_peer,
    )
    console.print(f"run folder: {run_dir}")
    info, streamer = _serve(info, run_dir, resume=False, console=console)
    if args.detach:
        console.print(f"watch it with: pollinate server status {run_dir}")
        return 0
    return _watch(info, streamer, run_dir, config, console)


def _resume(args: argparse.Namespace, console: Console) -> int:
    """Continue a served run from its checkpoint, restarting its server.

    Before anything is written the folder must be free (no live ServerApp
    owns it) and its checkpoint whole (every file hashed against its
    manifest); a refusal is one line (cli.main) and leaves the folder as it
    was.
    """
    # Here, not at import: --help stays light.
    from protocols.run_folder import RunFolder, RunFolderError
    from server.config import load_config
    from server.deploy import read_server_info
    from server.processes import DeployError

    folder = RunFolder(args.run_dir)
    info = read_server_info(args.run_dir)
    config = load_config(folder.config)
    if info is None:
        raise DeployError(f"{args.run_dir} was never served (no server.json)")
    folder.check_free()
    folder.read_metrics()
    if folder.verify_checkpoint() is None:
        raise RunFolderError(f"no checkpoint in {args.run_dir}: start the run again")
    # The crashed attempt's "failed" must not end the watch of this one.
    folder.write_status("resuming")
    info, streamer = _serve(info, args.run_dir, resume=True, console=console)
    if args.detach:
        return 0
    return _watch(info, streamer, args.run_dir, config, console)


def _stop(args: argparse.Namespace, console: Console) -> int:
    # Here, not at import: --help stays light.
    from protocols.run_folder import RunFolder, RunFolderError, RunStatus
    from server.deploy import read_server_info, stop_server
    from server.processes import process_alive

    folder = RunFolder(args.run_dir)
    info = read_server_info(args.run_dir)  # damaged: DeployError, one line
    if info is None or not process_alive(info.pid):
        console.print(f"no server running for {args.run_dir}")
        return 1
    stop_server(info)
    # Every server process is gone now. If the ServerApp died without saying
    # so, record it, or the run would look alive to status and a later watch.
    try:
        status: RunStatus | None = folder.read_status()
    except RunFolderError as exc:
        console.print(f"[yellow]{exc}[/]: recording the run as stopped")
        status = None
    if status is None or not status.ended:
        folder.write_status("stopped", **(status.fields if status else {}))
    console.print(f"stopped the server of {args.run_dir} (pid {info.pid})")
    return 0


def _status(args: argparse.Namespace, console: Console) -> int:
    # Here, not at import: --help stays light.
    from cli.console import report_console
    from protocols.run_folder import RunFolder
    from server.config import load_config
    from server.deploy import read_server_info
    from server.flower_cli import connected_nodes
    from server.processes import DeployError, process_alive
    from simulation import summary_table

    run_dir: Path = args.run_dir
    folder = RunFolder(run_dir)
    out = report_console()  # the report is the command's output: stdout, pipeable
    # Damage is a ConfigError, RunFolderError or DeployError: one line, exit 2.
    config = load_config(folder.config)
    status = folder.read_status()
    rows = folder.read_metrics()
    info = read_server_info(run_dir)
    alive = info is not None and process_alive(info.pid)
    out.print(
        f"run {folder.name}: {status.state}; server "
        f"{'up at ' + info.address if alive and info else 'down'}"
    )
    if alive and info is not None:
        try:
            nodes = connected_nodes(run_dir, info.control_address, _tls(info))
            online = [n for n in nodes if str(n.get("status", "")).startswith("online")]
            out.print(f"clients connected: {len(online)}")
        except DeployError as exc:
            out.print(f"clients: unknown ({exc})")
    if rows:
        out.print(
            summary_table(
                rows,
                title=f"{config.run.method}: {len(rows) - 1}/{config.run.rounds} rounds",
            )
        )
    return 0
