"""Exporting a finished run: the adapter, a merged model folder, or ONNX.

``adapter``
    What the method trained, as it was saved: the PEFT adapter folder (LoRA;
    under ``lora.aggregation = "exact"``, FedEx-LoRA, with
    ``residual.safetensors`` beside it: per adapted module, the dense
    ``(out, in)`` float32 residual to add to the frozen base weight, so the
    adapter alone is not the trained model: :func:`adapter_note`),
    the tuned parameters (FedKSeed; over an adapter, ``zo.adapter_rank`` >
    0, a PEFT adapter folder as for LoRA) or the prompts and tail (SFPrompt).
``merged``
    A plain Hugging Face model folder with the training folded in
    (``from_pretrained`` loads it with no Pollinate code): LoRA adapters
    merged into the base weights, or FedKSeed's tuned parameters written over
    them (its tuned adapter merged). For every LoRA aggregator the merged
    weight is base + residual (``exact`` only) + ``(alpha / r) B A``. SFPrompt's prompts need their own forward, so use ``onnx`` for it.
``onnx``
    ``model.onnx`` mapping ``(input_ids, attention_mask)`` to logits with
    dynamic batch and length, checked against PyTorch with ONNX Runtime on a
    probe batch; the largest difference is recorded in ``export.json``.
``edge``
    FedKSeed only: the bundle an inference-only device trains (w0 of the
    run's spec, so a config file works as well as a run folder; see
    :mod:`server.edge_bundle`).

Nothing is exported from a damaged run: the final artefact must match its
manifest of content hashes (:meth:`RunFolder.verify_artefact`, the message
names the file), every tensor of it and of the tuned model must be finite
(the message names the parameter), and an ONNX check that sees NaN or Inf
fails like one that sees a large difference.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from models import LoadedModel, load_causal_lm
from protocols.durable import atomic_write_text
from protocols.methods import EXPORT_FORMATS, Method, get_method
from protocols.run_folder import RunFolder
from server.config import RunConfig, load_config
from server.methods import server_method

__all__ = ["FORMATS", "ExportError", "adapter_note", "export_run", "tuned_model"]

FORMATS = EXPORT_FORMATS
ONNX_TOLERANCE = 1e-3


class ExportError(RuntimeError):
    """The run cannot be exported as asked."""


def _final(folder: RunFolder, method: Method) -> Path:
    """The run's final artefact, verified against its manifest and finite.

    Raises
    ------
    ExportError
        If there is none (the run did not complete) or a tensor in it holds
        NaN or Inf.
    RunFolderError
        If it differs from its manifest (the message names the file).
    """
    path = folder.artefact(method.artefact)
    if not path.exists():
        raise ExportError(
            f"{folder.path} has no final {path.name}: the run did not complete "
            f"(continue it with: pollinate resume {folder.path})"
        )
    folder.verify_artefact(method.artefact)
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    for file in files:
        try:
            tensors = load_file(file)
        except (SafetensorError, OSError) as exc:
            raise ExportError(f"{file} is damaged: {exc}") from None
        _check_finite(tensors.items(), str(file))
    return path


def _check_finite(named: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Refuse a model with a NaN or Inf weight, naming the first one.

    Raises
    ------
    ExportError
        Naming ``where`` and the parameter.
    """
    for name, value in named:
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ExportError(
                f"{where}: parameter {name!r} holds NaN or Inf: refusing to "
                "export a broken model"
            )


class _LogitsOnly(nn.Module):
    """``(input_ids, attention_mask) -> logits`` for export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits


def tuned_model(run_dir: Path) -> tuple[nn.Module, LoadedModel, RunConfig]:
    """The run's final model in memory (eval mode, CPU) and its base.

    Raises
    ------
    ExportError
        If the run folder has no final artefact.
    """
    folder = RunFolder(run_dir)
    config = load_config(folder.config)
    final = _final(folder, get_method(config.run.method))
    loaded = load_causal_lm(config.model.name, dtype="float32", device="cpu")
    model = server_method(config.run.method).tuned_model(config, final, loaded)
    _check_finite(model.named_parameters(), f"the tuned model of {folder.path}")
    return model.eval(), loaded, config


def _export_onnx(model: nn.Module, out: Path) -> float:
    """Export and check with ONNX Runtime; return the largest logit difference."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ExportError("ONNX export needs onnxruntime") from exc
    wrapped = _LogitsOnly(model).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    path = out / "model.onnx"
    try:
        torch.onnx.export(
            wrapped,
            (ids, mask),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={
                n: {0: "batch", 1: "length"}
                for n in ("input_ids", "attention_mask", "logits")
            },
        )
    except Exception as exc:  # the exporter raises many types
        if "onnx is not installed" in str(exc):
            raise ExportError(
                "ONNX export needs the onnx package: pip install onnx"
            ) from exc
        raise
    probe_ids = torch.randint(0, 200, (3, 17), generator=gen)
    probe_mask = torch.ones_like(probe_ids)
    probe_mask[0, :5] = 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(
        None, {"input_ids": probe_ids.numpy(), "attention_mask": probe_mask.numpy()}
    )[0]
    with torch.no_grad():
        want = wrapped(probe_ids, probe_mask).numpy()
    keep = probe_mask.numpy().astype(bool)  # padded positions carry no meaning
    return max_logit_diff(got, want, keep)


def max_logit_diff(
    got: npt.NDArray[np.floating],
    want: npt.NDArray[np.floating],
    keep: npt.NDArray[np.bool_],
) -> float:
    """The largest |ONNX - PyTorch| logit over the kept positions, checked.

    ``got`` and ``want`` are ``(B, T, V)``, ``keep`` is ``(B, T)``. A NaN or
    Inf on either side fails the check: ``NaN > tolerance`` is false, so a
    plain comparison would pass it.

    Raises
    ------
    ExportError
        If a difference is not finite or exceeds :data:`ONNX_TOLERANCE`.
    """
    diff = np.abs(got - want)[keep]
    if not bool(np.isfinite(diff).all()):
        raise ExportError(
            f"ONNX logits differ from PyTorch's by NaN or Inf at "
            f"{int((~np.isfinite(diff)).sum())} values: the export is broken"
        )
    worst = float(diff.max()) if diff.size else 0.0
    if not worst <= ONNX_TOLERANCE:
        raise ExportError(
            f"ONNX logits differ from PyTorch by {worst:.2e} > {ONNX_TOLERANCE}"
        )
    return worst


def adapter_note(out: Path) -> str | None:
    """One line for the user when an exported adapter is not the whole model.

    A FedEx-LoRA adapter folder holds ``residual.safetensors``, which must be
    added to the base weights as well (``merged`` export does it); None when
    ``out`` has no residual.
    """
    from server.lora_driver import RESIDUAL_FILE

    if not (out / RESIDUAL_FILE).is_file():
        return None
    return (
        f"note: {out} holds {RESIDUAL_FILE} (FedEx-LoRA): the adapter alone is "
        "not the model; add the residual to the base weights or export --format "
        "merged"
    )


def export_run(run_dir: Path, out: Path, fmt: str) -> Path:
    """Export ``run_dir`` into the new folder ``out``; return ``out``.

    Raises
    ------
    ExportError
        On an unknown format, an incomplete run, an existing ``out``, an
        unsupported combination, or an ONNX check that fails.
    """
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "edge":  # w0 for the run's spec: a config file works too
        from server.edge_bundle import export_edge

        return export_edge(run_dir, out)
    if out.exists():
        raise ExportError(f"{out} exists: export into a new folder")
    folder = RunFolder(run_dir)
    config = load_config(folder.config)
    method = get_method(config.run.method)
    if fmt not in method.exports:
        raise ExportError(
            f"method {method.name} exports {list(method.exports)}, not {fmt!r}"
        )
    final = _final(folder, method)
    if fmt == "adapter":
        write_peft = getattr(server_method(config.run.method), "write_adapter", None)
        if write_peft is not None and write_peft(config, final, out):
            pass  # FedKSeed over an adapter: a PEFT adapter folder, as LoRA's
        elif final.is_dir():
            shutil.copytree(final, out)
        else:
            out.mkdir(parents=True)
            shutil.copy2(final, out / final.name)
        shutil.copy2(folder.config, out / folder.config.name)
        return out
    model, loaded, _ = tuned_model(run_dir)
    out.mkdir(parents=True)
    info: dict[str, object] = {
        "run": str(run_dir),
        "method": config.run.method,
        "format": fmt,
    }
    if fmt == "merged":
        model.save_pretrained(out)  # type: ignore[operator]
        loaded.tokenizer.save_pretrained(out)
    else:
        info["max_abs_logit_diff"] = _export_onnx(model, out)
        loaded.tokenizer.save_pretrained(out)
    atomic_write_text(out / "export.json", json.dumps(info, indent=1))
    return out
