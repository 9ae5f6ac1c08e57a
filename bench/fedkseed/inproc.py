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

    The one place this bench starts the server's round loop
    (``server.app.run_server``) and prepares a run (``prepare_run``).
    """
    from client.app import app as client_app
    from server.app import run_server
    from server.config import load_config
    from simulation.inprocess import InProcessGrid
    from simulation.prepare import prepare_run

    config = load_config(None, overrides_from_cli(spec["cli"]))
    run_dir = prepare_run(config)
    print(f"run folder: {run_dir}", flush=True)
    grid = InProcessGrid(client_app, config.federation.clients, run_dir=run_dir)
    run_server(grid, config, run_dir)
    return 0
