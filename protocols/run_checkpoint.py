"""A run's checkpoint: the last completed round's server state, swapped in whole.

``checkpoint/`` in a run folder holds::

    state.json      the round, the spec fingerprint, the tensor file's name
                    (None when the method's state needs no tensors, as
                    FedKSeed's seed history), the extra tensor files' names
                    (``extra_tensors``, only when there are any) and the
                    method's own state
    <tensors>       one safetensors file, in the order it was written
    <extra>         more safetensors files of the same state (a LoRA server
                    optimizer's moments), each named in ``extra_tensors``
    manifest.json   the sha256 of both and the round, written last

A new checkpoint is built in ``.checkpoint.new`` beside it (tensors, then
``state.json``, then the manifest, :mod:`protocols.manifest`) and swapped in
whole (:func:`protocols.durable.replace_dir`): a crash leaves the previous
checkpoint or the new one, never a mix. Every read checks the files against
the manifest and raises a :class:`CheckpointError` naming the file.

:class:`protocols.run_folder.RunFolder`, the run folder's one owner, asks a
:class:`Checkpoint` for all of this; its checkpoint methods are the API.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from protocols.durable import (
    atomic_write_bytes,
    atomic_write_text,
    committed_dir,
    replace_dir,
)
from protocols.manifest import (
    Manifest,
    ManifestError,
    manifest_path,
    read_manifest,
    seal,
    verified_bytes,
    verify,
)
from protocols.run_errors import CheckpointError, RunFolderError, one_line
from protocols.run_json import parse_json_object

if TYPE_CHECKING:  # torch is imported where tensors are read or written:
    import torch  # an edge client reads its run folder without torch

__all__ = ["CHECKPOINT_DIR", "STATE_FILE", "Checkpoint", "safetensors_bytes"]

CHECKPOINT_DIR = "checkpoint"
"""The checkpoint's folder in a run folder."""

STATE_FILE = "state.json"
"""The checkpoint's state record in its folder."""

_STAGE_DIR = ".checkpoint.new"  # in the run folder: the checkpoint being built


def safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]
) -> bytes:
    """``tensors`` (moved to the CPU) and ``meta`` as one safetensors file's bytes."""
    from safetensors.torch import save

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save(cpu, metadata=dict(meta))


class Checkpoint:
    """The checkpoint of the run folder ``run`` (see the module docstring).

    Parameters
    ----------
    run : Path
        The run folder; nothing is created until :meth:`write`.
    """

    def __init__(self, run: Path) -> None:
        self.run = Path(run)
        self.path = self.run / CHECKPOINT_DIR

    @property
    def state_file(self) -> Path:
        """``checkpoint/state.json``."""
        return self.path / STATE_FILE

    def manifest(self) -> Manifest | None:
        """The committed checkpoint's manifest; None when there is no checkpoint.

        Raises
        ------
        CheckpointError
            If a checkpoint folder exists without a valid manifest.
        """
        live = committed_dir(self.path)
        if not live.is_dir():
            return None
        if not (live / STATE_FILE).exists() and not manifest_path(live).exists():
            return None
        try:
            return read_manifest(live)
        except ManifestError as exc:
            raise CheckpointError(f"not a usable checkpoint: {exc}") from None

    @staticmethod
    def _bytes(manifest: Manifest, name: str) -> bytes:
        try:
            return verified_bytes(manifest, name)
        except ManifestError as exc:
            raise CheckpointError(str(exc)) from None

    def last_round(self) -> int | None:
        """The round of the checkpoint, or None when there is none.

        Raises
        ------
        CheckpointError
            If ``state.json`` or the manifest is damaged.
        """
        if self.manifest() is None:
            return None
        return int(self.record()["round"])

    def verify(self) -> int | None:
        """Hash every file of the checkpoint; return its round (None: no checkpoint).

        Raises
        ------
        CheckpointError
            If a file is missing, changed, unlisted or damaged (named).
        """
        if self.manifest() is None:
            return None
        try:
            verify(committed_dir(self.path))
        except ManifestError as exc:
            raise CheckpointError(str(exc)) from None
        state = self.record()
        if state["tensors"] is not None:
            self.tensors(state)
        for name in state.get("extra_tensors", ()):
            self.tensors(state, file=name)
        return int(state["round"])

    def write(
        self,
        server_round: int,
        spec_fingerprint: str,
        state: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor] | None = None,
        *,
        filename: str = "adapter.safetensors",
        extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> Path:
        """Write the round's server state (and its tensors); return the folder.

        ``state.json`` records the round, the spec fingerprint and the tensor
        file (``None`` when ``tensors`` is None) beside ``state``'s own keys;
        ``extra_tensors`` (file name -> tensors) become more safetensors
        files of the same checkpoint, listed in ``extra_tensors``.

        Raises
        ------
        CheckpointError
            If ``state`` holds a non-finite number or a reserved key, or a
            tensor file name is not a plain file name or is used twice.
        """
        reserved = {"round", "spec_fingerprint", "tensors", "extra_tensors"}
        if reserved & set(state):
            raise CheckpointError(
                f"checkpoint state may not set {sorted(reserved & set(state))}"
            )
        extra = dict(extra_tensors or {})
        for name in (filename, *extra):
            if not _plain_name(name) or name == STATE_FILE:
                raise CheckpointError(f"bad checkpoint tensor file name {name!r}")
        if tensors is not None and filename in extra:
            raise CheckpointError(f"checkpoint tensor file {filename!r} given twice")
        record = {
            "round": server_round,
            "spec_fingerprint": spec_fingerprint,
            "tensors": filename if tensors is not None else None,
            **({"extra_tensors": sorted(extra)} if extra else {}),
            **state,
        }
        try:
            text = json.dumps(record, indent=1, allow_nan=False)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint state is not finite: {exc}") from None
        stage = self.run / _STAGE_DIR
        shutil.rmtree(stage, ignore_errors=True)  # a crash's leftover
        stage.mkdir(parents=True)
        if tensors is not None:
            meta = {"round": str(server_round), "spec": spec_fingerprint}
            atomic_write_bytes(stage / filename, safetensors_bytes(tensors, meta))
        for name, more in extra.items():
            meta = {"round": str(server_round), "spec": spec_fingerprint}
            atomic_write_bytes(stage / name, safetensors_bytes(more, meta))
        atomic_write_text(stage / STATE_FILE, text)
        seal(stage, {"round": server_round, "spec_fingerprint": spec_fingerprint})
        replace_dir(stage, self.path)
        return self.path

    def record(self) -> dict[str, Any]:
        """``state.json`` as written, checked against the manifest.

        Raises
        ------
        CheckpointError
            If there is none, or it is damaged (the message names the file).
        """
        manifest = self.manifest()
        if manifest is None:
            raise CheckpointError(
                f"no checkpoint in {self.run} (looked for {self.state_file})"
            )
        path = manifest.root / STATE_FILE
        data = self._bytes(manifest, STATE_FILE)
        try:
            state = parse_json_object(data, path)
        except RunFolderError as exc:
            raise CheckpointError(str(exc)) from None
        rnd = _round_of(state, path)
        if manifest.meta.get("round") != rnd:
            raise CheckpointError(
                f"{path} is damaged: round {rnd}, its manifest says "
                f"{manifest.meta.get('round')!r}"
            )
        if not isinstance(state.get("spec_fingerprint"), str):
            raise CheckpointError(f"{path} is damaged: no spec fingerprint")
        name = state.get("tensors")
        if name is not None and not _plain_name(name):
            raise CheckpointError(f"{path} is damaged: tensors is {name!r}")
        extra = state.get("extra_tensors", [])
        if not isinstance(extra, list) or not all(_plain_name(n) for n in extra):
            raise CheckpointError(f"{path} is damaged: extra_tensors is {extra!r}")
        return state

    def read(self, spec_fingerprint: str) -> dict[str, Any]:
        """The checkpoint state, checked against the run's spec.

        Raises
        ------
        CheckpointError
            If there is none, it is damaged, or it belongs to another spec.
        """
        state = self.record()
        if state.get("spec_fingerprint") != spec_fingerprint:
            raise CheckpointError(
                f"{self.state_file} was written for spec "
                f"{state.get('spec_fingerprint')}, this run's spec is "
                f"{spec_fingerprint}: the config changed since the checkpoint"
            )
        return state

    def tensors(
        self, state: Mapping[str, Any], *, file: str | None = None
    ) -> dict[str, torch.Tensor]:
        """The tensors ``state`` names, verified, finite, in the file's order.

        ``file`` picks one of the state's ``extra_tensors`` files instead of
        its main tensor file.

        Raises
        ------
        CheckpointError
            If the state names no such tensor file, the file differs from the
            manifest or is unreadable, or a tensor holds NaN/Inf.
        """
        import torch

        name = state.get("tensors") if file is None else file
        listed = file is None or file in state.get("extra_tensors", ())
        if not isinstance(name, str) or not _plain_name(name) or not listed:
            raise CheckpointError(
                f"{self.state_file} names no tensor file "
                f"({'tensors' if file is None else 'extra_tensors'}: {name!r})"
            )
        manifest = self.manifest()
        if manifest is None:
            raise CheckpointError(f"no checkpoint in {self.run}")
        path = manifest.root / name
        data = self._bytes(manifest, name)
        try:
            tensors = _load_in_file_order(data)
        except (SafetensorError, ValueError, KeyError, OSError) as exc:
            raise CheckpointError(f"{path} is damaged: {one_line(exc)}") from None
        for key, value in tensors.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{path}: tensor {key!r} holds NaN or Inf")
        return tensors


def _load_in_file_order(data: bytes) -> dict[str, torch.Tensor]:
    """Safetensors ``data`` as tensors in the file's order, as ``load_file`` gives.

    ``safetensors.torch.load`` orders by name; the tensor layout a checkpoint
    is checked against is the order the tensors were written in (by offset).
    """
    from safetensors.torch import load

    tensors = load(data)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    offset = {k: v["data_offsets"][0] for k, v in header.items() if k in tensors}
    return {k: tensors[k] for k in sorted(tensors, key=lambda k: (offset[k], k))}


def _plain_name(name: object) -> bool:
    """A file name inside the checkpoint folder: no path, not hidden."""
    return isinstance(name, str) and bool(name) and "/" not in name and name[0] != "."


def _round_of(state: Mapping[str, Any], path: Path) -> int:
    rnd = state.get("round")
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        raise CheckpointError(f"{path} is damaged: 'round' is {rnd!r}")
    return rnd
