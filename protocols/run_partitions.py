"""``partitions.json``: which examples, edge runtime and LoRA rank each client has.

Simulation preparation writes it (:meth:`protocols.run_folder.RunFolder.write_partitions`);
simulated clients and the server read it through the run folder, which hands
the parsed record to the checks here. Every field other code relies on is
validated when read, so a damaged file is refused with one line naming it.

Fields: ``sizes`` (examples per partition), ``edge`` (the sorted partition ids
that run the edge client, :data:`EDGE_KEY`), ``lora_ranks`` (one rank per
partition when ranks differ, :data:`RANKS_KEY`), plus what preparation records
for people (groups, held-out groups).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from protocols.run_errors import RunFolderError

__all__ = ["EDGE_KEY", "RANKS_KEY", "edge_partitions", "lora_rank", "partitions_text"]

EDGE_KEY = "edge"
"""``partitions.json``: the partitions that run the edge client."""
RANKS_KEY = "lora_ranks"
"""``partitions.json``: each partition's LoRA rank (heterogeneous ranks only)."""


def partitions_text(summary: Mapping[str, Any], edge: Sequence[int] = ()) -> str:
    """The file's text: ``summary`` plus the ``edge`` partitions, stored sorted."""
    return json.dumps({**summary, EDGE_KEY: sorted(set(edge))}, indent=1)


def edge_partitions(record: Mapping[str, Any] | None, path: Path) -> tuple[int, ...]:
    """The partitions ``record`` (read from ``path``) lists as edge clients.

    Empty when there is no record or no ``edge`` list (a deployed run, a run
    folder from before edge clients).

    Raises
    ------
    RunFolderError
        If ``sizes`` is not a list, or ``edge`` is not a sorted list of
        distinct partition ids below ``len(sizes)``.
    """
    if record is None or record.get(EDGE_KEY) is None:
        return ()
    sizes, edge = record.get("sizes"), record[EDGE_KEY]
    if not isinstance(sizes, list):
        raise RunFolderError(f"{path} is damaged: 'sizes' is {sizes!r}")
    ok = isinstance(edge, list) and all(
        isinstance(p, int) and not isinstance(p, bool) and 0 <= p < len(sizes)
        for p in edge
    )
    if not ok or edge != sorted(set(edge)):
        raise RunFolderError(
            f"{path} is damaged: 'edge' must list distinct sorted "
            f"partition ids from 0 to {len(sizes) - 1}, got {edge!r}"
        )
    return tuple(edge)


def lora_rank(
    record: Mapping[str, Any] | None, path: Path, partition_id: int
) -> int | None:
    """Partition ``partition_id``'s rank in ``record`` (None: the run's one rank).

    Raises
    ------
    RunFolderError
        If ``lora_ranks`` is present but not one positive int per partition.
    """
    record = record or {}
    ranks, n = record.get(RANKS_KEY), len(record.get("sizes") or ())
    ok = isinstance(ranks, list) and len(ranks) == n
    if ranks is not None and not (ok and all(type(r) is int and r > 0 for r in ranks)):
        raise RunFolderError(f"{path} is damaged: {RANKS_KEY} {ranks!r}")
    return ranks[partition_id] if ranks and 0 <= partition_id < n else None
