"""Pollinate's benchmarks, run on demand (``python -m bench.<name>``).

This package owns measurement code and its results: :mod:`bench.harness`
(machine info, timing, results files, markdown tables, run-folder readers,
child processes) and one module or sub-package per benchmark
(:mod:`bench.fedkseed`, :mod:`bench.sfprompt`, :mod:`bench.superlink_load`,
:mod:`bench.message_start`, :mod:`bench.seed_generator`). Results go to
``bench/results/``; ``bench/README.md`` says what each measures and how to
run it. Nothing in the ``pollinate`` packages imports this one.
"""
