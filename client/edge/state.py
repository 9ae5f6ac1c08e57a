"""An edge node's copy of the seed-rebuilt global model, kept in sync across rounds.

The edge twin of :class:`client.zo_state.ZoModelState`, over an
:class:`~client.edge.engine.EdgeModel`'s NumPy arrays instead of torch
tensors: the model starts at the bundle's w0, replays the server's round
deltas with :func:`protocols.seed_arrays.apply_seed_sum_arrays` (bit-identical
to the torch replay) in the instruction's order, and proves every round that
its :func:`~protocols.model_hash.state_hash` is the server's.

After local training the arrays are read back from the round's snapshot
(``safetensors.numpy``, written atomically once per round; naming, choice and
pruning, like every sync rule, as every FedKSeed client does them:
:class:`client.snapshots.SyncedSeedModel`). A fresh
process resumes from the newest usable snapshot. A snapshot is trusted only
after its content hashes to the hash in its name; a damaged one is removed and
refused with an :class:`~protocols.errors.OutOfSyncError` naming the file.

The arrays are bound to the ONNX Runtime session once, so every change here
is in place (``np.copyto``), never a new array. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from client.edge.engine import EdgeModel
from client.snapshots import SyncedSeedModel
from protocols.philox import candidate_seeds
from protocols.seed_arrays import apply_seed_sum_arrays
from protocols.specs import ZOSpec

__all__ = ["EdgeZoState"]


class EdgeZoState(SyncedSeedModel):
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
        self._start()

    def check_spec(self, spec: ZOSpec) -> None:
        """Refuse a server spec that is not the bundle's (``EdgeBundleError`` naming the field)."""
        self.bundle.check_spec(spec)

    # -- the NumPy operations of SyncedSeedModel ---------------------------------
    def _apply(self, seeds: list[int], coefficients: list[float]) -> None:
        apply_seed_sum_arrays(self.params, seeds, coefficients)

    def _load_w0(self) -> None:
        for (_, p), (_, w0) in zip(self.params, self.bundle.load_w0(), strict=True):
            np.copyto(p, w0, casting="no")

    def _save(self, tmp: Path) -> None:
        save_file(dict(self.params), str(tmp))

    def _load(self, path: Path) -> None:
        with safe_open(str(path), framework="np") as f:
            for name, p in self.params:  # one tensor in memory at a time
                np.copyto(p, f.get_tensor(name), casting="no")
