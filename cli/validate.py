"""``pollinate validate``: check a config without starting anything.

Builds the whole config, reads the data the way a run will (every record,
gzip integrity, schema) and splits it as configured (held-out set or held-out
groups, one partition per client, each at least ``data.min_partition_size``
examples), checks where run folders go, and builds the configured method's
spec on a weightless skeleton of the model (at the longest length
``model.max_length = "auto"`` can give), so every method's settings are checked
against the real architecture in a moment. Every problem is reported
together, on one line, with exit status 2.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from cli.errors import one_line
from cli.overrides import add_config_arguments, collect_overrides

if TYPE_CHECKING:
    from server.config import RunConfig

__all__ = ["add_parser", "check_resources", "load_checked_config", "run"]

EPILOG = """examples:
  pollinate validate run.toml
  pollinate validate run.toml --clients 0     # reports federation.clients
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the subcommand."""
    parser = sub.add_parser(
        "validate",
        help="check a run config and its data, and name every offending field",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, config_required=True)
    parser.set_defaults(handler=run)


def check_resources(config: RunConfig, *, deployed: bool = False) -> list[str]:
    """Problems with what the config points at: output folder, data, model, spec.

    Each problem is one line that starts with the field it is about. A
    ``deployed`` server's ``data.source`` only gives the held-out set (its
    devices hold their own data), so it is read but not partitioned, and it
    refuses an ``[attack]`` with malicious clients (attacks are simulated).
    """
    problems = _check_output_dir(config.run.output_dir)
    if deployed:
        problems += _check_no_attack(config)
    problems += _check_data(config, partitioned=not deployed)
    model_problems = _check_model(config)
    problems += model_problems or _check_spec(config)
    problems += _check_device(config)
    return [one_line(p) for p in problems]


def _check_no_attack(config: RunConfig) -> list[str]:
    """A deployed server has real clients: it cannot simulate attackers."""
    # Here, not at import: --help stays light.
    from simulation.attacks import malicious_partitions

    malicious = malicious_partitions(config)
    if not malicious:
        return []
    return [
        f"attack.behaviour: {config.attack.behaviour!r} with {len(malicious)} "
        "malicious client(s) is for simulations only; a deployed server refuses "
        "it (set attack.behaviour = 'none')"
    ]


def _check_output_dir(output_dir: Path) -> list[str]:
    """Run folders are made under ``output_dir``: it must be (or become) a folder."""
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return [f"run.output_dir: {existing} is a file, not a folder"]
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        return [f"run.output_dir: cannot create folders in {existing}"]
    return []


def _check_data(config: RunConfig, *, partitioned: bool = True) -> list[str]:
    """Read the data and split it exactly as ``prepare_run`` will."""
    # Here, not at import: --help stays light.
    from corpora import DatasetError, eval_size, load_examples, split_for_run

    data = config.data
    try:
        examples = load_examples(data.source, limit=data.limit, seed=config.run.seed)
    except DatasetError as exc:
        return [f"data.source: {exc}"]
    where = f"the {len(examples)} examples of {data.source}"
    n_eval = eval_size(data.eval_examples, len(examples))
    if n_eval >= len(examples):
        return [f"data.eval_examples ({n_eval}) must be smaller than {where}"]
    try:
        split = split_for_run(
            examples,
            heldout_groups=data.heldout_groups,
            heldout_group_count=data.heldout_group_count,
            n_eval=data.eval_examples,
            seed=config.run.seed,
        )
    except DatasetError as exc:
        return [f"data.{exc}"]  # its message starts with the field's name
    if not partitioned:
        return []
    held = (
        f"{len(split.heldout_groups)} groups held out whole"
        if split.heldout_groups
        else f"data.eval_examples={n_eval} held out"
    )
    return _check_partitions(config, [e.group for e in split.train], held)


def _check_partitions(config: RunConfig, groups: list[str], held: str) -> list[str]:
    """The training examples (their ``groups``) shared as ``prepare_run`` will."""
    from simulation.partitioning import PartitionError, partition

    data, clients = config.data, config.federation.clients
    where = f"the {len(groups)} training examples of {data.source} (after {held})"
    if clients > len(groups):
        return [f"federation.clients ({clients}) exceeds {where}"]
    if clients * data.min_partition_size > len(groups):
        return [
            f"data.min_partition_size ({data.min_partition_size}) x federation.clients "
            f"({clients}) = {clients * data.min_partition_size} exceeds {where}"
        ]
    distinct = len(set(groups))
    if data.partitioning == "task" and clients > distinct:
        return [
            f"data.partitioning 'task' gives every client whole groups, but "
            f"federation.clients ({clients}) exceeds the {distinct} groups of "
            f"{data.source} left for training (after {held})"
        ]
    try:
        partition(
            groups,
            clients,
            data.partitioning,
            alpha=data.alpha,
            seed=config.run.seed,
            min_partition_size=data.min_partition_size,
        )
    except PartitionError as exc:
        return [f"data.partitioning: {exc}"]
    return []


def _check_model(config: RunConfig) -> list[str]:
    """A local model name must be a folder."""
    # Here, not at import: --help stays light.
    from models import BUILTIN_MODELS

    problems: list[str] = []
    name = config.model.name
    looks_local = name.startswith((".", "/", "~"))
    if name not in BUILTIN_MODELS and looks_local:
        folder = Path(name).expanduser()
        if folder.is_file():
            problems.append(f"model.name: {name} is a file, not a model folder")
        elif not folder.is_dir():
            problems.append(f"model.name: no model folder at {name}")
    return problems


def _check_device(config: RunConfig) -> list[str]:
    """``eval.device = "cuda"`` fails at the first evaluation without CUDA."""
    if config.eval.device != "cuda":
        return []
    import torch

    if torch.cuda.is_available():
        return []
    return ["eval.device: 'cuda', but this machine has no CUDA device"]


def _check_spec(config: RunConfig) -> list[str]:
    """Build the configured method's spec; its refusal names the bad setting."""
    from models import ModelLoadError
    from models.batching import FIT_MAX_LENGTH
    from protocols.errors import ProtocolError
    from server.methods import build_spec

    if config.model.max_length == "auto":
        # Fitted to the data when the run is prepared: check the spec at the
        # longest length "auto" can give.
        model = config.model.model_copy(update={"max_length": FIT_MAX_LENGTH})
        config = config.model_copy(update={"model": model})
    try:
        build_spec(config)
    except ProtocolError as exc:
        return [f"{config.run.method}: {exc}"]
    except ModelLoadError as exc:
        return [f"model.name: {exc}"]
    return []


def load_checked_config(
    path: Path | None, args: argparse.Namespace, *, deployed: bool = False
) -> RunConfig:
    """The config of ``path`` plus the overrides in ``args``, fully checked.

    ``deployed``: for ``server start``, whose devices hold the training data
    (see :func:`check_resources`).

    Raises
    ------
    server.config.ConfigError
        Naming every bad field or resource on one line.
    """
    # Here, not at import: --help stays light.
    from server.config import ConfigError, load_config

    config = load_config(path, collect_overrides(args))
    problems = check_resources(config, deployed=deployed)
    if problems:
        origin = str(path) if path is not None else "the command line"
        raise ConfigError(
            f"{origin}: {len(problems)} problem(s): " + "; ".join(problems)
        )
    return config


def run(args: argparse.Namespace, console: Console) -> int:
    """Validate; exit status 0 when valid (2, through ``main``, otherwise)."""
    config = load_checked_config(Path(args.config), args)
    console.print(
        f"[green]valid[/]: {args.config}: method {config.run.method}, "
        f"{config.federation.clients} clients, {config.run.rounds} rounds, "
        f"model {config.model.name}, data {config.data.source}"
    )
    return 0
