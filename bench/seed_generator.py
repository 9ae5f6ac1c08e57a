"""Benchmark of the reproducible seed generator (protocols.seeds).

Measures, per backend, how many Gaussian values per second
:func:`protocols.seeds.gaussian` produces (numba, numpy and torch int ops on
CPU; torch int ops on CUDA when present), next to ``torch.randn`` as the fast
but non-reproducible reference; then the time of one MeZO perturbation
(:func:`~protocols.seeds.perturb_`) and of one FedKSeed replay
(:func:`~protocols.seeds.apply_seed_sum_`, K seeds) over a small
transformer-shaped parameter set. Writes ``bench/results/seed_generator.json``
(with machine information) and prints a markdown table.

Usage: ``python -m bench.seed_generator [--numel N] [--k K] [--layers L]``.
Timings are the fastest of several runs (the CPU may be shared).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.harness import (
    RESULTS_DIR,
    best_time,
    generation_throughput,
    machine_info,
    markdown_table,
    write_json,
)
from protocols.seeds import (
    GENERATOR_VERSION,
    apply_seed_sum_,
    candidate_seeds,
    gaussian,
    perturb_,
)

RESULTS = RESULTS_DIR / "seed_generator.json"
COLUMNS = ("what", "backend", "device", "values", "seconds", "M values/s")
TABLE_STYLE = {"align": "lllrrr", "compact": True}


def _table_row(r: dict[str, Any]) -> dict[str, str]:
    """One measured row as table cells (values = generated values in total)."""
    per_call = int(r["numel"])
    seeds = int(str(r["what"]).rsplit("K=", 1)[1]) if "K=" in str(r["what"]) else 1
    cells = (
        r["what"],
        r["backend"],
        r["device"],
        f"{per_call * seeds:,}",
        f"{r['seconds']:.4f}",
        f"{r['values_per_s'] / 1e6:,.1f}",
    )
    return {c: str(v) for c, v in zip(COLUMNS, cells, strict=True)}


def param_set(layers: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """A small decoder's float32 parameters: big matrices plus many small vectors."""
    d, ff, vocab = 128, 512, 8192
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (vocab, d))]
    for i in range(layers):
        p = f"layers.{i}."
        shapes += [
            (p + n, (d, d)) for n in ("q.weight", "k.weight", "v.weight", "o.weight")
        ]
        shapes += [(p + "up.weight", (ff, d)), (p + "up.bias", (ff,))]
        shapes += [(p + "down.weight", (d, ff)), (p + "down.bias", (d,))]
        shapes += [(p + "norm1.weight", (d,)), (p + "norm2.weight", (d,))]
    shapes.append(("norm.weight", (d,)))
    g = torch.Generator().manual_seed(0)
    return [(n, (torch.randn(s, generator=g) * 0.02).to(device)) for n, s in shapes]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, write the JSON file, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--numel", type=int, default=1 << 22, help="values per generation call"
    )
    parser.add_argument("--k", type=int, default=32, help="seeds in the replay")
    parser.add_argument(
        "--layers", type=int, default=4, help="decoder layers in the param set"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    rows: list[dict[str, object]] = []

    def sync_for(dev: torch.device) -> Callable[[], None]:
        return torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    # 1. generation throughput
    for dev in devices:
        backends = ["numba", "numpy", "torch"] if dev.type == "cpu" else ["torch"]
        for backend in backends:
            rate = generation_throughput(args.numel, backend, dev)
            rows.append(
                {
                    "what": "generate",
                    "backend": backend,
                    "device": dev.type,
                    "numel": args.numel,
                    "seconds": args.numel / rate,
                    "values_per_s": rate,
                }
            )
        t = best_time(lambda d=dev: torch.randn(args.numel, device=d), 5, sync_for(dev))
        rows.append(
            {
                "what": "generate",
                "backend": "torch.randn (not reproducible)",
                "device": dev.type,
                "numel": args.numel,
                "seconds": t,
                "values_per_s": args.numel / t,
            }
        )

    # 2. one perturbation and one K-seed replay over a parameter set
    seeds = candidate_seeds(2024, args.k)
    coefficients = (np.random.default_rng(0).normal(size=args.k) * 1e-4).tolist()
    for dev in devices:
        params = param_set(args.layers, dev)
        numel = sum(p.numel() for _, p in params)
        backends = ["numba", "numpy", "torch"] if dev.type == "cpu" else ["torch"]
        for backend in backends:
            t = best_time(
                lambda b=backend, ps=params: perturb_(ps, seeds[0], 1e-3, backend=b),
                args.repeats,
                sync_for(dev),
            )
            rows.append(
                {
                    "what": "perturb_",
                    "backend": backend,
                    "device": dev.type,
                    "numel": numel,
                    "tensors": len(params),
                    "seconds": t,
                    "values_per_s": numel / t,
                }
            )
            t = best_time(
                lambda b=backend, ps=params: apply_seed_sum_(
                    ps, seeds, coefficients, backend=b
                ),
                max(1, args.repeats - 1),
                sync_for(dev),
            )
            rows.append(
                {
                    "what": f"apply_seed_sum_ K={args.k}",
                    "backend": backend,
                    "device": dev.type,
                    "numel": numel,
                    "tensors": len(params),
                    "seconds": t,
                    "values_per_s": args.k * numel / t,
                }
            )
        if dev.type == "cpu":
            # Unfused reference: numba generation, then torch multiply and add.
            def unfused(ps=params) -> None:
                for name, p in ps:
                    acc = torch.zeros(p.numel())
                    for s, c in zip(seeds, coefficients, strict=True):
                        acc.add_(gaussian(s, name, p.numel(), backend="numba").mul_(c))
                    p.add_(acc.view(p.shape))

            t = best_time(unfused, max(1, args.repeats - 1), sync_for(dev))
            rows.append(
                {
                    "what": f"apply_seed_sum_ K={args.k}",
                    "backend": "numba gen + torch add (unfused)",
                    "device": dev.type,
                    "numel": numel,
                    "tensors": len(params),
                    "seconds": t,
                    "values_per_s": args.k * numel / t,
                }
            )

    result = {
        "benchmark": "seed_generator",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**machine_info(), "generator": GENERATOR_VERSION},
        "args": {
            "numel": args.numel,
            "k": args.k,
            "layers": args.layers,
            "repeats": args.repeats,
        },
        "rows": rows,
    }
    write_json(args.out, result)

    print(
        f"generator {GENERATOR_VERSION}; {result['machine']['cpu_count']} CPUs, "
        f"torch {torch.__version__}, CUDA: {result['machine']['cuda_device']}"
    )
    print()
    print("\n".join(markdown_table(map(_table_row, rows), COLUMNS, **TABLE_STYLE)))
    print()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
