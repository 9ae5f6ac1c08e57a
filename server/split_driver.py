"""The server side of SFPrompt: the trunk service and the global prompts/tail.

At the start of a run the driver cuts the model, starts the trunk service
(the frozen body, on the server's device) where the run's config says, and
holds the global soft prompts and tail. Each round the devices train against
the service; their prompts and tails are averaged; the server evaluates the
whole split model locally. Activation traffic measured by the service is
reported per client for the byte ledger. The service stops with the run.
:class:`SplitMethod` is SFPrompt's server plug-in (named in
:mod:`protocols.methods`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import torch
from flwr.app import Message
from safetensors.torch import load_file
from torch import nn

from corpora import Example
from models import LoadedModel, load_causal_lm
from models.split import (
    DeviceHead,
    DeviceTail,
    PromptedLM,
    build_split,
    load_trainable_state,
    split_spec_for,
    trainable_state,
)
from protocols import SplitSpec, TensorLayout
from protocols.methods import Method
from protocols.run_folder import RunFolder
from server.checkpoints import restore_tensors
from server.config import RunConfig, SplitSection
from server.evaluation import CentralEvaluator, EvalResult, build_evaluator
from server.federation import RoundResult, require_update
from server.run_data import resolved_max_length
from server.trunk_service import TrunkService, start_trunk_server
from server.trunk_sessions import TrunkLimits
from server.trunk_transport import TrunkTransport
from strategies import LabelledReply, Nodes, SFPromptFedAvg, SplitRoundSettings
from strategies.robust import Bounds

__all__ = ["SplitDriver", "SplitMethod", "trunk_limits", "trunk_tls", "trunk_transport"]

log = logging.getLogger(__name__)


class SplitDriver:
    """Holds SFPrompt's global state and the running trunk service.

    Parameters
    ----------
    head, tail : DeviceHead, DeviceTail
        The server's copies of the device parts (their prompts and tail are
        the global tensors, evaluated with the trunk).
    strategy : SFPromptFedAvg
        Builds instructions and aggregates replies.
    evaluator : CentralEvaluator
        Scores the whole split model.
    service : TrunkService
        The body's servicer (for traffic accounting).
    server : grpc.Server
        The running gRPC server, stopped by :meth:`close`.
    method : Method
        The registry entry the driver serves.
    """

    def __init__(
        self,
        head: DeviceHead,
        tail: DeviceTail,
        strategy: SFPromptFedAvg,
        evaluator: CentralEvaluator,
        service: TrunkService,
        server: grpc.Server,
        method: Method,
    ) -> None:
        self.method = method.name
        self.entry = method
        self.head = head
        self.tail = tail
        self.strategy = strategy
        self.evaluator = evaluator
        self.service = service
        self.server = server
        self.tensors = {
            k: v.detach().clone().to(strategy.fedavg.device)
            for k, v in trainable_state(head, tail).items()
        }

    def configure(self, server_round: int, nodes: Nodes) -> list[Message]:
        """Send the prompts, tail, trunk address and each node's round grant.

        Issuing this round's grants revokes every older round's.
        """
        self.service.reset_usage()
        grants = self.service.grant_round(server_round, nodes.values())
        return self.strategy.configure(server_round, nodes, self.tensors, grants=grants)

    def apply(self, server_round: int, replies: Sequence[LabelledReply]) -> RoundResult:
        """Bounded FedAvg of the devices' prompts and tails becomes the global one.

        The round's bounds go into its metrics row.
        """
        result = self.strategy.aggregate(server_round, replies, self.tensors)
        self.service.end_round(server_round)  # late or vanished devices' graphs
        usage = self.service.reset_usage()
        self.tensors = require_update(server_round, result, result.tensors)
        return RoundResult(
            len(result.accepted),
            len(result.rejected),
            result.train_loss,
            extra={
                "local_loss": result.local_loss,
                "kept_examples": result.kept,
                **result.stats,
            },
            side_bytes={c: (u["up"], u["down"]) for c, u in usage.items()},
        )

    def evaluate(self) -> EvalResult:
        """Score head -> trunk -> tail with the global prompts and tail."""
        load_trainable_state(self.head, self.tail, self.tensors)
        return self.evaluator.evaluate()

    def checkpoint(
        self, folder: RunFolder, server_round: int, extra: dict[str, Any]
    ) -> None:
        """Save the global prompts and tail and the round state atomically."""
        folder.write_checkpoint(
            server_round,
            self.strategy.spec.fingerprint(),
            extra,
            self.tensors,
            filename="prompts_and_tail.safetensors",
        )

    def finish(self, folder: RunFolder) -> None:
        """Write the trained prompts and tail as safetensors."""
        folder.write_tensors(
            self.entry.artefact,
            self.tensors,
            {"spec": self.strategy.spec.fingerprint()},
        )

    def close(self) -> None:
        """Stop the trunk service (idempotent)."""
        self.server.stop(grace=1.0).wait()

    def restore(self, folder: RunFolder) -> int:
        """Load the last checkpointed prompts and tail; return their round."""
        done, self.tensors, _ = restore_tensors(
            folder,
            self.strategy.spec.fingerprint(),
            self.strategy.fedavg,
        )
        return done


def trunk_tls(
    split: SplitSection, run_dir: Path | None
) -> tuple[tuple[bytes, bytes] | None, bytes]:
    """The trunk's ``(certificate chain, key)`` and the root sent to devices.

    ``[split] tls_*`` files win; otherwise the certificates folder the
    deployment recorded in ``run_dir/server.json`` (the SuperLink's own
    ``server.crt``/``server.key``/``ca.crt``); otherwise plaintext
    ``(None, b"")``.

    Raises
    ------
    server.processes.DeployError
        If ``server.json`` is damaged or names a folder without the files.
    """
    # Deployment only.
    from server.certificates import TlsFiles
    from server.deploy import read_server_info

    if split.tls_certfile and split.tls_keyfile and split.tls_ca_certfile:
        return (
            (split.tls_certfile.read_bytes(), split.tls_keyfile.read_bytes()),
            split.tls_ca_certfile.read_bytes(),
        )
    info = read_server_info(run_dir) if run_dir is not None else None
    if info is None or not info.certs:
        return None, b""
    files = TlsFiles.in_folder(Path(info.certs))
    return (
        (files.server_cert.read_bytes(), files.server_key.read_bytes()),
        files.ca_cert.read_bytes(),
    )


def trunk_limits(split: SplitSection) -> TrunkLimits:
    """The trunk's quotas and deadlines from the ``[split]`` config."""
    mib = 1 << 20
    return TrunkLimits(
        max_sessions=split.max_sessions,
        sessions_per_node=split.sessions_per_node,
        pending_per_node=split.pending_per_node,
        calls_per_node=split.calls_per_node,
        node_memory_bytes=int(split.node_memory_mb * mib),
        memory_budget_bytes=int(split.memory_budget_mb * mib),
        idle_timeout_s=split.idle_timeout_s,
        pending_timeout_s=split.pending_timeout_s,
    )


def trunk_transport(split: SplitSection) -> TrunkTransport:
    """The trunk's worker pool and connection limits from the ``[split]`` config."""
    return TrunkTransport(
        workers=split.workers,
        max_concurrent_rpcs=split.workers,
        max_concurrent_streams=split.max_concurrent_streams,
        max_connection_age_s=split.max_connection_age_s,
    )


class SplitMethod:
    """SFPrompt's server plug-in (see :class:`server.methods.ServerMethod`)."""

    def __init__(self, method: Method) -> None:
        self.method = method

    def spec(self, config: RunConfig, model: nn.Module) -> SplitSpec:
        """Where the model is cut and what the device trains."""
        split = config.split
        return split_spec_for(
            model,  # type: ignore[arg-type]
            config.model.name,
            num_prompts=split.num_prompts,
            client_blocks=split.client_blocks,
            max_length=resolved_max_length(config),
            tail=split.tail,
        )

    def driver(
        self,
        config: RunConfig,
        eval_examples: list[Example],
        device: torch.device,
        *,
        run_dir: Path | None = None,
    ) -> SplitDriver:
        """Cut the model, start the trunk service, wire SFPrompt's strategy.

        ``run_dir`` is the run folder: when its ``server.json`` names a
        certificates folder (``pollinate server start --certs``), the trunk
        serves TLS with the same certificates.
        """
        loaded = load_causal_lm(config.model.name, dtype="float32", device=device)
        split = config.split
        spec = self.spec(config, loaded.model)
        head, trunk, tail = build_split(loaded.model, spec, init_seed=config.run.seed)
        service = TrunkService(
            trunk,
            spec,
            max_message_bytes=int(split.max_message_mb * 1e6),
            limits=trunk_limits(split),
        )
        tls, root = trunk_tls(split, run_dir)
        server, port = start_trunk_server(
            service, split.host, split.port, tls=tls, transport=trunk_transport(split)
        )
        strategy = SFPromptFedAvg(
            spec=spec,
            layout=TensorLayout.of(trainable_state(head, tail)),
            settings=SplitRoundSettings(
                local_steps=config.train.local_steps,
                local_loss_steps=split.local_loss_steps,
                batch_size=config.train.batch_size,
                learning_rate=config.train.learning_rate,
                gamma=split.gamma,
            ),
            trunk_address=f"{split.host}:{port}",
            trunk_root_certificate=root,
            max_payload_bytes=int(config.federation.max_payload_mb * 1e6),
            seed=config.run.seed,
            device=device,
            bounds=Bounds.from_config(
                config.federation, fixed_bound=config.federation.clip_norm
            ),
        )
        log.info(
            "SFPrompt trunk service on %s:%d (%s)",
            split.host,
            port,
            "TLS" if tls else "plaintext",
        )
        evaluator = build_evaluator(
            config,
            PromptedLM(head, trunk, tail),
            loaded.tokenizer,
            eval_examples,
            device,
        )
        return SplitDriver(
            head, tail, strategy, evaluator, service, server, self.method
        )

    def tuned_model(
        self, config: RunConfig, artefact: Path, loaded: LoadedModel
    ) -> nn.Module:
        """The split model with the trained prompts and tail."""
        head, trunk, tail = build_split(loaded.model, self.spec(config, loaded.model))
        load_trainable_state(head, tail, load_file(artefact))
        return PromptedLM(head, trunk, tail)
