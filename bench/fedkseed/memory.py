"""Section 3: peak memory of ZO training over inference, in fresh subprocesses.

Each measurement is a child process (``python -m bench.fedkseed --child
KIND``) that loads the model and reports its own ``ru_maxrss``: ``inference``
(3 forward passes), ``zo`` (3 ``zo_local_steps`` over all parameters) and
``client`` (the real client path: ``ZoModelState`` sync with its snapshot on
disk, 3 steps, restore); a fourth child only computes the spec. The parent
spawns them before it imports torch: on Linux a child's ``ru_maxrss`` starts
at its parent's resident size at fork/exec.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from bench.fedkseed.settings import (
    MODEL,
    PAPER_K,
    STEP_BATCH,
    STEP_EPS,
    STEP_LR,
    fixed_ni_batch,
    run_zo_steps,
    zo_spec_for,
    zo_train_config,
)
from bench.harness import maxrss_mib, module_command, now, run_json_child

CHILD_KINDS = ("spec", "inference", "zo", "client")


def _spec_fields() -> dict[str, Any]:
    """The default FedKSeed run's ``ZOSpec`` fields for the real model (JSON-able)."""
    spec = zo_spec_for({"run.method": "fedkseed"})
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    fields["include"] = list(fields["include"])
    return fields


def _client_path(spec_json: str | None, config: Any, marks: dict[str, float]) -> int:
    """Sync (snapshot written), 3 ZO steps, restore; returns the snapshot's bytes."""
    import torch

    from client.zo_state import ZoModelState
    from protocols import ZOSpec
    from protocols.zo_messages import ZoTrainIns

    fields = json.loads(spec_json or "{}")
    fields["include"] = tuple(fields.get("include", ()))
    spec = ZOSpec(**fields)
    with tempfile.TemporaryDirectory(prefix="fedkseed-snap-") as snap:
        state = ZoModelState(spec, torch.device("cpu"), Path(snap))
        marks["after_load"] = maxrss_mib()
        examples = fixed_ni_batch(state.tokenizer)
        ins = ZoTrainIns(
            spec=spec,
            config=config,
            base_round=0,
            target_round=0,
            target_hash=state.hash,
            history=(),
        )
        state.sync(ins)  # writes the synced snapshot to disk
        marks["after_sync_snapshot_write"] = maxrss_mib()
        snapshot_bytes = sum(f.stat().st_size for f in Path(snap).glob("*.safetensors"))
        state.mark_trained()
        run_zo_steps(
            state.model,
            state.perturbed(),
            examples,
            config,
            seeds=state.seeds,
            eps=STEP_EPS,
            pad_id=int(state.tokenizer.pad_token_id),
        )
        marks["after_3_zo_steps"] = maxrss_mib()
        state.restore()  # reads the snapshot back, one tensor at a time
        marks["after_restore_snapshot_read"] = maxrss_mib()
    return snapshot_bytes


def child_memory(kind: str, spec_json: str | None) -> dict[str, Any]:
    """Run in a fresh subprocess: peak RSS of inference, ZO steps or the client path.

    Parameters
    ----------
    kind : str
        One of :data:`CHILD_KINDS`.
    spec_json : str | None
        The ``spec`` child's fields as JSON (``client`` needs them).

    Returns
    -------
    dict[str, Any]
        ``kind``, ``peak_mib``, ``marks_mib`` (peak RSS after each phase) and
        ``seconds``; ``spec`` for the spec child; ``snapshot_bytes`` for the
        client path.

    Raises
    ------
    ValueError
        If ``kind`` is unknown.
    """
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    from client.zo_trainer import _loss
    from models import collate_train, load_causal_lm
    from protocols.seeds import ParamWalk, candidate_seeds, perturb_

    marks = {"after_imports": maxrss_mib()}
    t0 = now()
    if kind == "spec":
        return {"kind": kind, "spec": _spec_fields()}
    config = zo_train_config(3, STEP_BATCH, STEP_LR)
    if kind == "client":
        snapshot_bytes = _client_path(spec_json, config, marks)
        return {
            "kind": kind,
            "peak_mib": maxrss_mib(),
            "marks_mib": marks,
            "snapshot_bytes": snapshot_bytes,
            "seconds": now() - t0,
        }
    loaded = load_causal_lm(MODEL, dtype="float32", device="cpu")
    model = loaded.model
    marks["after_load"] = maxrss_mib()
    examples = fixed_ni_batch(loaded.tokenizer)
    batch = collate_train(examples, int(loaded.tokenizer.pad_token_id))
    marks["after_batch"] = maxrss_mib()
    if kind == "inference":
        for _ in range(3):
            _loss(model, batch)  # forward under torch.inference_mode(), with labels
        marks["after_3_forwards"] = maxrss_mib()
    elif kind == "zo":
        params = ParamWalk.from_model(model).params(model)
        perturb_([("warm-up", torch.zeros(8))], 1, 1.0)  # numba import + JIT compile
        marks["after_numba_compile"] = maxrss_mib()
        run_zo_steps(
            model,
            params,
            examples,
            config,
            seeds=candidate_seeds(0, PAPER_K),
            eps=STEP_EPS,
            pad_id=int(loaded.tokenizer.pad_token_id),
        )
        marks["after_3_zo_steps"] = maxrss_mib()
    else:
        raise ValueError(kind)
    return {
        "kind": kind,
        "peak_mib": maxrss_mib(),
        "marks_mib": marks,
        "seconds": now() - t0,
    }


def run_child(kind: str, spec_json: str | None = None) -> dict[str, Any]:
    """One memory child (``python -m bench.fedkseed --child KIND``); its result."""
    cmd = module_command("bench.fedkseed", "--child", kind)
    if spec_json:
        cmd += ["--spec-json", spec_json]
    return run_json_child(cmd, timeout=900, what=f"memory child {kind!r}")


def section_memory() -> dict[str, Any]:
    """Three fresh children (plus one that only computes the spec), spawned lean."""
    parent_rss = maxrss_mib()
    spec_json = json.dumps(run_child("spec")["spec"])
    inference = run_child("inference")
    zo = run_child("zo")
    client = run_child("client", spec_json)
    numba_cost = zo["marks_mib"]["after_numba_compile"] - zo["marks_mib"]["after_batch"]
    return {
        "parent_peak_mib_at_spawn": parent_rss,
        "inference": inference,
        "zo": zo,
        "client_path": client,
        "ratio_zo_over_inference": zo["peak_mib"] / inference["peak_mib"],
        "ratio_client_path_over_inference": client["peak_mib"] / inference["peak_mib"],
        "numba_import_and_compile_mib": numba_cost,
        "target": 1.2,
    }
