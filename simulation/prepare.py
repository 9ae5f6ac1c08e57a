"""Preparing a simulation run folder: config, held-out set and partitions.

Everything a run reads is materialised here, once, before any process
starts: the resolved ``config.toml`` (``model.max_length``,
``data.eval_examples`` and the held-out groups settled by the data:
:mod:`server.run_data`), ``data/eval.jsonl`` (held out for the server), one
``data/client-NNNN.jsonl`` per simulated client (exactly the file a deployed
client would be given with ``--data``), ``partitions.json`` (who holds which
groups, which groups are held out whole and, under ``[attack]``, which
clients are malicious and how) and the one-time model conversion. A data attack (``label_flip``,
``shuffle_labels``) is applied here, to the malicious clients' files only
(:mod:`simulation.attacks`). With edge clients (``[federation] edge_share``
or ``edge_clients``), ``partitions.json`` records which partitions they are
and the run's edge bundle is exported into the run folder
(:mod:`simulation.edge`). With ``[federation] lora_ranks`` it records each
client's LoRA rank, which the simulated node reports at hello. The engine and
the apps then only read files, which keeps runs reproducible and restartable.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from corpora import write_jsonl
from models import prepare_model
from protocols.durable import atomic_write_text
from protocols.run_folder import PARTITION_RANKS_KEY, RunFolder
from server.config import RunConfig, config_to_toml, simulated_lora_ranks
from server.run_data import load_run_data
from simulation.attacks import describe_attack, poison_examples
from simulation.edge import edge_partitions, ensure_edge_bundle
from simulation.partitioning import describe, partition

__all__ = ["new_run_dir", "prepare_run"]

log = logging.getLogger(__name__)


def new_run_dir(config: RunConfig) -> Path:
    """A fresh folder ``<output_dir>/<name>-<UTC time>`` (suffixed if taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = config.run.output_dir / f"{config.run.name}-{stamp}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    candidate.mkdir(parents=True)
    return candidate


def prepare_run(config: RunConfig, run_dir: Path | None = None) -> Path:
    """Write everything the run reads into ``run_dir`` (new if ``None``).

    Raises
    ------
    corpora.DatasetError
        If the data source cannot be read.
    simulation.partitioning.PartitionError
        If the examples cannot be split as configured.
    models.ModelLoadError
        If a built-in model needs a package that is not installed.
    simulation.attacks.AttackError
        If a data attack cannot be applied (``label_flip`` with one response).
    server.export.ExportError
        If the edge clients' bundle cannot be exported.
    server.config.ConfigError
        If the simulated clients' LoRA ranks are not allowed
        (:func:`server.config.simulated_lora_ranks`).
    """
    ranks = simulated_lora_ranks(config)  # before any work: a bad rank fails fast
    data = load_run_data(config)
    config, train, held_out = data.config, data.train, data.evaluation
    parts = partition(
        [e.group for e in train],
        config.federation.clients,
        config.data.partitioning,
        alpha=config.data.alpha,
        seed=config.run.seed,
        min_partition_size=config.data.min_partition_size,
    )
    targets = [e.response for e in train]
    client_examples = [
        poison_examples(config, pid, [train[i] for i in indices], targets)
        for pid, indices in enumerate(parts)
    ]
    run_dir = run_dir or new_run_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(run_dir)
    for pid, mine in enumerate(client_examples):
        write_jsonl(mine, folder.client_data(pid))
    write_jsonl(held_out, folder.eval_data)
    summary: dict[str, object] = {
        "scheme": config.data.partitioning,
        "sizes": [len(p) for p in parts],
        "groups": describe(parts, [e.group for e in train]),
    }
    if data.heldout_groups:
        summary["heldout_groups"] = list(data.heldout_groups)
    attack = describe_attack(config)
    if attack is not None:
        summary["attack"] = attack
        log.warning(
            "attack: partitions %s are malicious (%s)",
            attack["malicious"],
            attack["behaviour"],
        )
    if ranks:  # each simulated node reads its rank here (client.node)
        summary[PARTITION_RANKS_KEY] = list(ranks)
    edge = edge_partitions(config)
    if edge:
        log.info("edge clients: partitions %s run on ONNX Runtime", list(edge))
    folder.write_partitions(summary, edge)
    atomic_write_text(folder.config, config_to_toml(config))
    prepare_model(config.model.name)
    ensure_edge_bundle(run_dir)
    return run_dir
