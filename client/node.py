"""What a client node knows about itself: its data, device and cache.

Parsed once per message from Flower's ``Context``: in deployment the
SuperNode's ``--node-config`` gives ``data-path`` (and optionally ``label``,
``device``); in simulation each virtual node has a ``partition-id`` and reads
the partition file that the simulation prepared in its run folder (named by
the run config key ``run-dir`` or the ``POLLINATE_RUN_DIR`` environment
variable set by ``pollinate simulate``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Context

__all__ = ["NodeConfigError", "NodeSettings", "partition_file"]

RUN_DIR_ENV = "POLLINATE_RUN_DIR"


class NodeConfigError(ValueError):
    """The node was started without what it needs (e.g. no data)."""


def partition_file(run_dir: Path, partition_id: int) -> Path:
    """Where a simulation run keeps the examples of one partition."""
    return run_dir / "data" / f"client-{partition_id:04d}.jsonl"


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """A node's local settings.

    Attributes
    ----------
    data_path : Path
        The node's local examples (JSONL/JSON/CSV, see :mod:`corpora`).
    label : str
        A stable name for the node, used to order nodes reproducibly.
    device : torch.device
        Where local training runs.
    """

    data_path: Path
    label: str
    device: torch.device
    methods: tuple[str, ...] = ()

    def accept(self, method: str) -> None:
        """Refuse a method this node was not started for.

        Raises
        ------
        NodeConfigError
            If the node limits its methods and ``method`` is not one of them.
        """
        if self.methods and method not in self.methods:
            raise NodeConfigError(
                f"this node accepts {list(self.methods)}, not {method!r} "
                "(pollinate client join --method ...)"
            )

    @classmethod
    def from_context(cls, context: Context, run_dir: str | None = None) -> NodeSettings:
        """Parse ``context.node_config`` (and, in simulation, find the run folder).

        A simulated node's run folder is ``run_dir`` (bound into the app by
        the simulation), else the run config's ``run-dir``, else
        ``$POLLINATE_RUN_DIR``.

        Raises
        ------
        NodeConfigError
            If neither ``data-path`` nor a ``partition-id`` with a run folder
            is available.
        """
        cfg = context.node_config
        device_name = str(cfg.get("device", "cpu"))
        if device_name == "cuda" and not torch.cuda.is_available():
            raise NodeConfigError(
                "node config asks for device 'cuda' but CUDA is absent"
            )
        device = torch.device(device_name)
        if "data-path" in cfg:
            path = Path(str(cfg["data-path"]))
            methods = tuple(m for m in str(cfg.get("methods", "")).split(",") if m)
            return cls(path, str(cfg.get("label", path.stem)), device, methods)
        if "partition-id" in cfg:
            pid = int(cfg["partition-id"])
            run_dir = (
                run_dir
                or context.run_config.get("run-dir")
                or os.environ.get(RUN_DIR_ENV)
            )
            if not run_dir:
                raise NodeConfigError(
                    "simulated node has a partition-id but no run folder: set run "
                    f"config 'run-dir' or the {RUN_DIR_ENV} environment variable"
                )
            return cls(partition_file(Path(str(run_dir)), pid), f"p{pid:04d}", device)
        raise NodeConfigError(
            "node config has neither 'data-path' nor 'partition-id': start the node "
            "with --node-config 'data-path=\"/path/to/data.jsonl\"'"
        )
