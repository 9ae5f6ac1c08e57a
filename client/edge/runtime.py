"""Per-process state of an edge node: its opened bundle and its data, made once.

The edge twin of :class:`client.runtime.ClientRuntime` (which imports torch):
a ClientApp handler runs once per message, and opening a bundle (reading and
hashing its files, building the ONNX Runtime session) or tokenizing the
node's examples per message would dominate the round. One synced model per
(bundle, run, state folder) is kept, and the node's datasets in a
:class:`~client.local_data.DataCache`. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

from client.edge.engine import EdgeModel
from client.edge.state import EdgeZoState
from client.local_data import DataCache, LocalData
from client.node import NodeConfigError
from client.snapshots import ZO_STATE_ENV, snapshot_folder, state_root

__all__ = ["EdgeRuntime"]


class EdgeRuntime:
    """Caches keyed by what determines their content (small, process-wide).

    Parameters
    ----------
    max_datasets : int
        Tokenized datasets kept (see :class:`~client.local_data.DataCache`).
    """

    def __init__(self, max_datasets: int = 64) -> None:
        self._states: dict[tuple[str, int, str], EdgeZoState] = {}
        self._data = DataCache(max_datasets)

    def zo_state(self, bundle: Path, run_id: int, root: Path | None) -> EdgeZoState:
        """The seed-synced edge model of run ``run_id``, opened on first use.

        Snapshots go to ``<root>/<run id>-<spec fingerprint>`` where
        ``<root>`` is ``root`` (a simulated node's run-folder scratch space),
        else ``$POLLINATE_ZO_STATE_DIR`` (set by the client daemon to its
        ``--state-dir``).

        Raises
        ------
        EdgeBundleError
            If the bundle is damaged, altered, or not a bundle.
        NodeConfigError
            If there is no state folder.
        """
        base = state_root(root)
        if base is None:
            raise NodeConfigError(
                f"the onnx runtime keeps its synced model on disk: set {ZO_STATE_ENV} "
                "(pollinate client join sets it from --state-dir)"
            )
        key = (str(Path(bundle).resolve()), run_id, str(base))
        if key not in self._states:
            self._states.clear()  # one model per process is the budget
            model = EdgeModel.open(bundle)
            folder = snapshot_folder(base, run_id, model.bundle.spec.fingerprint())
            self._states[key] = EdgeZoState(model, folder)
        return self._states[key]

    def local_data(self, path: Path, model: EdgeModel) -> LocalData:
        """The node's examples tokenized by the bundle's tokenizer, read on first use."""
        spec = model.bundle.spec
        return self._data.get(
            path,
            spec.model,
            spec.max_length,
            lambda e: model.tokenize(e.prompt, e.response),
        )

    def count_examples(self, path: Path) -> int:
        """How many examples the node holds (reads the file if not cached)."""
        return self._data.count(path)
