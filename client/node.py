"""What a client node knows about itself: its data, device and methods.

Parsed once per message from Flower's ``Context``, by one channel per engine:
in deployment the SuperNode's ``--node-config`` gives ``data-path`` (and
optionally ``label``, ``device``, ``methods``, ``auth-key``: the private
key the SuperNode authenticates with, which signs the node's hello, and
``runtime`` with ``bundle``: ``runtime = "onnx"`` makes the node an edge
client that trains the edge bundle in folder ``bundle`` on ONNX Runtime); in
simulation each virtual
node has a ``partition-id`` and reads its partition file from the run folder
that the run config key ``run-dir`` names
(:data:`protocols.run_folder.RUN_DIR_KEY`); the run folder also says which
partitions run on ONNX Runtime, and with which bundle.

Parsing needs no torch (an edge node has none); :attr:`NodeSettings.device`
builds the ``torch.device`` when a torch handler asks for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context

from protocols.methods import UnknownMethodError, get_method

if TYPE_CHECKING:
    import torch

__all__ = ["RUNTIMES", "NodeConfigError", "NodeSettings"]

RUNTIMES = ("torch", "onnx")
"""Node config ``runtime`` values: PyTorch (default) or the edge client."""


class NodeConfigError(ValueError):
    """The node was started without what it needs (e.g. no data)."""


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """A node's local settings.

    Attributes
    ----------
    data_path : Path
        The node's local examples (JSONL/JSON/CSV, see :mod:`corpora`).
    label : str
        A stable name for the node, used to order nodes reproducibly.
    device_name : str
        Where local training runs (``cpu``, ``cuda``, ``cuda:1``...);
        :attr:`device` is it as a ``torch.device``.
    methods : tuple[str, ...]
        Registered method names this node serves (empty: all).
    state_dir : Path | None
        Where method state that outlives a message goes (FedKSeed's seed
        snapshots): a simulated node's run folder scratch space; ``None`` for
        a deployed node, whose daemon sets it in the environment.
    auth_key : Path | None
        The node's OpenSSH EC private key (node config ``auth-key``), which
        signs its hello so that the server binds its label to its key;
        ``None`` where nodes do not authenticate.
    runtime : str
        ``"torch"`` (default) or ``"onnx"``: an edge client, which trains
        FedKSeed on ONNX Runtime without torch.
    bundle : Path | None
        The edge bundle folder of an ``onnx`` node (None for ``torch``).
    lora_rank : int | None
        The LoRA rank this node trains (node config ``lora-rank``; a
        simulated node's comes from its run folder), reported at hello; None:
        the run's global rank.
    """

    data_path: Path
    label: str
    device_name: str = "cpu"
    methods: tuple[str, ...] = ()
    state_dir: Path | None = None
    auth_key: Path | None = None
    runtime: str = "torch"
    bundle: Path | None = None
    lora_rank: int | None = None

    @property
    def device(self) -> torch.device:
        """:attr:`device_name` as a ``torch.device`` (imports torch)."""
        import torch

        return torch.device(self.device_name)

    def read_auth_key(self) -> bytes | None:
        """The private key's bytes, or None without ``auth-key``.

        Raises
        ------
        NodeConfigError
            If the key file cannot be read.
        """
        if self.auth_key is None:
            return None
        try:
            return self.auth_key.read_bytes()
        except OSError as exc:
            raise NodeConfigError(
                f"node config 'auth-key': cannot read {self.auth_key}: "
                f"{exc.strerror or exc}"
            ) from None

    def accept(self, action: str) -> None:
        """Refuse an instruction for a method this node was not started for.

        ``action`` is the instruction's training action; a node started for
        ``fedkseed`` serves FedKSeed-Pro too, since both train the same way.

        Raises
        ------
        NodeConfigError
            If the node limits its methods and none of them trains as
            ``action``.
        """
        if self.methods and all(get_method(m).action != action for m in self.methods):
            raise NodeConfigError(
                f"this node accepts {list(self.methods)}, not {action!r} "
                "training (pollinate client join --method ...)"
            )

    @classmethod
    def from_context(cls, context: Context) -> NodeSettings:
        """Parse ``context.node_config`` (and, in simulation, find the run folder).

        A simulated node's run folder is the run config's ``run-dir``.

        Raises
        ------
        NodeConfigError
            If neither ``data-path`` nor a ``partition-id`` with a run folder
            is available.
        """
        cfg = context.node_config
        device = str(cfg.get("device", "cpu"))
        key = str(cfg.get("auth-key", ""))
        auth_key = Path(key) if key else None
        if "data-path" in cfg:
            path = Path(str(cfg["data-path"]))
            methods = tuple(m for m in str(cfg.get("methods", "")).split(",") if m)
            try:
                for name in methods:
                    get_method(name)
            except UnknownMethodError as exc:
                raise NodeConfigError(f"node config 'methods': {exc}") from None
            label = str(cfg.get("label", path.stem))
            runtime, bundle = _runtime(cfg)
            _check_device(device, runtime)
            return cls(
                path,
                label,
                device,
                methods,
                auth_key=auth_key,
                runtime=runtime,
                bundle=bundle,
                lora_rank=_lora_rank(cfg.get("lora-rank")),
            )
        if "partition-id" in cfg:
            from protocols.run_errors import RunFolderError
            from protocols.run_folder import RUN_DIR_KEY, RunFolder

            pid = int(cfg["partition-id"])
            run_dir = context.run_config.get(RUN_DIR_KEY)
            if not run_dir:
                raise NodeConfigError(
                    "simulated node has a partition-id but no run folder: set run "
                    f"config '{RUN_DIR_KEY}'"
                )
            folder = RunFolder(str(run_dir))
            try:
                bundle = folder.edge_bundle(pid)
                rank = folder.lora_rank(pid)
            except RunFolderError as exc:
                raise NodeConfigError(f"run folder: {exc}") from None
            runtime = "torch" if bundle is None else "onnx"
            if runtime == "onnx":
                device = "cpu"  # the run's device is for its torch clients
            _check_device(device, runtime)
            return cls(
                folder.client_data(pid),
                f"p{pid:04d}",
                device,
                state_dir=folder.zo_state,
                auth_key=auth_key,
                runtime=runtime,
                bundle=bundle,
                lora_rank=rank,
            )
        raise NodeConfigError(
            "node config has neither 'data-path' nor 'partition-id': start the node "
            "with --node-config 'data-path=\"/path/to/data.jsonl\"'"
        )


def _lora_rank(value: object) -> int | None:
    """Node config ``lora-rank``: a positive int up to the hello's bound, or None.

    Raises
    ------
    NodeConfigError
        If it is given but not an int in ``1..MAX_LORA_RANK``.
    """
    if value is None or value == "":
        return None
    from protocols.messages import MAX_LORA_RANK

    try:
        rank = int(str(value)) if not isinstance(value, bool) else 0
    except ValueError:
        rank = 0
    if not 1 <= rank <= MAX_LORA_RANK:
        raise NodeConfigError(
            f"node config 'lora-rank' is {value!r}, not an int in 1..{MAX_LORA_RANK}"
        )
    return rank


def _runtime(cfg: Mapping[str, object]) -> tuple[str, Path | None]:
    """Node config ``runtime`` and ``bundle``, checked against each other.

    Raises
    ------
    NodeConfigError
        If the runtime is unknown, ``onnx`` has no bundle, or ``torch`` has one.
    """
    runtime = str(cfg.get("runtime", "torch"))
    if runtime not in RUNTIMES:
        raise NodeConfigError(
            f"node config 'runtime' is {runtime!r}, not one of {list(RUNTIMES)}"
        )
    bundle = str(cfg.get("bundle", ""))
    if runtime == "onnx" and not bundle:
        raise NodeConfigError(
            "node config 'runtime' is 'onnx' but there is no 'bundle': give the "
            "edge bundle's folder (pollinate export --format edge)"
        )
    if runtime == "torch" and bundle:
        raise NodeConfigError(
            f"node config 'bundle' ({bundle}) needs 'runtime' \"onnx\", not 'torch'"
        )
    return runtime, Path(bundle) if bundle else None


def _check_device(device: str, runtime: str) -> None:
    """Refuse a device the runtime cannot use (imports torch for a torch node only).

    Raises
    ------
    NodeConfigError
        If an ``onnx`` node asks for another device than ``cpu``, or a torch
        node for ``cuda`` without CUDA.
    """
    if runtime == "onnx":
        if device != "cpu":
            raise NodeConfigError(
                f"node config asks for device {device!r}, but the onnx runtime "
                "runs on the CPU only"
            )
        return
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise NodeConfigError(
                "node config asks for device 'cuda' but CUDA is absent"
            )
