"""``pollinate validate``: check a config without starting anything.

Builds the whole config and the configured method's spec (on a weightless
skeleton of the model, so every method's settings are checked against the
real architecture in a moment), checks that the data source and the model
name can be resolved, then reports every problem together.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from cli.overrides import add_config_arguments, collect_overrides

if TYPE_CHECKING:
    from server.config import RunConfig

__all__ = ["add_parser", "check_resources", "run"]

EPILOG = """examples:
  pollinate validate run.toml
  pollinate validate run.toml --clients 0     # reports federation.clients
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the subcommand."""
    parser = sub.add_parser(
        "validate",
        help="check a run config and name every offending field",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, config_required=True)
    parser.set_defaults(handler=run)


def check_resources(config: RunConfig) -> list[str]:
    """Problems with what the config points at (files, model names, spec)."""
    # Here, not at import: --help stays light.
    from models import BUILTIN_MODELS

    problems: list[str] = []
    source = config.data.source
    if not source.startswith("builtin:") and not Path(source).is_file():
        problems.append(f"data.source: file not found: {source}")
    elif source.startswith("builtin:") and source != "builtin:tasks":
        problems.append(
            f"data.source: unknown built-in {source!r} (known: builtin:tasks)"
        )
    name = config.model.name
    looks_local = name.startswith((".", "/", "~"))
    if (
        name not in BUILTIN_MODELS
        and looks_local
        and not Path(name).expanduser().is_dir()
    ):
        problems.append(f"model.name: no model folder at {name}")
    if not problems or not problems[-1].startswith("model.name"):
        problems.extend(_check_spec(config))
    return problems


def _check_spec(config: RunConfig) -> list[str]:
    """Build the configured method's spec; its refusal names the bad setting."""
    from models import ModelLoadError
    from protocols.errors import ProtocolError
    from server.methods import build_spec

    try:
        build_spec(config)
    except ProtocolError as exc:
        return [f"{config.run.method}: {exc}"]
    except ModelLoadError as exc:
        return [f"model.name: {exc}"]
    return []


def run(args: argparse.Namespace, console: Console) -> int:
    """Validate; exit status 0 when valid, 2 otherwise."""
    # Here, not at import: --help stays light.
    from server.config import ConfigError, load_config

    try:
        config = load_config(Path(args.config), collect_overrides(args))
    except (ConfigError, ValueError) as exc:
        console.print(f"[red]invalid[/]: {exc}")
        return 2
    problems = check_resources(config)
    if problems:
        console.print(f"[red]invalid[/]: {args.config}")
        for p in problems:
            console.print(f"  - {p}")
        return 2
    console.print(
        f"[green]valid[/]: {args.config}: method {config.run.method}, "
        f"{config.federation.clients} clients, {config.run.rounds} rounds, "
        f"model {config.model.name}, data {config.data.source}"
    )
    return 0
