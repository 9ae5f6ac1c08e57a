"""``pollinate server start`` sets the fleet gateway's bounds, and resume keeps them.

The gateway closes connections that withhold their headers and caps the
connections of one address (``tests/adversarial/test_outsider.py`` checks the
gateway itself). Here: the operator's flags reach the gateway's command line,
``server.json`` records them so that ``pollinate server resume`` restarts the
gateway with the same bounds, and a bad value is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cli.main import build_parser
from protocols.run_folder import RunFolder
from server import deploy
from server.deploy import ServerInfo, read_server_info, write_server_info
from server.gateway import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_MAX_CONNECTIONS_PER_PEER
from server.processes import DeployError


class _FakeProcess:
    """What ``start_server`` keeps of a started process: its pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid


def _gateway_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, info: ServerInfo
) -> list[str]:
    """The gateway command line ``start_server`` builds for ``info`` (nothing runs)."""
    commands: list[list[str]] = []

    def popen(cmd: list[str], **_: Any) -> _FakeProcess:
        commands.append(cmd)
        return _FakeProcess(1_000_000 + len(commands))

    monkeypatch.setattr(deploy, "start_superlink", lambda *a, **k: _FakeProcess(7))
    monkeypatch.setattr(deploy.subprocess, "Popen", popen)
    monkeypatch.setattr(deploy, "wait_for_port", lambda *a, **k: None)
    monkeypatch.setattr(deploy, "free_loopback_port", lambda: 40_000)
    # start_gateway checks that the public port is free by binding it.
    monkeypatch.setattr(deploy.socket.socket, "bind", lambda self, addr: None)
    started = deploy.start_server(tmp_path / "run", info, auth=False)
    assert started.pid == 7 and started.superlink_port == 40_000
    (command,) = commands
    return command


def _value(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


def test_recorded_bounds_reach_the_gateway(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Breaks if ``server.json``'s bounds were not passed to the gateway
    (a resumed server would fall back to the defaults an operator raised)."""
    (tmp_path / "run").mkdir()
    info = ServerInfo(
        -1,
        "127.0.0.1",
        9092,
        "127.0.0.1:9092",
        None,
        None,
        header_timeout_s=2.5,
        max_connections_per_peer=500,
    )
    command = _gateway_command(monkeypatch, tmp_path, info)
    assert "server.gateway" in command
    assert float(_value(command, "--header-timeout-s") or 0) == 2.5
    assert _value(command, "--max-connections-per-peer") == "500"


def test_unset_bounds_leave_the_gateway_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No flag is passed when the operator set none: the gateway's own
    defaults apply (one owner of the default values)."""
    (tmp_path / "run").mkdir()
    info = ServerInfo(-1, "127.0.0.1", 9092, "127.0.0.1:9092", None, None)
    command = _gateway_command(monkeypatch, tmp_path, info)
    assert "--header-timeout-s" not in command
    assert "--max-connections-per-peer" not in command


def test_server_json_keeps_the_bounds_and_refuses_bad_ones(tmp_path: Path) -> None:
    """The record round-trips; a damaged bound is one line, not a gateway
    that fails to start (or starts unbounded)."""
    info = ServerInfo(
        12,
        "0.0.0.0",
        9092,
        "127.0.0.1:9092",
        None,
        None,
        header_timeout_s=4.0,
        max_connections_per_peer=8,
    )
    write_server_info(tmp_path, info)
    assert read_server_info(tmp_path) == info
    path = RunFolder(tmp_path).server_info
    record = json.loads(path.read_text())
    for name, bad in (("header_timeout_s", -1.0), ("max_connections_per_peer", 0)):
        path.write_text(json.dumps({**record, name: bad}))
        with pytest.raises(DeployError, match=f"damaged.*{name}"):
            read_server_info(tmp_path)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--header-timeout-s", "0"),
        ("--header-timeout-s", "nan"),
        ("--header-timeout-s", "inf"),
        ("--max-connections-per-peer", "-3"),
        ("--max-connections-per-peer", "2.5"),
    ],
)
def test_server_start_refuses_a_bound_that_is_not_positive(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["server", "start", "run.toml", "--insecure", flag, value])
    assert exit_info.value.code == 2
    assert f"{flag}: must be a positive" in capsys.readouterr().err


def test_server_start_reads_the_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    """The flags parse, and the help names the gateway's real defaults."""
    parser = build_parser()
    args = parser.parse_args(
        [
            "server",
            "start",
            "run.toml",
            "--insecure",
            "--header-timeout-s",
            "3",
            "--max-connections-per-peer",
            "200",
        ]
    )
    assert args.header_timeout_s == 3.0
    assert args.max_connections_per_peer == 200
    with pytest.raises(SystemExit):
        parser.parse_args(["server", "start", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"default: {DEFAULT_HEADER_TIMEOUT_S:g})" in text
    assert f"default: {DEFAULT_MAX_CONNECTIONS_PER_PEER})" in text


def test_the_gateway_accepts_the_flags_start_server_writes() -> None:
    """The gateway's own parser takes both flags as written (a spelling
    mismatch would make every bounded start fail)."""
    from server.gateway import _parse

    settings = _parse(
        [
            "--port",
            "9092",
            "--upstream-port",
            "9093",
            "--header-timeout-s",
            repr(2.5),
            "--max-connections-per-peer",
            "500",
        ]
    )
    assert settings.header_timeout_s == 2.5
    assert settings.max_connections_per_peer == 500
