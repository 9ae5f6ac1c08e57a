"""Writing an edge bundle from a torch model: the ONNX loss graph and its check.

The bundle format is :mod:`protocols.edge_bundle`'s; this module produces
its ``model.onnx`` and ``tokenizer.json`` and hands w0 and the record to that
module. The graph is the model's loss, with the perturbed parameters (those
of the parameter walk) as graph inputs in walk order: a wrapper swaps each
walk tensor (and every tied alias of it, as SmolLM2's and tiny-llama's
``lm_head.weight`` is of ``model.embed_tokens.weight``) for the graph input
during the traced forward, so one input reaches every use. The rest of the
model stays in the graph as initializers. Export uses the TorchScript
exporter (``dynamo=False``, opset 17), as :mod:`server.export` does.

The bundle is checked before ``bundle.json`` is written: ONNX Runtime's loss
equals PyTorch's on the given examples, one at a time and padded together,
within :data:`LOSS_TOLERANCE`, at w0 and with the walk perturbed by a seed
(which catches a graph input that misses one use of its tensor); weights
that are not finite are refused.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from models.batching import TrainBatch, collate_train
from models.text import TokenizedExample
from protocols.edge_bundle import (
    BUNDLE_FILE,
    GRAPH_INPUTS,
    LOSS_OUTPUT,
    MODEL_FILE,
    TOKENIZER_FILE,
    W0_FILE,
    check_spec_fits,
    write_bundle_json,
    write_w0,
)
from protocols.param_walk import ParamWalk
from protocols.seeds import perturb_
from protocols.specs import ZOSpec

__all__ = ["LOSS_TOLERANCE", "EdgeExportError", "export_edge_bundle"]

LOSS_TOLERANCE = 1e-4
"""Largest |ONNX Runtime - PyTorch| mean loss (nats) an export may show.

Measured on CPU (ONNX Runtime 1.32, torch 2.13, float32): tiny-llama at most
1e-6; SmolLM2-135M-Instruct at most 7e-6 on Natural Instructions examples
(losses 3.6 to 12.4; batches of 1 and of 8 x 128 tokens; full and
one-layer walks; at w0 and perturbed). That is 15x headroom, while a graph
input that misses one use of its tensor (a tied LM head baked in as a
constant) moves tiny-llama's perturbed loss by 5e-3.
"""

_CHECK_SINGLES = 4
_CHECK_BATCH = 8
_PROBE_SEED = 20260101
_PROBE_SCALE = 1e-2


class EdgeExportError(RuntimeError):
    """The model cannot be exported as an edge bundle, or its check failed."""


def _aliases(model: nn.Module, walk: ParamWalk) -> list[list[str]]:
    """For each walk name, every name of the same tensor (tied weights)."""
    by_id: dict[int, list[str]] = {}
    first: dict[str, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
        first.setdefault(name, id(p))
    return [by_id[first[name]] for name in walk.names]


@contextmanager
def _swapped(
    model: nn.Module, aliases: Sequence[list[str]], tensors: Sequence[torch.Tensor]
) -> Iterator[None]:
    """``model`` with each walk parameter (all its names) replaced by a tensor.

    ``torch.func.functional_call`` does this too, but refuses to run under
    the TorchScript tracer the exporter uses.
    """
    saved: list[tuple[nn.Module, str, Any]] = []
    try:
        for names, tensor in zip(aliases, tensors, strict=True):
            for name in names:
                owner, _, leaf = name.rpartition(".")
                module = model.get_submodule(owner)
                saved.append((module, leaf, module._parameters[leaf]))
                module._parameters[leaf] = tensor  # type: ignore[assignment]
        yield
    finally:
        for module, leaf, param in reversed(saved):
            module._parameters[leaf] = param


class _WalkLoss(nn.Module):
    """``(input_ids, attention_mask, labels, *walk tensors) -> mean loss``."""

    def __init__(self, model: nn.Module, walk: ParamWalk) -> None:
        super().__init__()
        self.model = model
        self.aliases = _aliases(model, walk)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        *walk_tensors: torch.Tensor,
    ) -> torch.Tensor:
        with _swapped(self.model, self.aliases, walk_tensors):
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                use_cache=False,
            )
        loss: torch.Tensor = out.loss
        return loss


def _check_finite(model: nn.Module) -> None:
    """Refuse a model with a NaN or Inf weight or buffer, naming it."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise EdgeExportError(
                f"parameter '{name}' holds NaN or Inf: refusing to export a "
                "broken model"
            )


def _check_batches(
    examples: Sequence[TokenizedExample], pad_id: int
) -> list[TrainBatch]:
    """The first few examples alone, then padded batches of several."""
    singles = [collate_train([e], pad_id) for e in examples[:_CHECK_SINGLES]]
    groups = [
        collate_train(examples[i : i + _CHECK_BATCH], pad_id)
        for i in range(0, len(examples), _CHECK_BATCH)
        if len(examples[i : i + _CHECK_BATCH]) > 1
    ]
    return singles + groups


def _export_graph(
    wrapped: _WalkLoss,
    walk: ParamWalk,
    w0: Sequence[torch.Tensor],
    probe: TrainBatch,
    path: Path,
) -> None:
    """Trace ``wrapped`` into ``path`` with dynamic batch and length."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings on HF's branches
        try:
            torch.onnx.export(
                wrapped,
                (probe.input_ids, probe.attention_mask, probe.labels, *w0),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=[*GRAPH_INPUTS, *walk.names],
                output_names=[LOSS_OUTPUT],
                dynamic_axes={n: {0: "batch", 1: "length"} for n in GRAPH_INPUTS},
            )
        except Exception as exc:  # the exporter raises many types
            raise EdgeExportError(f"ONNX export failed: {exc}") from exc


def _session(path: Path, walk: ParamWalk) -> Any:
    """An ONNX Runtime session of ``path``, its inputs checked against the walk."""
    import onnxruntime as ort  # type: ignore[import-untyped]

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    if inputs != [*GRAPH_INPUTS, *walk.names]:
        missing = [n for n in [*GRAPH_INPUTS, *walk.names] if n not in inputs]
        raise EdgeExportError(
            f"the ONNX graph's inputs differ from the walk (missing {missing[:3]}, "
            f"{len(inputs)} inputs for {len(walk.names)} parameters): a perturbed "
            "parameter the loss does not use?"
        )
    return session


def _worst_diff(
    session: Any,
    model: nn.Module,
    params: Sequence[tuple[str, torch.Tensor]],
    batches: Sequence[TrainBatch],
) -> float:
    """The largest |ONNX Runtime - PyTorch| loss over ``batches``, checked.

    ONNX Runtime gets ``params``' current values as the walk inputs; PyTorch
    runs ``model`` as it is.
    """
    weights = {n: p.detach().numpy() for n, p in params}
    worst = 0.0
    for batch in batches:
        feeds = {
            "input_ids": batch.input_ids.numpy(),
            "attention_mask": batch.attention_mask.numpy(),
            "labels": batch.labels.numpy(),
            **weights,
        }
        got = float(session.run([LOSS_OUTPUT], feeds)[0])
        with torch.inference_mode():
            want = float(
                model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    labels=batch.labels,
                ).loss
            )
        diff = abs(got - want)
        if not np.isfinite(diff) or diff > LOSS_TOLERANCE:
            raise EdgeExportError(
                f"ONNX Runtime loss {got!r} differs from PyTorch's {want!r} on a "
                f"batch of {batch.input_ids.shape[0]} x {batch.input_ids.shape[1]} "
                f"by more than {LOSS_TOLERANCE}"
            )
        worst = max(worst, diff)
    return worst


def _check_with_ort(
    model: nn.Module,
    path: Path,
    walk: ParamWalk,
    w0: Sequence[torch.Tensor],
    batches: Sequence[TrainBatch],
) -> float:
    """The largest |ONNX Runtime - PyTorch| loss, at w0 and perturbed.

    At w0 on every batch; then, with the walk's tensors perturbed by one
    seed (on both sides), on the first and last batch: a graph in which an
    input misses a use of its tensor (a tied alias baked in as a constant)
    agrees at w0 but not there. The model is back at w0 on return.
    """
    session = _session(path, walk)
    params = walk.params(model)
    worst = _worst_diff(session, model, params, batches)
    try:
        perturb_(params, _PROBE_SEED, _PROBE_SCALE)
        probe = [batches[0], batches[-1]]
        worst = max(worst, _worst_diff(session, model, params, probe))
    finally:
        with torch.no_grad():
            for (_, p), value in zip(params, w0, strict=True):
                p.copy_(value)
    return worst


def _prepare_out(out: Path) -> None:
    """Create ``out``; refuse one that exists and holds anything."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EdgeExportError(
            f"{out} exists and is not empty: export into a new folder"
        )
    out.mkdir(parents=True, exist_ok=True)


def export_edge_bundle(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    walk: ParamWalk,
    spec: ZOSpec,
    out: Path,
    examples: Sequence[TokenizedExample],
) -> dict[str, Any]:
    """Write and check the edge bundle of ``model`` for ``spec`` into ``out``.

    Parameters
    ----------
    model
        The run's model holding w0 (float32, CPU), the walk's parameters in it.
    tokenizer
        Its fast tokenizer (saved as ``tokenizer.json``).
    walk
        The perturbed parameters; ``spec.walk_fingerprint`` must be its.
    spec
        The run's spec, recorded in the bundle.
    out
        A new or empty folder.
    examples
        Tokenized examples of the run's data for the check (at least one).

    Returns
    -------
    dict
        The ``bundle.json`` record written.

    Raises
    ------
    EdgeExportError
        If ``out`` is not empty, there are no examples, the tokenizer is not a
        fast one, a weight is not finite, the walk's tensors are not float32,
        or ONNX Runtime's loss differs from PyTorch's by more than
        :data:`LOSS_TOLERANCE`; nothing is left in ``out`` then.
    EdgeBundleError
        If the spec does not fit the walk or the generator.
    """
    if not examples:
        raise EdgeExportError("the export check needs at least one example")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise EdgeExportError(
            f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer: "
            "the edge needs its tokenizer.json"
        )
    check_spec_fits(spec, walk)
    _check_finite(model)
    params = walk.params(model)
    bad = [n for n, p in params if p.dtype != torch.float32 or p.device.type != "cpu"]
    if bad:
        raise EdgeExportError(f"parameter '{bad[0]}' is not float32 on the CPU")
    _prepare_out(out)
    try:
        model.eval()
        w0 = [p.detach().clone() for _, p in params]
        pad_id = int(tokenizer.pad_token_id)
        batches = _check_batches(examples, pad_id)
        _export_graph(_WalkLoss(model, walk), walk, w0, batches[-1], out / MODEL_FILE)
        diff = _check_with_ort(model, out / MODEL_FILE, walk, w0, batches)
        backend.save(str(out / TOKENIZER_FILE))
        write_w0(
            out, walk, [(n, t.numpy()) for n, t in zip(walk.names, w0, strict=True)]
        )
        return write_bundle_json(
            out,
            spec=spec,
            walk=walk,
            pad_id=pad_id,
            eos_id=int(tokenizer.eos_token_id),
            max_abs_loss_diff=diff,
            tolerance=LOSS_TOLERANCE,
            examples=len(examples),
        )
    except BaseException:
        for name in (MODEL_FILE, W0_FILE, TOKENIZER_FILE, BUNDLE_FILE):
            (out / name).unlink(missing_ok=True)
        with suppress(OSError):
            out.rmdir()  # only if we left it empty
        raise
