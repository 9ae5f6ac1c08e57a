"""Edge clients in simulation: which partitions run the edge client, on which bundle.

A simulated federation can mix torch clients with edge clients (the FedKSeed
client on ONNX Runtime and NumPy, :mod:`client.edge`), to measure what an
inference-only device does to a run. ``[federation] edge_clients`` names
them; otherwise ``edge_share`` picks ``round(edge_share x clients)`` (half
up) partitions, drawn without replacement from
``numpy.random.default_rng([run.seed, stream])``, so one run seed always
makes the same clients edge clients (its stream differs from the attackers'
draw in :mod:`simulation.attacks`, so the two choices are independent).

Preparation records the choice in ``partitions.json`` and exports ONE edge
bundle of the run's spec into the run folder
(:meth:`protocols.run_folder.RunFolder.edge_bundle` tells a simulated client
whether it is an edge client and where its bundle is). A resumed run keeps
its bundle once :func:`protocols.edge_bundle.read_bundle` has checked it,
and exports it again only when it is missing.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import numpy as np

from protocols.edge_bundle import EdgeBundleError, read_bundle
from protocols.run_folder import RunFolder, RunFolderError
from server.config import RunConfig

__all__ = ["edge_partitions", "ensure_edge_bundle"]

log = logging.getLogger(__name__)

_EDGE_STREAM = 0xED6E
"""Second word of the edge clients' seed sequence (the first is the run seed)."""


def edge_partitions(config: RunConfig) -> tuple[int, ...]:
    """The partition ids of the edge clients, sorted (empty: none).

    ``federation.edge_clients`` when given; otherwise ``round(edge_share x
    clients)`` (half up) ids drawn from the run seed (see the module
    docstring).
    """
    fed = config.federation
    if fed.edge_clients:
        return tuple(sorted(set(fed.edge_clients)))
    count = min(fed.clients, math.floor(fed.edge_share * fed.clients + 0.5))
    if count == 0:
        return ()
    rng = np.random.default_rng([config.run.seed, _EDGE_STREAM])
    return tuple(sorted(int(p) for p in rng.choice(fed.clients, count, replace=False)))


def ensure_edge_bundle(run_dir: Path) -> Path | None:
    """The run folder's edge bundle, checked, exported first if missing.

    Nothing when ``partitions.json`` records no edge client. The bundle is
    exported (:func:`server.edge_bundle.export_edge`, from the run folder's
    config and held-out examples) into a staging folder and renamed into
    place, so a crash never leaves half a bundle where clients look for it.

    Raises
    ------
    protocols.run_folder.RunFolderError
        If the partition list is damaged, or the bundle in the folder fails
        :func:`~protocols.edge_bundle.read_bundle` (one line naming what
        differs).
    server.export.ExportError
        If the bundle cannot be exported.
    """
    from server.edge_bundle import export_edge

    folder = RunFolder(run_dir)
    if not folder.edge_partitions():
        return None
    target = folder.artefact(folder.edge_bundle_dir.name)
    if not target.exists():
        stage = target.with_name(f".{target.name}.new")
        shutil.rmtree(stage, ignore_errors=True)  # a crash's leftover
        export_edge(folder.path, stage)
        stage.rename(target)
        log.info("edge bundle exported to %s", target)
        return target  # just written and checked by the export
    try:
        read_bundle(target)
    except EdgeBundleError as exc:
        raise RunFolderError(
            f"{exc} (the run's edge bundle: remove {target} to export it again)"
        ) from None
    return target
