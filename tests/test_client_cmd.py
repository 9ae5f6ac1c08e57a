"""``pollinate client join``: the node's label follows its key by default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cli.main import main
from client.daemon import JoinSettings, make_node_key
from corpora import generate_tasks, write_jsonl


def _join(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> JoinSettings:
    """Run ``client join`` with the daemon replaced; return its settings."""
    import client.daemon

    seen: list[JoinSettings] = []

    def fake_daemon(settings: JoinSettings, **_: Any) -> int:
        seen.append(settings)
        return 0

    monkeypatch.setattr(client.daemon, "run_daemon", fake_daemon)
    data = tmp_path / "d.jsonl"
    write_jsonl(generate_tasks(4, seed=0), data)
    argv = ["client", "join", "--server", "127.0.0.1:1", "--data", str(data)]
    assert main([*argv, "--insecure", *extra]) == 0
    (settings,) = seen
    return settings


def test_the_label_defaults_to_the_auth_keys_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An authenticating server accepts a node only under its key's name, so
    ``--auth-key keys/hospital-3.key`` joins as ``hospital-3``; an explicit
    ``--label`` still wins. Breaks if the label falls back to the host name
    while a key is given."""
    key, _ = make_node_key(tmp_path / "keys", "hospital-3")
    assert _join(tmp_path, monkeypatch, "--auth-key", str(key)).label == "hospital-3"
    chosen = _join(tmp_path, monkeypatch, "--auth-key", str(key), "--label", "x")
    assert chosen.label == "x"
