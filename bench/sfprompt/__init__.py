"""SFPrompt (split learning with soft prompts) on SmolLM2-135M: bytes, compute, memory, task.

One module per measured quantity, each returning the JSON section it owns:

- :mod:`~bench.sfprompt.wire_bytes` (section 1): bytes per client-round,
  activations included, against LoRA FedAvg and full-model FedAvg;
- :mod:`~bench.sfprompt.flops`, :mod:`~bench.sfprompt.compute` and
  :mod:`~bench.sfprompt.local_path` (section 2): device compute against
  full local fine-tuning (analytic FLOPs, measured time) and what the
  local-loss path sees;
- :mod:`~bench.sfprompt.memory` (section 3): device peak memory against full
  fine-tuning, in fresh subprocesses;
- :mod:`~bench.sfprompt.task_metric` (section 4): task metric at equal
  rounds against LoRA FedAvg;

plus :mod:`~bench.sfprompt.settings` (shared constants, data, the split
step) and :mod:`~bench.sfprompt.report` (the markdown from the JSON). Run it
with ``python -m bench.sfprompt --help``; ``bench/README.md`` explains the
sections and their caveats.
"""
