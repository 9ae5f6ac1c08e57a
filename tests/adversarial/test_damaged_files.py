"""Damaged run-folder files are refused naming the file, never trusted.

A checkpoint carries a manifest of its files' sha256 and its round
(``checkpoint/manifest.json``); ``resume`` and ``export`` check it before
anything starts. Every other read of a run-folder file (``status.json``,
``metrics.jsonl``, ``server.json``, the eval data, FedKSeed snapshots) turns
damage into one error line naming the file. Each case is one thing a disk, a
crash or a hand edit does to a file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cli.main import main
from models import attach_lora, load_causal_lm
from protocols.manifest import seal
from protocols.run_folder import CheckpointError, RunFolder, RunFolderError
from server.checkpoints import save_peft_adapter
from server.config import config_to_toml, load_config
from server.export import ExportError, export_run, max_logit_diff
from server.methods import build_spec

FINGERPRINT = "f" * 16


def _stopped_run(tmp_path: Path) -> RunFolder:
    """A tiny-llama LoRA run stopped after round 2, with its checkpoint."""
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    config = load_config(None, {"model.name": "tiny-llama", "run.rounds": 3})
    folder.config.write_text(config_to_toml(config))
    folder.write_checkpoint(
        2,
        FINGERPRINT,
        {"ledger": "[]"},
        {"a.lora_A.weight": torch.arange(64.0).reshape(8, 8)},
    )
    folder.write_status("stopped", reason="test")
    (folder.metrics).write_text('{"round": 0}\n{"round": 1}\n{"round": 2}\n')
    return folder


def _snapshot(folder: RunFolder) -> dict[str, bytes]:
    files = [folder.status_file, *sorted(folder.checkpoint_dir.iterdir())]
    return {p.name: p.read_bytes() for p in files}


def _resume_refused(folder: RunFolder, capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``pollinate resume``; check exit 2, one line, nothing written."""
    before = _snapshot(folder)
    assert main(["resume", str(folder.path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert _snapshot(folder) == before
    return err


def test_a_flipped_byte_in_checkpoint_tensors_refuses_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One flipped byte in the adapter's data still parses as safetensors (a
    different model); resume must refuse it naming the file, before the
    engine starts, and leave the checkpoint and status as they were."""
    folder = _stopped_run(tmp_path)
    tensors = folder.checkpoint_dir / "adapter.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0x40
    tensors.write_bytes(bytes(data))
    err = _resume_refused(folder, capsys)
    assert "adapter.safetensors" in err and "damaged" in err
    with pytest.raises(CheckpointError, match="adapter.safetensors"):
        folder.read_checkpoint_tensors(folder.checkpoint_record())


def test_an_edited_round_in_the_checkpoint_record_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Editing state.json's round from 2 to 3 would end the run after two
    rounds reported as completed; its hash no longer matches the manifest."""
    folder = _stopped_run(tmp_path)
    state = json.loads(folder.checkpoint_state.read_text())
    folder.checkpoint_state.write_text(json.dumps({**state, "round": 3}, indent=1))
    assert "state.json" in _resume_refused(folder, capsys)
    with pytest.raises(CheckpointError, match="state.json"):
        folder.checkpoint_round()


def test_a_checkpoint_without_its_manifest_is_not_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint folder whose manifest is missing (torn, or hand-made) is
    refused naming the manifest; so is an extra file the manifest lacks."""
    folder = _stopped_run(tmp_path)
    (folder.checkpoint_dir / "planted.safetensors").write_bytes(b"x")
    assert "planted.safetensors" in _resume_refused(folder, capsys)
    (folder.checkpoint_dir / "planted.safetensors").unlink()
    (folder.checkpoint_dir / "manifest.json").unlink()
    assert "manifest.json" in _resume_refused(folder, capsys)


def test_a_crash_mid_swap_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    """A checkpoint is swapped in whole: with the new one staged and the old
    one renamed aside (a crash between the two renames), the old one is
    still read, and the next write puts things right."""
    folder = _stopped_run(tmp_path)
    aside = folder.path / ".checkpoint.old"
    folder.checkpoint_dir.rename(aside)
    assert folder.verify_checkpoint() == 2
    folder.write_checkpoint(3, FINGERPRINT, {"ledger": "[]"}, {"w": torch.ones(2)})
    assert folder.verify_checkpoint() == 3 and not aside.exists()


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("status.json", b'{"state": "runn'),
        ("status.json", b"\x89PNG\r\n\x1a\n\x00\xff\xfe"),
        ("status.json", b'{"state": "failed", "error": ["not", "text"]}'),
        ("metrics.jsonl", b'{"round": 0}\n\xff\xfe\x00garbage\n{"round": 2}\n'),
        ("metrics.jsonl", b'{"round": 0, "eval_loss": "low"}\n'),
        ("checkpoint/state.json", b'{"round": 2, "spec_fing'),
    ],
    ids=[
        "status-truncated",
        "status-binary",
        "status-wrong-type",
        "metrics-binary",
        "metrics-wrong-type",
        "state-truncated",
    ],
)
def test_a_damaged_run_file_gives_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes
) -> None:
    """``pollinate resume`` on a folder with a truncated, binary or mistyped
    file exits 2 with one line naming the file and changes nothing."""
    folder = _stopped_run(tmp_path)
    (folder.path / name).write_bytes(content)
    before = (folder.path / name).read_bytes()
    assert main(["resume", str(folder.path)]) == 2
    err = capsys.readouterr().err.strip()
    assert Path(name).name in err and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert (folder.path / name).read_bytes() == before


@pytest.mark.parametrize(
    "content", [b'{"pid": 12', b"\x00\xff" * 20, b'{"pid": [1], "host": 2}']
)
def test_a_damaged_server_record_gives_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    """``server.json`` truncated, binary or mistyped: ``server status`` names it."""
    folder = _stopped_run(tmp_path)
    folder.server_info.write_bytes(content)
    assert main(["server", "status", str(folder.path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "server.json" in err and "Traceback" not in err, err


def test_damaged_eval_data_is_named(tmp_path: Path) -> None:
    """Binary garbage in ``data/eval.jsonl`` stops the ServerApp with an error
    naming the file, recorded in status.json (not a decoder traceback)."""
    from server.app import run_server

    folder = _stopped_run(tmp_path)
    folder.eval_data.parent.mkdir(parents=True)
    folder.eval_data.write_bytes(b"\xff\xfe\x00\x01 not text\n")
    config = load_config(folder.config)
    with pytest.raises(RunFolderError, match="eval.jsonl"):
        run_server(None, config, folder)  # type: ignore[arg-type]
    assert "eval.jsonl" in (folder.read_status().error or "")


def _lora_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "lora"
    run_dir.mkdir()
    config = load_config(None, {"model.name": "tiny-llama"})
    (run_dir / "config.toml").write_text(config_to_toml(config))
    model = attach_lora(load_causal_lm("tiny-llama").model, build_spec(config))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.fill_(0.01)
    save_peft_adapter(run_dir / "adapter", model)
    return run_dir


def test_a_nan_model_is_not_exported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An adapter with a NaN weight (sealed, so not damage: a diverged run)
    is refused by every export format, naming the parameter."""
    run_dir = _lora_run(tmp_path)
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(weights)
    bad = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[bad][0, 0] = float("nan")
    save_file(tensors, weights)
    seal(run_dir / "adapter")
    for fmt in ("adapter", "merged", "onnx"):
        out = tmp_path / f"out-{fmt}"
        assert main(["export", str(run_dir), "--format", fmt, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert bad in err and "NaN" in err and "Traceback" not in err, err
        assert not out.exists()


def test_a_flipped_byte_in_the_final_adapter_refuses_export(tmp_path: Path) -> None:
    """The final adapter is sealed when written; a changed byte is named."""
    run_dir = _lora_run(tmp_path)
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(RunFolderError, match="adapter_model.safetensors"):
        export_run(run_dir, tmp_path / "out", "merged")
    assert not (tmp_path / "out").exists()


def test_the_onnx_check_fails_on_nan_differences() -> None:
    """``NaN > 1e-3`` is false: a NaN logit must fail the check, not pass it."""
    want = np.zeros((1, 2, 3), dtype=np.float32)
    keep = np.ones((1, 2), dtype=bool)
    assert max_logit_diff(want + 1e-5, want, keep) < 1e-3
    got = want.copy()
    got[0, 1, 2] = np.nan
    with pytest.raises(ExportError, match="NaN"):
        max_logit_diff(got, want, keep)
    with pytest.raises(ExportError, match="NaN"):
        max_logit_diff(want, got, keep)
    with pytest.raises(ExportError, match="differ"):
        max_logit_diff(want + 1.0, want, keep)


def test_a_damaged_fedkseed_snapshot_is_refused_naming_it(tmp_path: Path) -> None:
    """A node's synced-model snapshot with a flipped byte would put the node on
    a different model than the server's; restoring from it is refused naming
    the file, the file is removed, and the weights go back to w0."""
    from client.zo_state import OutOfSyncError, ZoModelState
    from protocols import state_hash

    config = load_config(
        None,
        {
            "run.method": "fedkseed",
            "model.name": "tiny-llama",
            "zo.include": ["model.layers.1.*"],
        },
    )
    state = ZoModelState(build_spec(config), torch.device("cpu"), tmp_path / "snap")
    w0 = state.hash
    state._write_snapshot()
    (snapshot,) = (tmp_path / "snap").glob("round-*.safetensors")
    data = bytearray(snapshot.read_bytes())
    data[-7] ^= 0x10
    snapshot.write_bytes(bytes(data))
    with torch.no_grad():
        state.params[0][1].add_(1.0)  # local training moved the weights
    state.mark_trained()
    with pytest.raises(OutOfSyncError, match=snapshot.name):
        state.restore()
    assert not snapshot.exists()
    assert state_hash(state.params) == w0 and state.round == 0
