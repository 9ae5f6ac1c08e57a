"""The edge client benchmark (issue 11): ``python -m bench.edge``.

On SmolLM2-135M-Instruct with Natural Instructions, side by side in one run:

1. install footprint (:mod:`~bench.edge.footprint`);
2. peak memory of ORT inference alone, the edge client and the torch client
   (:mod:`~bench.edge.memory`);
3. seconds per ZO step, edge against torch (:mod:`~bench.edge.step_time`);
4. generated values and replay seconds per round for full, subset and
   adapter perturbation (:mod:`~bench.edge.replay`);
5. held-out loss and Rouge-L after an equal training wall-clock budget
   (:mod:`~bench.edge.quality`).

Sections 1-3 share one edge bundle, exported in a child process; the
measured runs are children too (:mod:`~bench.edge.children`).
:mod:`~bench.edge.settings` holds the sizes and the method settings,
:mod:`~bench.edge.report` builds the markdown and the plot from the JSON.
"""
