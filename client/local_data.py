"""A node's local examples, read once per process and tokenized per model.

Both client runtimes (the torch :class:`client.runtime.ClientRuntime` and the
edge :class:`client.edge.runtime.EdgeRuntime`) keep their datasets in a
:class:`DataCache`; it needs no torch (the tokenizer is passed in as a
function), so an edge node counts and tokenizes its examples with it too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from corpora import Example, load_examples
from models.text import TokenizedExample

__all__ = ["DataCache", "LocalData"]


@dataclass(frozen=True)
class LocalData:
    """A node's examples, raw and tokenized for one model."""

    examples: tuple[Example, ...]
    tokenized: tuple[TokenizedExample, ...]


class DataCache:
    """Datasets keyed by (file, model, max length); the oldest dropped past a bound.

    Parameters
    ----------
    max_datasets : int
        How many tokenized datasets to keep (a simulation process serves many
        virtual nodes, each with its own file).
    """

    def __init__(self, max_datasets: int = 64) -> None:
        self._data: dict[tuple[str, str, int], LocalData] = {}
        self._max_datasets = max_datasets

    def get(
        self,
        path: Path,
        model: str,
        max_length: int,
        tokenize: Callable[[Example], TokenizedExample],
    ) -> LocalData:
        """The examples of ``path`` tokenized by ``tokenize``, read on first use.

        ``tokenize`` must be the tokenizer of ``model`` with ``max_length``:
        the key assumes it.
        """
        key = (str(path), model, max_length)
        if key not in self._data:
            if len(self._data) >= self._max_datasets:
                self._data.pop(next(iter(self._data)))
            examples = tuple(load_examples(str(path)))
            tokenized = tuple(tokenize(e) for e in examples)
            self._data[key] = LocalData(examples, tokenized)
        return self._data[key]

    def count(self, path: Path) -> int:
        """How many examples ``path`` holds (reads the file if not cached)."""
        for (p, _, _), data in self._data.items():
            if p == str(path):
                return len(data.examples)
        return len(load_examples(str(path)))
