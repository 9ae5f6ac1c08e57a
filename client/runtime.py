"""Per-process client state: models built once, datasets read once.

A ClientApp handler runs once per message. Loading a model per message would
dominate the round, so this cache keeps, for the life of the process, one
LoRA-wrapped model per spec fingerprint and one tokenized dataset per
(file, model) pair. In simulation one process serves many virtual clients;
they share the model (each message loads the global adapter into it first,
and sets its base weights to pristine + the instruction's FedEx-LoRA
residual, :attr:`LoraModel.base_weights`) but never share data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from client.local_data import DataCache, LocalData
from client.snapshots import ZO_STATE_ENV, snapshot_folder, state_root
from client.zo_state import ZoModelState
from models import (
    attach_lora,
    default_cache_dir,
    load_causal_lm,
    tokenize_example,
)
from models.lora import BaseWeights
from models.split import DeviceHead, DeviceTail, device_parts
from protocols import LoraSpec, SplitSpec, ZOSpec

__all__ = ["ZO_STATE_ENV", "ClientRuntime", "LocalData", "LoraModel", "SplitParts"]


@dataclass
class LoraModel:
    """A base model wrapped with adapters, and its tokenizer.

    ``base`` is (model name, dtype, device) of the base model under the adapters.
    ``base_weights`` keeps pristine copies of the adapted modules' base weights
    that a residual was folded into (built with the model, empty).
    """

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    base: tuple[str, str, str] = ("", "", "")
    base_weights: BaseWeights = field(init=False)

    def __post_init__(self) -> None:
        self.base_weights = BaseWeights(self.model)


@dataclass
class SplitParts:
    """The device's SFPrompt parts and tokenizer."""

    head: DeviceHead
    tail: DeviceTail
    tokenizer: PreTrainedTokenizerBase


class ClientRuntime:
    """Caches keyed by what determines their content (small, process-wide)."""

    def __init__(self, max_datasets: int = 64) -> None:
        self._models: dict[tuple[str, str], LoraModel] = {}
        self._zo: dict[tuple[str, str, int, str], ZoModelState] = {}
        self._split: dict[tuple[str, str], SplitParts] = {}
        self._data = DataCache(max_datasets)

    def lora_model(self, spec: LoraSpec, device: torch.device) -> LoraModel:
        """The model for ``spec`` on ``device``, built on first use.

        A client of rank ``r`` passes ``spec.at_rank(r)``. When only the
        adapter's shape changed (simulated nodes of other ranks in one
        process), the cached base model is unwrapped and given new adapters
        instead of being loaded again.
        """
        key = (spec.fingerprint(), str(device))
        if key not in self._models:
            base_key = (spec.model, spec.model_dtype, str(device))
            reuse = next(
                (m for m in self._models.values() if m.base == base_key),
                None,
            )
            self._models.clear()  # one base model per process is the budget
            self._zo.clear()
            self._split.clear()
            if reuse is not None:  # PEFT's unload() restores the base modules
                # ... as they are: take any folded residual out first.
                reuse.base_weights.restore()
                base, tokenizer = reuse.model.unload(), reuse.tokenizer
            else:
                loaded = load_causal_lm(
                    spec.model, dtype=spec.model_dtype, device=device
                )
                base, tokenizer = loaded.model, loaded.tokenizer
            model = attach_lora(base, spec)
            self._models[key] = LoraModel(model, tokenizer, base_key)
        return self._models[key]

    def zo_state(
        self,
        spec: ZOSpec,
        device: torch.device,
        run_id: int,
        root: Path | None = None,
    ) -> ZoModelState:
        """The seed-synced model of a FedKSeed run, built on first use.

        Snapshots go to ``<root>/<run id>-<spec fingerprint>``, shared by the
        processes of this machine that serve the same run; ``<root>`` is
        ``root`` (a simulated node's run-folder scratch space, removed after
        the run), else ``$POLLINATE_ZO_STATE_DIR`` (set by the client daemon
        to its ``--state-dir``), else ``<cache>/zo``.
        """
        # The root is part of the key: two runs with one run id and spec (in
        # one process: tests, benchmarks) must not share a snapshot folder.
        key = (spec.fingerprint(), str(device), run_id, str(root))
        if key not in self._zo:
            self._zo.clear()
            self._split.clear()
            self._models.clear()  # one base model per process is the budget
            base = state_root(root) or default_cache_dir() / "zo"
            folder = snapshot_folder(base, run_id, spec.fingerprint())
            self._zo[key] = ZoModelState(spec, device, folder)
        return self._zo[key]

    def split_parts(self, spec: SplitSpec, device: torch.device) -> SplitParts:
        """The device's SFPrompt parts for ``spec`` (no server block in memory)."""
        key = (spec.fingerprint(), str(device))
        if key not in self._split:
            self._split.clear()
            self._models.clear()
            self._zo.clear()
            loaded = load_causal_lm(
                spec.model, dtype=spec.activation_dtype, device=device
            )
            head, tail = device_parts(loaded.model, spec)
            self._split[key] = SplitParts(head, tail, loaded.tokenizer)
        return self._split[key]

    def local_data(
        self,
        path: Path,
        spec: LoraSpec | ZOSpec | SplitSpec,
        tokenizer: PreTrainedTokenizerBase,
    ) -> LocalData:
        """The node's examples, tokenized for ``spec.model``, read on first use."""
        return self._data.get(
            path,
            spec.model,
            spec.max_length,
            lambda e: tokenize_example(e, tokenizer, spec.max_length),
        )

    def count_examples(self, path: Path) -> int:
        """How many examples the node holds (reads the file if not cached)."""
        return self._data.count(path)
