"""Server state in the run folder, beyond what :class:`RunFolder` does itself.

The run folder (:mod:`protocols.run_folder`) owns the checkpoint format and
its atomic writes for every method. Here are the two steps methods share on
top of it: restoring a tensor state that must match the run's layout, and
writing a PEFT adapter folder (which needs ``peft``, a server-side
dependency the bottom layer does not take).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import save_file

from protocols import ProtocolError, TensorLayout
from protocols.durable import replace_dir
from protocols.manifest import seal
from protocols.run_folder import CheckpointError, RunFolder
from strategies import TensorFedAvg

__all__ = ["restore_tensors", "save_peft_adapter"]


def restore_tensors(
    folder: RunFolder, spec_fingerprint: str, fedavg: TensorFedAvg
) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """The last checkpoint's round, tensors and whole state record.

    The tensors are checked against ``fedavg``'s layout and moved to its
    device; the record holds e.g. the ``privacy`` entry.

    Raises
    ------
    CheckpointError
        If there is no checkpoint, it is damaged, of another spec, or its
        tensors do not have the run's layout.
    """
    state = folder.read_checkpoint(spec_fingerprint)
    tensors = folder.read_checkpoint_tensors(state)
    try:
        fedavg.layout.check(TensorLayout.of(tensors))
    except ProtocolError as exc:
        raise CheckpointError(f"{folder.checkpoint_dir}: {exc}") from None
    return (
        int(state["round"]),
        {k: v.to(fedavg.device) for k, v in tensors.items()},
        state,
    )


def save_peft_adapter(
    folder: Path,
    model: PeftModel,
    *,
    extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Write ``model``'s adapter as a sealed PEFT folder, replacing ``folder`` whole.

    ``PeftModel.from_pretrained(base, folder)`` loads the result. The folder
    is built beside the target, sealed with a manifest of its files' sha256
    (:mod:`protocols.manifest`, which export verifies), and swapped into place.
    ``extra_tensors`` (file name -> tensors, e.g. FedEx-LoRA's
    ``residual.safetensors``) are written into it before it is sealed.

    Raises
    ------
    ValueError
        If an extra file name is not a plain ``*.safetensors`` name or is one
        PEFT writes.
    """
    for name in extra_tensors or {}:
        if (
            Path(name).name != name
            or not name.endswith(".safetensors")
            or name.startswith((".", "adapter_"))
        ):
            raise ValueError(f"bad extra adapter file name {name!r}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    model.save_pretrained(tmp)
    for name, tensors in (extra_tensors or {}).items():
        save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
            tmp / name,
        )
    seal(tmp)
    replace_dir(tmp, folder)
    return folder
