"""Section 2: peak memory of the edge client against ORT inference alone and torch.

Three fresh children (:mod:`bench.edge.children`), spawned by a parent that
has not imported torch, on the same B x T batch of the bundle's model (full
walk): ``ort`` (a plain ``InferenceSession`` fed w0, one forward), ``edge``
(``EdgeModel`` plus one MeZO step) and ``torch`` (the torch model plus one
``zo_local_steps`` step). Each reports its own ``ru_maxrss``; the report
sets edge / ORT against the issue's aim (:data:`AIM`).
"""

from __future__ import annotations

from typing import Any

from bench.edge.children import run_child
from bench.harness import maxrss_mib

AIM = 1.2
"""Issue 11's aim: the edge client's peak memory <= 1.2 x ORT inference's."""


def section_memory(prepared: dict[str, Any], model: str) -> dict[str, Any]:
    """The three children on ``prepared``'s bundle and batch (the export child's)."""
    parent = maxrss_mib()
    args = {
        "bundle": prepared["bundle"],
        "batches": prepared["batches"],
        "model": model,
    }
    ort = run_child("ort", args)
    edge = run_child("edge", args)
    torch = run_child("torch", args)
    return {
        "parent_peak_mib_at_spawn": parent,
        "ort": ort,
        "edge": edge,
        "torch": torch,
        "ratio_edge_over_ort": edge["peak_mib"] / ort["peak_mib"],
        "ratio_torch_over_ort": torch["peak_mib"] / ort["peak_mib"],
        "ratio_torch_over_edge": torch["peak_mib"] / edge["peak_mib"],
        "aim": AIM,
    }
