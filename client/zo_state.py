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
newest usable snapshot instead of replaying from w0. Those rules are
:class:`client.snapshots.SyncedSeedModel`'s, which the edge client follows
too; this module supplies the torch operations.

A snapshot is trusted only after its content hashes to the model hash in its
name: a damaged one (truncated, flipped bytes, foreign tensors) is removed and
refused with an :class:`OutOfSyncError` naming the file, so the node replays
from w0 or asks for a resend instead of training on the wrong model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from client.snapshots import SyncedSeedModel
from models.zo_model import write_w0_, zo_model_for
from protocols import SpecMismatchError, ZOSpec
from protocols.errors import OutOfSyncError
from protocols.seeds import (
    GENERATOR_VERSION,
    apply_seed_sum_,
    candidate_seeds,
)

__all__ = ["OutOfSyncError", "ZoModelState"]


class ZoModelState(SyncedSeedModel):
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
        self.params: list[tuple[str, torch.Tensor]] = walk.params(loaded.model)
        self.seeds = candidate_seeds(spec.master_seed, spec.num_seeds)
        self.snapshot_dir = snapshot_dir
        self._start()

    def check_spec(self, spec: ZOSpec) -> None:
        """Refuse a spec other than the one this model was built for."""
        if spec.fingerprint() != self.spec.fingerprint():
            raise SpecMismatchError(
                f"spec {spec.fingerprint()} is not the {self.spec.fingerprint()} "
                "this node's model was built for"
            )

    # -- the torch operations of SyncedSeedModel ---------------------------------
    def _apply(self, seeds: list[int], coefficients: list[float]) -> None:
        apply_seed_sum_(self.params, seeds, coefficients)

    def _load_w0(self) -> None:
        write_w0_(self.spec, self.params)

    def _save(self, tmp: Path) -> None:
        cpu = {n: p.detach().to("cpu").contiguous() for n, p in self.params}
        save_file(cpu, tmp)

    def _load(self, path: Path) -> None:
        with torch.no_grad(), safe_open(str(path), framework="pt") as f:
            for name, p in self.params:
                p.copy_(f.get_tensor(name))  # one tensor in memory at a time

    def perturbed(self) -> Sequence[tuple[str, torch.Tensor]]:
        """The perturbed parameters in walk order."""
        return self.params
