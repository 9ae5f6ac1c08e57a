"""The run folder owner: layout, status, checkpoints, and damaged files.

Every process asks :class:`RunFolder` for its paths and records, so a damaged
file must be refused with a message naming it, never taken at its word, and a
write must never leave a torn file or a temporary one behind.
"""

from __future__ import annotations

import json
import os
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
    assert (status.state, status.error, status.fields["rounds"]) == (
        "failed",
        "boom",
        3,
    )
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


def test_a_checkpoint_is_sealed_and_verified(tmp_path: Path) -> None:
    """Every checkpoint carries a manifest of its files' sha256 and its round;
    reading checks the bytes it parses, so a changed byte anywhere (tensors,
    state) is named instead of being loaded."""
    from safetensors.torch import load_file

    from protocols.manifest import read_manifest

    folder = RunFolder(tmp_path)
    written = {"z": torch.ones(3), "w": torch.arange(4.0), "b": torch.zeros(1)}
    folder.write_checkpoint(2, "fp", {"ledger": "[]"}, written)
    manifest = read_manifest(folder.checkpoint_dir)
    assert set(manifest.files) == {"state.json", "adapter.safetensors"}
    assert manifest.meta == {"round": 2, "spec_fingerprint": "fp"}
    assert folder.verify_checkpoint() == 2
    state = folder.read_checkpoint("fp")
    read = folder.read_checkpoint_tensors(state)
    assert torch.equal(read["w"], torch.arange(4.0))
    # The layout check compares names in file order, as load_file gives them.
    assert list(read) == list(load_file(folder.checkpoint_dir / "adapter.safetensors"))
    tensors = folder.checkpoint_dir / "adapter.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-1] + b"\x7f")
    with pytest.raises(CheckpointError, match="adapter.safetensors is damaged"):
        folder.read_checkpoint_tensors(state)
    with pytest.raises(CheckpointError, match="adapter.safetensors is damaged"):
        folder.verify_checkpoint()


def test_sealed_artefacts_refuse_changes(tmp_path: Path) -> None:
    """A final artefact written through the run folder is sealed; a changed,
    removed or unsealed one is refused naming the file."""
    folder = RunFolder(tmp_path)
    path = folder.write_tensors("model/x.safetensors", {"w": torch.ones(2)}, {})
    assert folder.verify_artefact("model/x.safetensors") == path
    path.write_bytes(path.read_bytes() + b" ")
    with pytest.raises(RunFolderError, match="x.safetensors is damaged"):
        folder.verify_artefact("model/x.safetensors")
    (tmp_path / "model" / "x.safetensors.manifest.json").unlink()
    with pytest.raises(RunFolderError, match="manifest.json is missing"):
        folder.verify_artefact("model/x.safetensors")


def test_the_lock_is_exclusive_and_names_its_owner(tmp_path: Path) -> None:
    """One owner at a time: a second lock (another open file, even in this
    process) is refused naming the owner's pid; the lock file keeps no stale
    pid after a release."""
    from protocols.run_folder import RunFolderLocked

    folder = RunFolder(tmp_path)
    assert folder.locked_by() is None
    with folder.lock():
        assert folder.locked_by() == os.getpid()
        with pytest.raises(RunFolderLocked, match=f"in use by pid {os.getpid()}"):
            with folder.lock():
                pass
        with pytest.raises(RunFolderLocked, match=str(os.getpid())):
            folder.check_free()
    assert folder.locked_by() is None
    assert folder.lock_file.read_text() == ""


def test_truncating_metrics_refuses_a_damaged_middle_line(tmp_path: Path) -> None:
    """Resume drops rows past its checkpoint and a torn last line, but a
    damaged line in the middle is an error, not silently lost history."""
    folder = RunFolder(tmp_path)
    folder.metrics.write_bytes(b'{"round": 0}\n{"round": 1}\n{"round": 2}\n{"rou')
    folder.metrics_log().truncate_after(1)
    assert folder.metrics.read_text() == '{"round": 0}\n{"round": 1}\n'
    folder.metrics.write_bytes(b'{"round": 0}\n\xff\xfe\n{"round": 1}\n')
    with pytest.raises(RunFolderError, match=r"metrics.jsonl:2 is damaged"):
        folder.metrics_log().truncate_after(1)
