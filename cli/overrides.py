"""Command-line settings shared by subcommands: config file plus overrides.

Named flags (``--clients 8``) and generic ``--set section.field=value`` pairs
both become dotted-key overrides for :func:`server.config.load_config`. A
``--set`` value is read as a TOML value when it parses as one (``8``,
``0.5``, ``true``, ``["q_proj"]``) and as a plain string otherwise.
"""

from __future__ import annotations

import argparse
import tomllib
from typing import Any

__all__ = ["FLAG_FIELDS", "add_config_arguments", "collect_overrides"]

# flag -> (dotted field, type, help)
FLAG_FIELDS: dict[str, tuple[str, type, str]] = {
    "--name": ("run.name", str, "run name (run folder prefix)"),
    "--method": ("run.method", str, "lora | fedkseed | fedkseed-pro | sfprompt"),
    "--rounds": ("run.rounds", int, "federated rounds"),
    "--seed": ("run.seed", int, "seed of every random draw"),
    "--output-dir": ("run.output_dir", str, "folder that receives run folders"),
    "--model": (
        "model.name",
        str,
        "smollm2-135m, tiny-llama, a HF id or a local folder",
    ),
    "--dataset": ("data.source", str, "builtin:tasks or a JSON/JSONL/CSV file"),
    "--limit": ("data.limit", int, "use a seeded subset of this many examples"),
    "--partition": ("data.partitioning", str, "iid | dirichlet | task"),
    "--alpha": ("data.alpha", float, "Dirichlet concentration (smaller = more skew)"),
    "--clients": ("federation.clients", int, "number of simulated clients"),
    "--fraction": ("federation.fraction", float, "share of clients sampled per round"),
    "--local-steps": ("train.local_steps", int, "local optimizer steps per round"),
    "--batch-size": ("train.batch_size", int, "examples per local step"),
    "--lr": ("train.learning_rate", float, "local AdamW learning rate"),
    "--lora-rank": ("lora.rank", int, "LoRA rank"),
}


def add_config_arguments(
    parser: argparse.ArgumentParser, *, config_required: bool
) -> None:
    """Add the CONFIG positional, the named flags and ``--set``."""
    parser.add_argument(
        "config",
        nargs=None if config_required else "?",
        help="TOML run config (defaults are used where it is silent)",
    )
    group = parser.add_argument_group("overrides (win over the config file)")
    for flag, (field, kind, text) in FLAG_FIELDS.items():
        group.add_argument(flag, type=kind, default=None, help=f"{text} [{field}]")
    group.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="any other setting, e.g. --set lora.alpha=32 (repeatable)",
    )


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def collect_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted-key overrides from parsed arguments.

    Raises
    ------
    server.config.ConfigError
        If a ``--set`` is not ``section.field=value``; the message names it.
    """
    # Here, not at import: --help stays light.
    from server.config import ConfigError

    overrides: dict[str, Any] = {}
    for flag, (field, _, _) in FLAG_FIELDS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            overrides[field] = value
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} must look like section.field=value")
        overrides[key.strip()] = _parse_value(value.strip())
    return overrides
