"""FedKSeed / FedKSeed-Pro on SmolLM2-135M: bytes, step time, memory, replay, task metric.

One module per measured quantity, each returning the JSON section it owns:

- :mod:`~bench.fedkseed.wire_bytes` (section 1): exact sizes of real
  ``train.zo`` instructions and replies;
- :mod:`~bench.fedkseed.step_time` (section 2): where a MeZO step's time goes;
- :mod:`~bench.fedkseed.memory` (section 3): peak RSS of ZO training over
  inference, in fresh subprocesses;
- :mod:`~bench.fedkseed.replay` (section 4): server replay against its floor;
- :mod:`~bench.fedkseed.task_metric` (section 5): Rouge-L at equal rounds
  against LoRA FedAvg, with :mod:`~bench.fedkseed.simulate` running the
  simulations (and :mod:`~bench.fedkseed.inproc` the no-Ray fallback);

plus :mod:`~bench.fedkseed.settings` (shared constants and data),
:mod:`~bench.fedkseed.rerun` (redo parts of a saved result) and
:mod:`~bench.fedkseed.report` (the markdown from the JSON). Run it with
``python -m bench.fedkseed --help``; ``bench/README.md`` explains the
sections and their caveats.
"""
