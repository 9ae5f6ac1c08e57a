"""``partitions.json`` is validated when read: damage is one line naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from protocols.run_folder import RunFolder, RunFolderError


def _folder(tmp_path: Path, record: dict[str, Any]) -> RunFolder:
    folder = RunFolder(tmp_path)
    folder.write_partitions(record)
    return folder


def test_edge_partitions_and_ranks_round_trip(tmp_path: Path) -> None:
    """What preparation writes reads back: edge ids sorted, one rank per partition."""
    folder = RunFolder(tmp_path)
    folder.write_partitions(
        {"sizes": [5, 6, 7], "lora_ranks": [2, 4, 8]}, edge=[2, 0, 2]
    )
    (tmp_path / "edge-bundle").mkdir()
    assert folder.edge_partitions() == (0, 2)
    assert folder.edge_bundle(1) is None
    assert folder.edge_bundle(2) == (tmp_path / "edge-bundle").resolve()
    assert [folder.lora_rank(p) for p in range(3)] == [2, 4, 8]


@pytest.mark.parametrize(
    ("record", "needle"),
    [
        ({"sizes": "3", "edge": [0]}, "'sizes'"),
        ({"sizes": [1, 1], "edge": [0, 2]}, "'edge'"),
        ({"sizes": [1, 1], "edge": [1, 0]}, "'edge'"),
        ({"sizes": [1, 1], "edge": [True]}, "'edge'"),
    ],
)
def test_a_damaged_edge_list_is_refused(
    tmp_path: Path, record: dict[str, Any], needle: str
) -> None:
    """An edge list out of range, unsorted or not of ints is refused, naming the file.

    Breaks if a damaged file could make a partition run the wrong runtime.
    """
    folder = RunFolder(tmp_path)
    folder.partitions.write_text(json.dumps(record))
    with pytest.raises(RunFolderError, match=needle) as caught:
        folder.edge_partitions()
    assert str(folder.partitions) in str(caught.value)


@pytest.mark.parametrize("ranks", [[4], [4, 0], [4, "8"], "4"])
def test_damaged_ranks_are_refused(tmp_path: Path, ranks: object) -> None:
    """Ranks that are not one positive int per partition are refused, naming the file."""
    folder = _folder(tmp_path, {"sizes": [1, 1], "lora_ranks": ranks})
    with pytest.raises(RunFolderError, match="lora_ranks") as caught:
        folder.lora_rank(0)
    assert str(folder.partitions) in str(caught.value)
