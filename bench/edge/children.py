"""The benchmark's child processes: the bundle export and the measured runs.

Each runs as ``python -m bench.edge --child KIND --child-args JSON`` and
prints one JSON line (:func:`run_child` reads it). The parent spawns them
before it imports torch, so a child's ``ru_maxrss`` holds only its own work
(on Linux it starts at the parent's resident size). Kinds:

``export``
    ``pollinate export --format edge``'s function (:func:`server.edge_bundle.
    export_edge`) on a FedKSeed config of the model (full walk), then the
    timed batches as ``batches.npz`` beside it, tokenized by the torch
    client's path (``models.tokenize_example``): ``rows`` (B x T ids and
    labels of real Natural Instructions examples, exactly T tokens).
``ort``, ``edge``, ``torch``
    Section 2's peak memory: a plain ``InferenceSession`` fed w0 and one
    forward; :class:`client.edge.EdgeModel` plus one MeZO step; the torch
    model plus one ``zo_local_steps`` step; all on the same B x T batch.
``edge-steps``, ``torch-steps``
    Section 3's seconds per ZO step at batch 1 and B (median of N after one
    warm-up), through the real loops (``edge_local_steps``,
    ``zo_local_steps``), plus one forward and one perturbation alone.

The edge children run without numba unless asked (``numba: true``): the
edge install (``edge-requirements.txt``) has none, so its seed kernels are
NumPy's.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.edge.settings import MEZO_EPS, MEZO_LR, NI_PATH
from bench.harness import maxrss_mib, module_command, now, run_json_child

CHILD_KINDS = ("export", "ort", "edge", "torch", "edge-steps", "torch-steps")
BATCHES_FILE = "batches.npz"


def threads() -> int:
    """The cores this process may use (both runtimes get all of them)."""
    return max(1, len(os.sched_getaffinity(0)))


def run_child(kind: str, args: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """One child (``python -m bench.edge --child KIND``); its JSON result."""
    cmd = module_command(
        "bench.edge", "--child", kind, "--child-args", json.dumps(args)
    )
    return run_json_child(cmd, timeout=timeout, what=f"child {kind!r}")


def _no_numba() -> None:
    """Make ``import numba`` fail here, as on the edge install."""
    sys.modules["numba"] = None  # type: ignore[assignment]


def _export(args: dict[str, Any]) -> dict[str, Any]:
    """Write the bundle (full walk) and ``batches.npz`` into ``args["out"]``."""
    import numpy as np

    from bench.harness import full_length_examples
    from models import collate_train, load_causal_lm
    from server.edge_bundle import export_edge

    root = Path(args["out"])
    root.mkdir(parents=True, exist_ok=True)
    config = root / "edge.toml"
    config.write_text(
        f"""[run]
method = "fedkseed"
[model]
name = "{args["model"]}"
max_length = {args["tokens"]}
[data]
source = "{NI_PATH}"
limit = 200
[zo]
eps = {MEZO_EPS}
learning_rate = {MEZO_LR}
"""
    )
    t0 = now()
    bundle = export_edge(config, root / "bundle")
    seconds = now() - t0
    tok = load_causal_lm(args["model"], dtype="float32", device="cpu").tokenizer
    rows = full_length_examples(NI_PATH, tok, args["batch"], args["tokens"], 0)
    if len(rows) < args["batch"]:
        raise RuntimeError(
            f"only {len(rows)} NI examples reach {args['tokens']} tokens"
        )
    batch = collate_train(rows, int(tok.pad_token_id))
    np.savez(
        root / BATCHES_FILE,
        input_ids=batch.input_ids.numpy(),
        attention_mask=batch.attention_mask.numpy(),
        labels=batch.labels.numpy(),
    )
    record = json.loads((bundle / "bundle.json").read_text())
    return {
        "bundle": str(bundle),
        "batches": str(root / BATCHES_FILE),
        "export_seconds": seconds,
        "walk_numel": sum(int(np.prod(s)) for s in record["walk"].get("shapes", [])),
        "check": record.get("check"),
    }


def _npz(path: str) -> dict[str, Any]:
    import numpy as np

    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _rows(batches: dict[str, Any]) -> list[Any]:
    """The npz batch as ``TokenizedExample`` rows (exact length, no padding)."""
    from models.text import TokenizedExample

    return [
        TokenizedExample(tuple(int(i) for i in ids), tuple(int(i) for i in lab))
        for ids, lab in zip(batches["input_ids"], batches["labels"], strict=True)
    ]


def _ort(args: dict[str, Any], marks: dict[str, float]) -> dict[str, Any]:
    """A plain session on ``model.onnx``, w0 fed from the bundle, one forward."""
    import onnxruntime as ort  # type: ignore[import-untyped]
    from safetensors.numpy import load_file

    marks["after_imports"] = maxrss_mib()
    bundle = Path(args["bundle"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    marks["after_session"] = maxrss_mib()
    feeds = {**_npz(args["batches"]), **load_file(str(bundle / "w0.safetensors"))}
    marks["after_w0"] = maxrss_mib()
    loss = float(session.run(["loss"], feeds)[0])
    marks["after_forward"] = maxrss_mib()
    return {"loss_w0": loss}


def _edge(args: dict[str, Any], marks: dict[str, float]) -> dict[str, Any]:
    """EdgeModel on the bundle, its loss at w0, one MeZO step."""
    from client.edge.engine import EdgeModel, collate
    from client.edge.trainer import mezo_step
    from protocols.philox import candidate_seeds, numba_available

    marks["after_imports"] = maxrss_mib()
    model = EdgeModel.open(args["bundle"], threads=threads())
    marks["after_open"] = maxrss_mib()
    batch = collate(_rows(_npz(args["batches"])), model.pad_id)
    loss = model.loss(batch)
    marks["after_forward"] = maxrss_mib()
    step = mezo_step(model, batch, candidate_seeds(0, 1)[0], MEZO_EPS, MEZO_LR)
    marks["after_mezo_step"] = maxrss_mib()
    return {"loss_w0": loss, "step_done": step is not None, "numba": numba_available()}


def _torch(args: dict[str, Any], marks: dict[str, float]) -> dict[str, Any]:
    """The torch model, its loss at w0, one ``zo_local_steps`` step."""
    import torch

    torch.set_num_threads(threads())
    from client.zo_trainer import _loss, zo_local_steps
    from models import collate_train, load_causal_lm
    from protocols.param_walk import ParamWalk
    from protocols.philox import candidate_seeds

    marks["after_imports"] = maxrss_mib()
    loaded = load_causal_lm(args["model"], dtype="float32", device="cpu")
    model = loaded.model
    params = ParamWalk.from_model(model).params(model)
    marks["after_load"] = maxrss_mib()
    rows = _rows(_npz(args["batches"]))
    pad = int(loaded.tokenizer.pad_token_id)
    model.eval()
    loss = _loss(model, collate_train(rows, pad))
    marks["after_forward"] = maxrss_mib()
    zo_local_steps(
        model,
        params,
        rows,
        _train_config(1, len(rows)),
        seeds=candidate_seeds(0, 16),
        eps=MEZO_EPS,
        learning_rate=MEZO_LR,
        probabilities=None,
        pad_id=pad,
        label="bench",
        device=torch.device("cpu"),
    )
    marks["after_zo_step"] = maxrss_mib()
    return {"loss_w0": loss}


def _train_config(server_round: int, batch_size: int) -> Any:
    """One local step at ``batch_size`` (run seed 0, MeZO's learning rate)."""
    from protocols import LocalTrainConfig

    return LocalTrainConfig(
        server_round=server_round,
        local_steps=1,
        batch_size=batch_size,
        learning_rate=MEZO_LR,
        weight_decay=0.0,
        seed=0,
    )


def _median_steps(step: Any, repeats: int) -> dict[str, Any]:
    """One untimed call of ``step(i)``, then ``repeats`` timed: their median."""
    step(0)
    times = []
    for i in range(1, repeats + 1):
        t0 = now()
        step(i)
        times.append(now() - t0)
    return {"median_s": statistics.median(times), "times_s": times}


def _edge_steps(args: dict[str, Any]) -> dict[str, Any]:
    """Seconds per ``edge_local_steps`` step at batch 1 and B; a forward; a perturb."""
    from bench.harness import exact_length_rows
    from client.edge.engine import EdgeModel, collate
    from client.edge.trainer import edge_local_steps
    from models.text import format_prompt, tokenize_ids
    from protocols.messages import RoundSchedule
    from protocols.philox import candidate_seeds, numba_available
    from protocols.seed_arrays import perturb_arrays

    model = EdgeModel.open(args["bundle"], threads=threads())
    torch_rows = _rows(_npz(args["batches"]))

    def tokenize(e: Any, length: int) -> Any:
        return tokenize_ids(
            model.encode(format_prompt(e.prompt)),
            model.encode(e.response.strip()),
            model.bundle.eos_id,
            length,
        )

    b, t = len(torch_rows), len(torch_rows[0].input_ids)
    own_rows = exact_length_rows(NI_PATH, tokenize, b, t, 0)
    seeds = candidate_seeds(0, 64)
    out: dict[str, Any] = {
        "numba": numba_available(),
        "tokens_equal_torch_client": own_rows == torch_rows,
    }
    for size in sorted({1, b}):
        rows = own_rows[:size]

        def step(i: int, rows: list[Any] = rows) -> None:
            edge_local_steps(
                model,
                rows,
                RoundSchedule(
                    server_round=i + 1, local_steps=1, batch_size=len(rows), seed=0
                ),
                seeds=seeds,
                eps=MEZO_EPS,
                learning_rate=MEZO_LR,
                probabilities=None,
                label="bench",
            )

        out[f"batch_{size}"] = _median_steps(step, args["repeats"])
    batch = collate(own_rows, model.pad_id)
    out["forward"] = _median_steps(lambda i: model.loss(batch), args["repeats"])
    out["perturb"] = _median_steps(
        lambda i: perturb_arrays(model.params(), seeds[i], 1e-9), args["repeats"]
    )
    return out


def _torch_steps(args: dict[str, Any]) -> dict[str, Any]:
    """Seconds per ``zo_local_steps`` step at batch 1 and B; a forward; a perturb."""
    import torch

    torch.set_num_threads(threads())
    from client.zo_trainer import _loss, zo_local_steps
    from models import collate_train, load_causal_lm
    from protocols.param_walk import ParamWalk
    from protocols.philox import candidate_seeds
    from protocols.seeds import perturb_

    loaded = load_causal_lm(args["model"], dtype="float32", device="cpu")
    model = loaded.model
    model.eval()
    params = ParamWalk.from_model(model).params(model)
    pad = int(loaded.tokenizer.pad_token_id)
    all_rows = _rows(_npz(args["batches"]))
    seeds = candidate_seeds(0, 64)
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    for size in sorted({1, len(all_rows)}):
        rows = all_rows[:size]

        def step(i: int, rows: list[Any] = rows) -> None:
            zo_local_steps(
                model,
                params,
                rows,
                _train_config(i + 1, len(rows)),
                seeds=seeds,
                eps=MEZO_EPS,
                learning_rate=MEZO_LR,
                probabilities=None,
                pad_id=pad,
                label="bench",
                device=torch.device("cpu"),
            )

        out[f"batch_{size}"] = _median_steps(step, args["repeats"])
    batch = collate_train(all_rows, pad)
    out["forward"] = _median_steps(lambda i: _loss(model, batch), args["repeats"])
    out["perturb"] = _median_steps(
        lambda i: perturb_(params, seeds[i], 1e-9), args["repeats"]
    )
    return out


def child_main(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run one child role; its JSON-able result.

    The memory kinds add ``peak_mib`` and ``marks_mib``.

    Raises
    ------
    ValueError
        If ``kind`` is not one of :data:`CHILD_KINDS`.
    """
    if kind in ("ort", "edge", "edge-steps") and not args.get("numba", False):
        _no_numba()
    t0 = now()
    if kind == "export":
        return _export(args)
    if kind == "edge-steps":
        return {**_edge_steps(args), "seconds": now() - t0}
    if kind == "torch-steps":
        return {**_torch_steps(args), "seconds": now() - t0}
    roles = {"ort": _ort, "edge": _edge, "torch": _torch}
    if kind not in roles:
        raise ValueError(f"unknown child kind {kind!r}")
    marks: dict[str, float] = {}
    result = roles[kind](args, marks)
    return {
        "kind": kind,
        **result,
        "peak_mib": maxrss_mib(),
        "marks_mib": marks,
        "seconds": now() - t0,
    }
