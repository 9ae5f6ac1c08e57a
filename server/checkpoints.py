"""Run-folder files written so that a crash never leaves a torn one.

Every write goes to a temporary file in the target folder, is flushed to disk,
then renamed over the target (``os.replace`` is atomic on POSIX), so a reader
sees the old file or the new one, never half of either. ``metrics.jsonl`` is
appended one fsync'ed line per round.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import save

from protocols import LoraSpec

__all__ = [
    "CheckpointError",
    "MetricsLog",
    "atomic_write_bytes",
    "read_checkpoint",
    "read_checkpoint_tensors",
    "save_checkpoint",
    "save_checkpoint_tensors",
    "save_peft_adapter",
    "write_tensors",
    "write_status",
]


class CheckpointError(RuntimeError):
    """A run folder has no usable checkpoint, or one of another run."""


def read_checkpoint(run_dir: Path, spec_fingerprint: str) -> dict[str, Any]:
    """The checkpoint state of ``run_dir``, checked against the run's spec.

    Raises
    ------
    CheckpointError
        If there is no checkpoint or it belongs to another spec.
    """
    path = run_dir / "checkpoint" / "state.json"
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"no checkpoint in {run_dir} (looked for {path})"
        ) from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if state.get("spec_fingerprint") != spec_fingerprint:
        raise CheckpointError(
            f"{path} was written for spec {state.get('spec_fingerprint')}, this run's "
            f"spec is {spec_fingerprint}: the config changed since the checkpoint"
        )
    return state


def read_checkpoint_tensors(
    run_dir: Path, state: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The tensors a :func:`save_checkpoint_tensors` checkpoint names."""
    from safetensors.torch import load_file

    path = run_dir / "checkpoint" / str(state.get("tensors", "adapter.safetensors"))
    try:
        return load_file(path)
    except (FileNotFoundError, OSError) as exc:
        raise CheckpointError(f"checkpoint tensors unreadable: {path}: {exc}") from exc


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], meta: dict[str, str]
) -> bytes:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save(cpu, metadata=meta)


def write_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], meta: dict[str, str]
) -> None:
    """Write tensors as one safetensors file, atomically."""
    atomic_write_bytes(path, _safetensors_bytes(tensors, meta))


def save_checkpoint(
    run_dir: Path,
    server_round: int,
    adapter: Mapping[str, torch.Tensor],
    spec: LoraSpec,
    extra: Mapping[str, Any],
) -> Path:
    """Write the round's global adapter and state (see :func:`save_checkpoint_tensors`)."""
    return save_checkpoint_tensors(
        run_dir, server_round, adapter, spec.fingerprint(), extra
    )


def save_checkpoint_tensors(
    run_dir: Path,
    server_round: int,
    tensors: Mapping[str, torch.Tensor],
    spec_fingerprint: str,
    extra: Mapping[str, Any],
    filename: str = "adapter.safetensors",
) -> Path:
    """Write the round's global tensors and state to ``run_dir/checkpoint``.

    The tensor file is replaced first, then ``state.json`` (which names the
    round), so ``state.json`` never points at tensors that are not there.
    """
    folder = run_dir / "checkpoint"
    meta = {"round": str(server_round), "spec": spec_fingerprint}
    atomic_write_bytes(folder / filename, _safetensors_bytes(tensors, meta))
    state = {
        "round": server_round,
        "spec_fingerprint": spec_fingerprint,
        "tensors": filename,
        **extra,
    }
    atomic_write_bytes(folder / "state.json", json.dumps(state, indent=1).encode())
    return folder


def save_peft_adapter(folder: Path, model: PeftModel) -> Path:
    """Write ``model``'s adapter as a PEFT folder, replacing ``folder`` whole.

    ``PeftModel.from_pretrained(base, folder)`` loads the result. The folder
    is built beside the target and renamed into place.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    model.save_pretrained(tmp)
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return folder


def write_status(run_dir: Path, state: str, **fields: Any) -> None:
    """Record the run's state in status.json: "running", "completed", "failed", "stopped"."""
    atomic_write_bytes(
        run_dir / "status.json",
        json.dumps({"state": state, **fields}, indent=1).encode(),
    )


class MetricsLog:
    """Appends one JSON object per round to ``metrics.jsonl``, durably."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, server_round: int) -> None:
        """Drop rows past ``server_round`` (and a torn last line), atomically."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash
            if int(row.get("round", -1)) <= server_round:
                kept.append(line)
        atomic_write_bytes(self.path, "".join(f"{k}\n" for k in kept).encode())

    def append(self, row: Mapping[str, Any]) -> None:
        """Append ``row`` as one line and fsync it."""
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(dict(row), allow_nan=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
