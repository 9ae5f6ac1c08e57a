"""The GPU path, measured: the timings behind ``bench/gpu_check.sh``.

Three sections, each timing the project's own code on a CUDA device at the
scale of a LLaMA-3B FedKSeed or LoRA round, beside a CPU reference at a
reduced, labelled scale (:mod:`bench.gpu.scales`):

- ``replay``: :func:`protocols.seeds.apply_seed_sum_`, the server's rebuild of
  the global model from a round's (seed, coefficient) pairs
  (:mod:`bench.gpu.replay`);
- ``eval``: :meth:`server.evaluation.CentralEvaluator.evaluate`, loss and
  greedy generation (:mod:`bench.gpu.evaluation`);
- ``lora``: :func:`strategies.lora_rules.aggregate`, FedAvg and FlexLoRA
  (:mod:`bench.gpu.lora`).

:mod:`bench.gpu.report` writes ``bench/results/gpu_check.json`` and ``.md``
with the GPU, CUDA and torch versions and the outcome of the ``gpu``-marked
tests. ``python -m bench.gpu --cpu-smoke --out-dir DIR`` runs every section
at a tiny scale on the CPU in seconds.
"""

from bench.gpu.report import SECTIONS, STEM
from bench.gpu.scales import GPU, SMOKE, CheckScale

__all__ = ["GPU", "SECTIONS", "SMOKE", "STEM", "CheckScale"]
