"""Section 3: seconds per ZO step, edge against torch, at batch 1 and B x T.

Two children per runtime kind (:mod:`bench.edge.children`): the edge client
as installed (NumPy seed kernels, no numba), the edge client with numba (a
device that can install it), and the torch client. Each times its real loop
(``edge_local_steps`` / ``zo_local_steps``, one step per call) after one
untimed warm-up step and reports the median of N, plus one forward and one
perturbation of every parameter alone. Both runtimes use every core.
"""

from __future__ import annotations

from typing import Any

from bench.edge.children import run_child


def section_step(prepared: dict[str, Any], model: str, repeats: int) -> dict[str, Any]:
    """Edge (NumPy), edge (numba) and torch step times on ``prepared``'s bundle."""
    args = {
        "bundle": prepared["bundle"],
        "batches": prepared["batches"],
        "model": model,
        "repeats": repeats,
    }
    return {
        "repeats": repeats,
        "edge": run_child("edge-steps", args),
        "edge_numba": run_child("edge-steps", {**args, "numba": True}),
        "torch": run_child("torch-steps", args),
    }
