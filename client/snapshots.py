"""How a FedKSeed node stays synced: replay, hash proof and snapshots.

Both FedKSeed clients (the torch one, :mod:`client.zo_state`, and the edge
one, :mod:`client.edge.state`) follow the same rules (:class:`SyncedSeedModel`)
and write the synced perturbed parameters once per round to
``<root>/<run id>-<spec fingerprint>/round-<round>-<hash>.safetensors``,
resuming a fresh process from the newest usable one. This module owns those
rules, the naming, the choice of snapshot and the pruning; it imports no
torch, so a device without torch uses it too.

``<root>`` is the node's state directory: a simulated node's run-folder
scratch space, else ``$POLLINATE_ZO_STATE_DIR`` (the client daemon sets it to
its ``--state-dir``).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from protocols.durable import atomic_write
from protocols.errors import OutOfSyncError
from protocols.model_hash import state_hash
from protocols.specs import ZOSpec
from protocols.zo_messages import ZoTrainIns

__all__ = [
    "ZO_STATE_ENV",
    "SyncedSeedModel",
    "best_snapshot",
    "prune_snapshots",
    "snapshot_folder",
    "snapshot_path",
    "state_root",
]

ZO_STATE_ENV = "POLLINATE_ZO_STATE_DIR"
KEEP = 2
"""Snapshots kept per folder (the newest)."""


def state_root(root: Path | str | None) -> Path | None:
    """``root``, else ``$POLLINATE_ZO_STATE_DIR``, else None."""
    base = root or os.environ.get(ZO_STATE_ENV)
    return Path(base) if base else None


def snapshot_folder(root: Path | str, run_id: int, fingerprint: str) -> Path:
    """The snapshot folder of one run and spec under ``root`` (shared per machine)."""
    return Path(root) / f"{run_id}-{fingerprint}"


def snapshot_path(folder: Path, round_: int, hash_: str) -> Path:
    """The snapshot of the model synced to ``round_`` with hash ``hash_``."""
    return folder / f"round-{round_:06d}-{hash_}.safetensors"


def best_snapshot(folder: Path, base: int, target: int) -> tuple[int, str, Path] | None:
    """The newest snapshot with ``base <= round <= target``: (round, hash, path).

    Files in ``folder`` that are not named like a snapshot are ignored; the
    content is not checked here (the reader checks it by hash).
    """
    best = None
    for path in folder.glob("round-*.safetensors"):
        parts = path.stem.split("-")
        if len(parts) != 3 or not parts[1].isdigit():
            continue  # not a snapshot of ours
        r, h = int(parts[1]), parts[2]
        if base <= r <= target and (best is None or r > best[0]):
            best = (r, h, path)
    return best


def prune_snapshots(folder: Path, keep: int = KEEP) -> None:
    """Remove all but the newest ``keep`` snapshots of ``folder``."""
    for old in sorted(folder.glob("round-*.safetensors"))[:-keep]:
        old.unlink(missing_ok=True)


class SyncedSeedModel(ABC):
    """A FedKSeed node's copy of the global model and the round it is synced to.

    The sync rules both clients follow, over their own arrays (torch tensors
    on the torch client, NumPy arrays bound to ONNX Runtime on the edge one):
    catch up from the newest usable snapshot or from w0, replay each round of
    the instruction's history in order, prove the result hashes to the
    server's, and write the round's snapshot; after local training, read the
    synced weights back. A snapshot is trusted only after its content hashes
    to the hash in its name: a damaged one is removed and refused with an
    :class:`~protocols.errors.OutOfSyncError` naming the file, and the weights
    are reset to w0, so they never hold half a snapshot.

    Subclasses set ``params``, ``seeds`` and ``snapshot_dir`` and call
    :meth:`_start`; they provide the array operations: :meth:`_apply` (one
    round's replay), :meth:`_load_w0`, :meth:`_save` and :meth:`_load`.
    """

    params: Sequence[tuple[str, Any]]
    seeds: Sequence[int]
    snapshot_dir: Path
    round: int
    hash: str
    dirty: bool

    def _start(self) -> None:
        """At w0: round 0, its hash, no local training held."""
        self.round, self.hash, self.dirty = 0, state_hash(self.params), False

    # -- what each runtime provides --------------------------------------------
    @abstractmethod
    def _apply(self, seeds: list[int], coefficients: list[float]) -> None:
        """Replay one round: ``p += sum_j c_j z(seeds[j])`` (rule 6), in place."""

    @abstractmethod
    def _load_w0(self) -> None:
        """Write w0 into the parameters, in place."""

    @abstractmethod
    def _save(self, tmp: Path) -> None:
        """Write the parameters to the safetensors file ``tmp``."""

    @abstractmethod
    def _load(self, path: Path) -> None:
        """Copy the safetensors file ``path`` into the parameters, in place.

        Raises ``OSError``, ``ValueError``, ``TypeError``, ``RuntimeError`` or
        a safetensors error on a damaged file.
        """

    @abstractmethod
    def check_spec(self, spec: ZOSpec) -> None:
        """Refuse an instruction's spec this model was not built for (a ProtocolError)."""

    # -- the rules -------------------------------------------------------------
    def _reset_to_w0(self) -> None:
        self._load_w0()
        self._start()

    def _write_snapshot(self) -> None:
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        path = snapshot_path(self.snapshot_dir, self.round, self.hash)
        if path.exists():
            return
        atomic_write(path, self._save)
        prune_snapshots(self.snapshot_dir)

    def _read_snapshot(self, path: Path, hash_: str) -> None:
        try:
            self._load(path)
            problem = "" if state_hash(self.params) == hash_ else "hash differs"
        except (SafetensorError, OSError, RuntimeError, TypeError, ValueError) as exc:
            problem = " ".join(str(exc).split())
        if problem:
            path.unlink(missing_ok=True)
            self._reset_to_w0()
            raise OutOfSyncError(f"{path} is damaged ({problem}): removed it")

    def restore(self) -> None:
        """Return the weights to the synced global model after local training."""
        if self.dirty:
            self.dirty = False
            path = snapshot_path(self.snapshot_dir, self.round, self.hash)
            self._read_snapshot(path, self.hash)

    def mark_trained(self) -> None:
        """Record that the weights now hold local training (restore before syncing)."""
        self.dirty = True

    def sync(self, ins: ZoTrainIns) -> None:
        """Bring the model to ``ins.target_round`` and check its hash.

        Raises
        ------
        OutOfSyncError
            If the held state cannot be advanced with the history received, or
            the result's hash differs from the server's (state reset to w0).
        ProtocolError
            If the spec is refused by :meth:`check_spec` or the history names
            a seed outside the pool.
        """
        self.check_spec(ins.spec)
        self.restore()
        if not ins.base_round <= self.round <= ins.target_round:
            best = best_snapshot(self.snapshot_dir, ins.base_round, ins.target_round)
            if best is not None:
                self._read_snapshot(best[2], best[1])
                self.round, self.hash = best[0], best[1]
            elif ins.base_round == 0:
                self._reset_to_w0()
            else:
                raise OutOfSyncError(
                    f"node holds round {self.round}; history starts after round "
                    f"{ins.base_round}: resend from round 0"
                )
        for delta in ins.history:
            if delta.round > self.round:
                seeds = [self.seeds[i] for i in delta.indices.tolist()]
                self._apply(seeds, delta.coefficients.tolist())
                self.round = delta.round
        self.round = ins.target_round
        self.hash = state_hash(self.params)
        if self.hash != ins.target_hash:
            bad = self.hash
            self._reset_to_w0()
            raise OutOfSyncError(
                f"after replay to round {ins.target_round} the model hash is {bad}, "
                f"the server's is {ins.target_hash}"
            )
        self._write_snapshot()
