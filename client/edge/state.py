"""An edge node's copy of the seed-rebuilt global model, kept in sync across rounds.

The edge twin of :class:`client.zo_state.ZoModelState`, over an
:class:`~client.edge.engine.EdgeModel`'s NumPy arrays instead of torch
tensors: the model starts at the bundle's w0, replays the server's round
deltas with :func:`protocols.seed_arrays.apply_seed_sum_arrays` (bit-identical
to the torch replay) in the instruction's order, and proves every round that
its :func:`~protocols.model_hash.state_hash` is the server's.

After local training the arrays are read back from the round's snapshot
(``safetensors.numpy``, written atomically once per round; naming, choice and
pruning as every FedKSeed client does them, :mod:`client.snapshots`). A fresh
process resumes from the newest usable snapshot. A snapshot is trusted only
after its content hashes to the hash in its name; a damaged one is removed and
refused with an :class:`~protocols.errors.OutOfSyncError` naming the file.

The arrays are bound to the ONNX Runtime session once, so every change here
is in place (``np.copyto``), never a new array. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from client.edge.engine import EdgeModel
from client.snapshots import best_snapshot, prune_snapshots, snapshot_path
from protocols.durable import atomic_write
from protocols.errors import OutOfSyncError
from protocols.model_hash import state_hash
from protocols.philox import candidate_seeds
from protocols.seed_arrays import apply_seed_sum_arrays
from protocols.zo_messages import ZoTrainIns

__all__ = ["EdgeZoState"]


class EdgeZoState:
    """One process's edge model for one bundle and run, with its synced round.

    Parameters
    ----------
    model
        The opened bundle (its arrays at w0).
    snapshot_dir
        Shared snapshot folder (one per run and spec fingerprint).
    """

    def __init__(self, model: EdgeModel, snapshot_dir: Path) -> None:
        self.model = model
        self.bundle = model.bundle
        self.params = model.params()
        self.seeds = candidate_seeds(
            self.bundle.spec.master_seed, self.bundle.spec.num_seeds
        )
        self.snapshot_dir = snapshot_dir
        self.round = 0
        self.hash = state_hash(self.params)
        self.dirty = False  # True while the arrays hold local (unsynced) training

    # -- snapshots ------------------------------------------------------------
    def _write_snapshot(self) -> None:
        path = snapshot_path(self.snapshot_dir, self.round, self.hash)
        if path.exists():
            return
        arrays = dict(self.params)
        atomic_write(path, lambda tmp: save_file(arrays, str(tmp)))
        prune_snapshots(self.snapshot_dir)

    def _read_snapshot(self, path: Path, hash_: str) -> None:
        """Copy ``path`` into the arrays and check they hash to ``hash_``.

        Raises
        ------
        OutOfSyncError
            If the file is damaged (it is removed; the arrays are then reset
            to w0, so they never hold half a snapshot).
        """
        try:
            with safe_open(str(path), framework="np") as f:
                for name, p in self.params:  # one tensor in memory at a time
                    np.copyto(p, f.get_tensor(name), casting="no")
            problem = "" if state_hash(self.params) == hash_ else "hash differs"
        except (SafetensorError, OSError, TypeError, ValueError) as exc:
            problem = " ".join(str(exc).split())
        if problem:
            path.unlink(missing_ok=True)
            self._reset_to_w0()
            raise OutOfSyncError(f"{path} is damaged ({problem}): removed it")

    # -- sync -----------------------------------------------------------------
    def _reset_to_w0(self) -> None:
        for (_, p), (_, w0) in zip(self.params, self.bundle.load_w0(), strict=True):
            np.copyto(p, w0, casting="no")
        self.round, self.hash, self.dirty = 0, state_hash(self.params), False

    def restore(self) -> None:
        """Return the arrays to the synced global model after local training."""
        if self.dirty:
            self.dirty = False
            path = snapshot_path(self.snapshot_dir, self.round, self.hash)
            self._read_snapshot(path, self.hash)

    def mark_trained(self) -> None:
        """Record that the arrays now hold local training (restore before syncing)."""
        self.dirty = True

    def sync(self, ins: ZoTrainIns) -> None:
        """Bring the model to ``ins.target_round`` and check its hash.

        Raises
        ------
        EdgeBundleError
            If the instruction's spec is not the bundle's (naming the field).
        OutOfSyncError
            If the held state cannot be advanced with the history received, or
            the result's hash differs from the server's (state reset to w0).
        ProtocolError
            If the history names a seed outside the pool.
        """
        self.bundle.check_spec(ins.spec)
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
                apply_seed_sum_arrays(self.params, seeds, delta.coefficients.tolist())
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
