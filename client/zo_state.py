"""A node's copy of the seed-rebuilt global model, kept in sync across rounds.

FedKSeed clients never receive weights: they start from w0 (the pretrained
model) and apply the same round deltas as the server, in the same order, so
their model is bit-identical to the server's (checked by hash every round).

Local training moves the weights away from the global model. Rather than hold
a second copy in memory, the synced perturbed parameters are written to a
snapshot file once per round (atomically, one tensor at a time) and read back
after training. Snapshots live in a folder per spec fingerprint that every
process on the machine shares, named by round and hash; a process that starts
fresh (a new Ray actor, or a SuperNode's per-message process) resumes from the
newest usable snapshot instead of replaying from w0.

A snapshot is trusted only after its content hashes to the model hash in its
name: a damaged one (truncated, flipped bytes, foreign tensors) is removed and
refused with an :class:`OutOfSyncError` naming the file, so the node replays
from w0 or asks for a resend instead of training on the wrong model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from client.snapshots import best_snapshot, prune_snapshots, snapshot_path
from models.zo_model import write_w0_, zo_model_for
from protocols import SpecMismatchError, ZOSpec, state_hash
from protocols.durable import atomic_write
from protocols.errors import OutOfSyncError
from protocols.seeds import (
    GENERATOR_VERSION,
    apply_seed_sum_,
    candidate_seeds,
)
from protocols.zo_messages import ZoTrainIns

__all__ = ["OutOfSyncError", "ZoModelState"]


class ZoModelState:
    """One process's model for one :class:`ZOSpec`, with its synced round.

    Parameters
    ----------
    spec : ZOSpec
        The run's spec; the model's parameter walk must match it.
    device : torch.device
        Where the model lives.
    snapshot_dir : Path
        Shared snapshot folder (one per spec fingerprint).
    """

    def __init__(self, spec: ZOSpec, device: torch.device, snapshot_dir: Path) -> None:
        if spec.generator != GENERATOR_VERSION:
            raise SpecMismatchError(
                f"spec asks for generator {spec.generator!r}, this node has {GENERATOR_VERSION!r}"
            )
        loaded = zo_model_for(spec, device)
        walk = loaded.walk
        if walk.fingerprint() != spec.walk_fingerprint:
            raise SpecMismatchError(
                f"parameter walk {walk.fingerprint()} of model {spec.model!r} with include "
                f"{list(spec.include)} and adapter rank {spec.adapter_rank} differs "
                f"from the spec's {spec.walk_fingerprint}"
            )
        self.spec = spec
        self.device = device
        self.model: PreTrainedModel = loaded.model
        self.tokenizer: PreTrainedTokenizerBase = loaded.tokenizer
        self.params = walk.params(loaded.model)
        self.seeds = candidate_seeds(spec.master_seed, spec.num_seeds)
        self.snapshot_dir = snapshot_dir
        self.round = 0
        self.hash = state_hash(self.params)
        self.dirty = False  # True while the weights hold local (unsynced) training

    # -- snapshots ------------------------------------------------------------
    def _snapshot_path(self, round_: int, hash_: str) -> Path:
        return snapshot_path(self.snapshot_dir, round_, hash_)

    def _write_snapshot(self) -> None:
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        path = self._snapshot_path(self.round, self.hash)
        if path.exists():
            return
        cpu = {n: p.detach().to("cpu").contiguous() for n, p in self.params}
        atomic_write(path, lambda tmp: save_file(cpu, tmp))
        prune_snapshots(self.snapshot_dir)  # keep the newest two

    def _read_snapshot(self, path: Path, hash_: str) -> None:
        """Load ``path`` into the parameters and check it hashes to ``hash_``.

        Raises
        ------
        OutOfSyncError
            If the file is damaged (it is removed; the weights are then reset
            to w0, so they never hold half a snapshot).
        """
        try:
            with torch.no_grad(), safe_open(str(path), framework="pt") as f:
                for name, p in self.params:
                    p.copy_(f.get_tensor(name))  # one tensor in memory at a time
            problem = "" if state_hash(self.params) == hash_ else "hash differs"
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            problem = " ".join(str(exc).split())
        if problem:
            path.unlink(missing_ok=True)
            self._reset_to_w0()
            raise OutOfSyncError(f"{path} is damaged ({problem}): removed it")

    def _best_snapshot(self, base: int, target: int) -> tuple[int, str, Path] | None:
        return best_snapshot(self.snapshot_dir, base, target)

    # -- sync -----------------------------------------------------------------
    def _reset_to_w0(self) -> None:
        write_w0_(self.spec, self.params)
        self.round, self.hash, self.dirty = 0, state_hash(self.params), False

    def restore(self) -> None:
        """Return the weights to the synced global model after local training."""
        if self.dirty:
            self.dirty = False
            self._read_snapshot(self._snapshot_path(self.round, self.hash), self.hash)

    def sync(self, ins: ZoTrainIns) -> None:
        """Bring the model to ``ins.target_round`` and check its hash.

        Raises
        ------
        OutOfSyncError
            If the held state cannot be advanced with the history received, or
            the result's hash differs from the server's (state reset to w0).
        """
        self.restore()
        if not ins.base_round <= self.round <= ins.target_round:
            best = self._best_snapshot(ins.base_round, ins.target_round)
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
                apply_seed_sum_(self.params, seeds, delta.coefficients.tolist())
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

    def mark_trained(self) -> None:
        """Record that the weights now hold local training (restore before syncing)."""
        self.dirty = True

    def perturbed(self) -> Sequence[tuple[str, torch.Tensor]]:
        """The perturbed parameters in walk order."""
        return self.params
