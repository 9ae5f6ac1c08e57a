"""The run folder owner: layout, status, checkpoints, and damaged files.

Every process asks :class:`RunFolder` for its paths and records, so a damaged
file must be refused with a message naming it, never taken at its word, and a
write must never leave a torn file or a temporary one behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from protocols.durable import append_line, atomic_write
from protocols.run_folder import (
    CheckpointError,
    RunFolder,
    RunFolderError,
)


def test_status_round_trips_and_defaults_to_not_started(tmp_path: Path) -> None:
    """No status file reads as 'not started'; a written state reads back with
    its fields; an unknown state is refused on write."""
    folder = RunFolder(tmp_path)
    assert folder.read_status().state == "not started"
    folder.write_status("failed", error="boom", rounds=3)
    status = folder.read_status()
    assert (status.state, status.error, status.fields["rounds"]) == ("failed", "boom", 3)
    assert status.ended
    with pytest.raises(ValueError, match="unknown run state"):
        folder.write_status("exploded")


@pytest.mark.parametrize(
    "text", ["{not json", "[1, 2]", '{"state": "pwned"}', '"running"']
)
def test_a_damaged_status_file_is_refused_naming_it(tmp_path: Path, text: str) -> None:
    """Torn JSON, a non-object or an unknown state raise RunFolderError with
    the file's path, instead of being read as some state."""
    folder = RunFolder(tmp_path)
    folder.status_file.write_text(text)
    with pytest.raises(RunFolderError, match="status.json"):
        folder.read_status()


def test_checkpoint_without_tensors_and_spec_check(tmp_path: Path) -> None:
    """A tensor-less checkpoint (FedKSeed) records tensors=None; reading it for
    another spec, or with a damaged round, is refused."""
    folder = RunFolder(tmp_path)
    folder.write_checkpoint(2, "abc", {"model_hash": "h"})
    assert folder.checkpoint_round() == 2
    state = folder.read_checkpoint("abc")
    assert state["tensors"] is None and state["model_hash"] == "h"
    with pytest.raises(CheckpointError, match="config changed"):
        folder.read_checkpoint("other")
    with pytest.raises(CheckpointError, match="names no tensor file"):
        folder.read_checkpoint_tensors(state)
    folder.checkpoint_state.write_text(json.dumps({"round": -4}))
    with pytest.raises(CheckpointError, match="damaged"):
        folder.checkpoint_round()


def test_non_finite_checkpoints_are_refused_both_ways(tmp_path: Path) -> None:
    """NaN state is never written; NaN tensors on disk are never loaded."""
    folder = RunFolder(tmp_path)
    with pytest.raises(CheckpointError, match="not finite"):
        folder.write_checkpoint(1, "fp", {"loss": float("nan")})
    assert folder.checkpoint_round() is None
    bad = {"w": torch.tensor([1.0, float("inf")])}
    folder.write_checkpoint(1, "fp", {}, bad)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        folder.read_checkpoint_tensors(folder.read_checkpoint("fp"))
    with pytest.raises(CheckpointError, match="reserved|may not set"):
        folder.write_checkpoint(1, "fp", {"round": 9})


def test_paths_stay_inside_the_folder(tmp_path: Path) -> None:
    """An artefact or tensor name cannot point outside the run folder."""
    folder = RunFolder(tmp_path)
    with pytest.raises(RunFolderError, match="leaves the run folder"):
        folder.artefact("../../etc/passwd")
    with pytest.raises(CheckpointError, match="bad checkpoint tensor file"):
        folder.write_checkpoint(1, "fp", {}, {"w": torch.ones(1)}, filename="../x")
    assert folder.client_data(7).name == "client-0007.jsonl"


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    """A writer that dies midway leaves the previous content and nothing else."""
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def dies(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, dies)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    with pytest.raises(ValueError, match="line break"):
        append_line(tmp_path / "log", "two\nlines")


@pytest.mark.parametrize(
    ("file", "text", "named"),
    [
        ("status.json", "{torn", "status.json"),
        ("server.json", '{"pid": "1; rm -rf /", "host": "h"}', "server.json"),
        ("metrics.jsonl", '{"round": 0}\n[1]\n', "metrics.jsonl"),
    ],
)
def test_server_status_refuses_a_damaged_run_folder_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    file: str,
    text: str,
    named: str,
) -> None:
    """``pollinate server status`` on a folder with a damaged file exits 2 with
    one line naming the file, and writes nothing."""
    from cli.main import main
    from server.config import RunConfig, config_to_toml

    folder = RunFolder(tmp_path)
    folder.config.write_text(config_to_toml(RunConfig()))
    (tmp_path / file).write_text(text)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["server", "status", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
