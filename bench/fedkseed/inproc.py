"""The in-process fallback of section 5: one run without Ray, in its own process.

``python -m bench.fedkseed --inproc-run '{"cli": [...]}'`` builds the run's
config from the ``pollinate simulate`` arguments, prepares the run folder as
``pollinate simulate`` does, and runs the server's round loop against a
:class:`simulation.inprocess.InProcessGrid` that hands each real Flower
message to Pollinate's ClientApp.
"""

from __future__ import annotations

from typing import Any


def overrides_from_cli(cli_args: list[str]) -> dict[str, Any]:
    """Dotted-key overrides from a ``pollinate simulate`` argument list."""
    import tomllib

    from cli.overrides import FLAG_FIELDS

    out: dict[str, Any] = {}
    it = iter(cli_args)
    for arg in it:
        if arg == "simulate":
            continue
        value = next(it)
        if arg == "--set":
            key, text = value.split("=", 1)
            try:
                out[key] = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                out[key] = text
        else:
            field, kind, _ = FLAG_FIELDS[arg]
            out[field] = kind(value)
    return out


def inproc_main(spec: dict[str, Any]) -> int:
    """Child process: one run without Ray (same prepare, server loop, ClientApp).

    The run is :func:`bench.harness.serve_in_process` (the one place the
    benchmarks prepare an in-process run and start its round loop); what
    stops it is raised, so the child fails with its traceback in the log.
    """
    from bench.harness import serve_in_process

    serve_in_process(
        overrides_from_cli(spec["cli"]),
        simulation=False,
        on_run_dir=lambda run_dir: print(f"run folder: {run_dir}", flush=True),
    )
    return 0
