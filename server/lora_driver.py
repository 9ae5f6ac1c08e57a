"""The server side of federated LoRA: global adapter, FedAvg, evaluation.

:class:`LoraMethod` is the method's server plug-in (named in
:mod:`protocols.methods`): it builds the spec, the driver and the model that
export writes. :class:`LoraDriver` holds the global adapter during a run and,
with ``[server_opt]``, the server optimizer that turns each round's released
aggregate into the new global adapter (:mod:`strategies.server_opt`); its
moments are checkpointed in ``checkpoint/server_opt.safetensors`` and its
settings and round in ``state.json``'s ``server_opt`` entry.

Under FedEx-LoRA (``lora.aggregation = "exact"``) the driver also holds the
cumulative residual, one dense float32 ``(out, in)`` tensor per adapted
module: the sum of every round's increment (``LoraAggregate.residual``). It
is sent with every instruction, folded into the server model's frozen base
weights (``pristine + residual``, recomputed from a pristine copy each time,
so the model evaluated is base + residual + adapter), checkpointed in
``checkpoint/residual.safetensors`` and written beside the final PEFT adapter
as ``residual.safetensors`` (:data:`RESIDUAL_FILE`), which ``merged`` export
folds in. The adapter alone is not the model then.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from corpora import Example
from models import (
    LoadedModel,
    adapter_layout,
    adapter_tensors,
    attach_lora,
    load_adapter_tensors,
    load_causal_lm,
)
from models.lora import BaseWeights, load_adapter_folder
from protocols import LoraSpec, ProtocolError
from protocols.methods import Method
from protocols.run_folder import CheckpointError, RunFolder
from server.checkpoints import restore_tensors, save_peft_adapter
from server.config import RunConfig
from server.evaluation import CentralEvaluator, EvalResult, build_evaluator
from server.federation import FederationError, RoundResult, require_update
from server.run_data import resolved_max_length
from strategies import LabelledReply, LocalTrainSettings, LoraFedAvg, Nodes
from strategies.lora_factors import fold_residuals
from strategies.privacy import DPSettings
from strategies.robust import Bounds
from strategies.server_opt import ServerOptError, ServerOptimizer, ServerOptSettings

__all__ = [
    "RESIDUAL_FILE",
    "SERVER_OPT_FILE",
    "LoraDriver",
    "LoraMethod",
    "read_residual",
]

SERVER_OPT_FILE = "server_opt.safetensors"
"""The checkpoint's file of server optimizer tensors (moments, momentum)."""

RESIDUAL_FILE = "residual.safetensors"
"""FedEx-LoRA's cumulative residual, in the checkpoint and the final artefact."""


class LoraDriver:
    """Holds the global adapter; one :class:`LoraFedAvg` round at a time.

    Parameters
    ----------
    model : PeftModel
        The server's model with adapters attached (its adapter is the
        initial global adapter).
    strategy : LoraFedAvg
        Builds instructions and aggregates replies.
    evaluator : CentralEvaluator
        Scores the global adapter.
    method : Method
        The registry entry the driver serves.
    server_opt : ServerOptimizer, optional
        Steps the global adapter with each round's aggregate (None: FedAvg,
        the aggregate itself).
    """

    def __init__(
        self,
        model: PeftModel,
        strategy: LoraFedAvg,
        evaluator: CentralEvaluator,
        method: Method,
        server_opt: ServerOptimizer | None = None,
    ) -> None:
        self.server_opt = server_opt or ServerOptimizer(ServerOptSettings())
        self.method = method.name
        self.entry = method
        self.model = model
        self.strategy = strategy
        self.evaluator = evaluator
        self.adapter = {
            k: v.to(strategy.fedavg.device) for k, v in adapter_tensors(model).items()
        }
        # FedEx-LoRA's cumulative residual (float32, per module prefix) and the
        # pristine base weights of the modules it is folded into.
        self.residual: dict[str, torch.Tensor] = {}
        self.base_weights = BaseWeights(model)

    def configure(self, server_round: int, nodes: Nodes) -> list[Any]:
        """Send the global adapter (and any residual) to the sampled nodes.

        Raises
        ------
        strategies.privacy.PrivacyBudgetExhausted
            If the round would spend past ``privacy.target_epsilon``.
        """
        return self.strategy.configure(
            server_round, nodes, self.adapter, residual=self.residual
        )

    def apply(self, server_round: int, replies: Sequence[LabelledReply]) -> RoundResult:
        """Bounded FedAvg of the valid adapters becomes the global adapter.

        With a server optimizer the aggregate (the round's release) is its
        pseudo-gradient and its step is the new global adapter. Under
        ``exact`` the round's residual increment is added to the cumulative
        residual and the model's base weights are re-folded from their
        pristine copies, with the adapter or not at all. The round's bounds
        (and epsilon, with DP; the optimizer's name) go into its metrics row.

        Raises
        ------
        server.federation.FederationError
            If no reply was usable, or the aggregate, the residual or the
            optimizer's step was refused (the adapter, the residual and the
            optimizer state are kept).
        """
        result = self.strategy.aggregate(server_round, replies, self.adapter)
        aggregate = require_update(server_round, result, result.adapter)
        residual, folded = self.residual, None
        if result.residual:
            try:
                residual = _accumulate(self.residual, result.residual)
                folded = fold_residuals(self.base_weights, residual)
            except ValueError as exc:
                raise FederationError(
                    f"round {server_round}: the residual was refused: "
                    f"{' '.join(str(exc).split())}; the global adapter is kept"
                ) from None
        extra = dict(result.stats)
        name = self.server_opt.settings.name
        if name != "none":
            aggregate = self._server_step(server_round, aggregate)
            extra["server_opt"] = name
        self.adapter = aggregate
        if folded is not None:
            self.residual = residual
            self.base_weights.assign(folded)
        return RoundResult(
            len(result.accepted), len(result.rejected), result.train_loss, extra=extra
        )

    def _server_step(
        self, server_round: int, aggregate: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The optimizer's step from ``aggregate``; all or nothing.

        The step runs on a copy of the optimizer, kept only if the new
        adapter is finite in the adapter's own dtype (a float64 step can
        overflow when cast back).
        """
        optimizer = copy.deepcopy(self.server_opt)
        name = optimizer.settings.name
        try:
            new = optimizer.step(server_round, self.adapter, aggregate)
            bad = [k for k, v in new.items() if not bool(torch.isfinite(v).all())]
            if bad:
                raise ServerOptError(f"the new adapter is not finite in {bad[0]!r}")
        except ServerOptError as exc:
            raise FederationError(
                f"round {server_round}: {name} refused the aggregate: "
                f"{' '.join(str(exc).split())}; the global adapter is kept"
            ) from None
        self.server_opt = optimizer
        return new

    def evaluate(self) -> EvalResult:
        """Score the global adapter (over base + residual under ``exact``)."""
        return self.evaluator.evaluate(self.adapter)

    def checkpoint(
        self, folder: RunFolder, server_round: int, extra: dict[str, Any]
    ) -> None:
        """Save the global adapter and state atomically.

        With DP the state holds the noise seed and the accountant; with a
        server optimizer its ``meta`` (``server_opt``) and its tensors
        (:data:`SERVER_OPT_FILE`); with a non-empty residual,
        :data:`RESIDUAL_FILE`; all in the same checkpoint swap.
        """
        privacy = self.strategy.privacy_state()
        state = {**extra, "privacy": privacy} if privacy is not None else dict(extra)
        more: dict[str, dict[str, torch.Tensor]] = {}
        if self.server_opt.settings.name != "none":
            opt = self.server_opt.state()
            state["server_opt"] = opt["meta"]
            more[SERVER_OPT_FILE] = opt["tensors"]
        if self.residual:
            more[RESIDUAL_FILE] = self.residual
        folder.write_checkpoint(
            server_round,
            self.strategy.spec.fingerprint(),
            state,
            self.adapter,
            extra_tensors=more or None,
        )

    def finish(self, folder: RunFolder) -> None:
        """Write the final adapter as a PEFT folder (sealed with its manifest).

        With a residual, :data:`RESIDUAL_FILE` goes in the same folder, under
        the same manifest.
        """
        with torch.no_grad():
            load_adapter_tensors(self.model, self.adapter)
        save_peft_adapter(
            folder.artefact(self.entry.artefact),
            self.model,
            extra_tensors={RESIDUAL_FILE: self.residual} if self.residual else None,
        )

    def close(self) -> None:
        """Nothing to release."""

    def restore(self, folder: RunFolder) -> int:
        """Load the last checkpointed global adapter; return its round.

        With DP, the noise seed and the accountant are restored too; with a
        server optimizer, its state; under ``exact``, the residual (folded
        into the model's base weights again).

        Raises
        ------
        CheckpointError
            If the checkpoint is missing, damaged, of another spec, or lacks
            the privacy or server optimizer state this run's settings need,
            or its residual does not fit the model (one line each).
        """
        done, adapter, state = restore_tensors(
            folder,
            self.strategy.spec.fingerprint(),
            self.strategy.fedavg,
        )
        server_opt = _restored_server_opt(folder, state, done, self.server_opt.settings)
        residual: dict[str, torch.Tensor] = {}
        if RESIDUAL_FILE in state.get("extra_tensors", ()):
            if self.strategy.spec.aggregation != "exact":
                raise CheckpointError(
                    f"{folder.checkpoint_state}: the checkpoint holds a residual, "
                    f"this run's lora.aggregation is {self.strategy.spec.aggregation!r}"
                )
            tensors = folder.read_checkpoint_tensors(state, file=RESIDUAL_FILE)
            residual = {
                k: v.to(self.strategy.fedavg.device) for k, v in tensors.items()
            }
        try:
            folded = fold_residuals(
                self.base_weights, _checked_residual(residual, adapter)
            )
        except ValueError as exc:
            raise CheckpointError(
                f"{folder.checkpoint_dir / RESIDUAL_FILE}: {' '.join(str(exc).split())}"
            ) from None
        try:
            self.strategy.load_privacy_state(state.get("privacy"))
        except ValueError as exc:
            raise CheckpointError(f"{folder.checkpoint_state}: {exc}") from None
        self.server_opt = server_opt
        self.adapter = adapter
        self.residual = residual
        self.base_weights.assign(folded)
        return done


def _accumulate(
    total: dict[str, torch.Tensor], increment: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``total + increment`` per module in float32 (a new dict; finite).

    Raises
    ------
    ValueError
        If a shape differs from the running total's or a value is not finite.
    """
    out = dict(total)
    for prefix, inc in increment.items():
        inc32 = inc.to(torch.float32)
        old = total.get(prefix)
        if old is not None and old.shape != inc32.shape:
            raise ValueError(
                f"increment of {prefix!r} is {tuple(inc32.shape)}, the residual "
                f"{tuple(old.shape)}"
            )
        new = inc32.clone() if old is None else old + inc32.to(old.device)
        if not bool(torch.isfinite(new).all()):
            raise ValueError(f"residual of {prefix!r} is not finite")
        out[prefix] = new
    return out


def _checked_residual(
    residual: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``residual`` if each tensor is float32 ``(out, in)`` of an adapter module.

    Raises
    ------
    ValueError
        Naming the first tensor that is not.
    """
    for prefix, r in residual.items():
        a = adapter.get(f"{prefix}.lora_A.weight")
        b = adapter.get(f"{prefix}.lora_B.weight")
        if a is None or b is None:
            raise ValueError(f"residual {prefix!r} names no module of the adapter")
        want = (b.shape[0], a.shape[1])
        if r.dtype != torch.float32 or tuple(r.shape) != want:
            raise ValueError(
                f"residual {prefix!r} is {r.dtype} {tuple(r.shape)}, not "
                f"torch.float32 {want}"
            )
        if not bool(torch.isfinite(r).all()):
            raise ValueError(f"residual {prefix!r} holds NaN or Inf")
    return residual


def read_residual(artefact: Path) -> dict[str, torch.Tensor]:
    """The final artefact's residual (empty when it has none).

    The artefact is verified by the caller (export checks its manifest).

    Raises
    ------
    CheckpointError
        If the file is not readable safetensors.
    """
    path = artefact / RESIDUAL_FILE
    if not path.exists():
        return {}
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is damaged: {exc}") from None


def _restored_server_opt(
    folder: RunFolder, state: dict[str, Any], done: int, settings: ServerOptSettings
) -> ServerOptimizer:
    """A fresh optimizer with the checkpoint's state, all of it checked.

    Raises
    ------
    CheckpointError
        If the checkpoint's server optimizer state is missing (this run has
        one), present (this run has none), damaged, or of other settings.
    """
    where = folder.checkpoint_state
    optimizer = ServerOptimizer(settings)
    meta = state.get("server_opt")
    if settings.name == "none":
        if meta is not None:
            raise CheckpointError(
                f"{where}: the checkpoint holds server optimizer state "
                f"({meta.get('settings') if isinstance(meta, dict) else meta!r}), "
                "this run's server_opt.name is 'none'"
            )
        return optimizer
    if meta is None:
        raise CheckpointError(
            f"{where}: the checkpoint holds no server optimizer state, this run's "
            f"server_opt.name is {settings.name!r} (was it 'none' then?)"
        )
    tensors = folder.read_checkpoint_tensors(state, file=SERVER_OPT_FILE)
    try:
        optimizer.load_state({"meta": meta, "tensors": tensors})
    except ServerOptError as exc:
        raise CheckpointError(f"{where}: {' '.join(str(exc).split())}") from None
    last = meta.get("last_round") if isinstance(meta, dict) else None
    if last != done:
        raise CheckpointError(
            f"{where}: server optimizer state is of round {last}, the "
            f"checkpoint of round {done}"
        )
    return optimizer


def _check_targets(spec: LoraSpec, model: nn.Module) -> None:
    """Refuse target modules the model does not have (PEFT would, later)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in spec.target_modules if t not in names]
    if missing:
        raise ProtocolError(
            f"lora.target_modules {missing} name no module of model {spec.model!r}"
        )


class LoraMethod:
    """LoRA's server plug-in (see :class:`server.methods.ServerMethod`)."""

    def __init__(self, method: Method) -> None:
        self.method = method

    def spec(self, config: RunConfig, model: nn.Module) -> LoraSpec:
        """The spec every LoRA client must honour, checked against ``model``."""
        spec = LoraSpec(
            model=config.model.name,
            model_dtype=config.model.dtype,
            rank=config.lora.rank,
            alpha=config.lora.alpha,
            dropout=config.lora.dropout,
            target_modules=config.lora.target_modules,
            max_length=resolved_max_length(config),
            client_ranks=config.lora.client_ranks,
            aggregation=config.lora.aggregation,
        )
        _check_targets(spec, model)
        return spec

    def driver(
        self,
        config: RunConfig,
        eval_examples: list[Example],
        device: torch.device,
        *,
        run_dir: Path | None = None,
    ) -> LoraDriver:
        """Load the model, attach the initial adapter, wire FedAvg."""
        del run_dir  # LoRA starts no service
        server_opt = ServerOptSettings(**config.server_opt.model_dump())
        loaded = load_causal_lm(
            config.model.name, dtype=config.model.dtype, device=device
        )
        spec = self.spec(config, loaded.model)
        model = attach_lora(loaded.model, spec, init_seed=config.run.seed)
        strategy = LoraFedAvg(
            bounds=Bounds.from_config(
                config.federation, fixed_bound=config.federation.clip_norm
            ),
            dp=DPSettings.from_config(config),
            noise_seed=config.privacy.noise_seed,
            spec=spec,
            layout=adapter_layout(model),
            train=LocalTrainSettings(
                local_steps=config.train.local_steps,
                batch_size=config.train.batch_size,
                learning_rate=config.train.learning_rate,
                weight_decay=config.train.weight_decay,
                proximal_mu=config.train.proximal_mu,
            ),
            seed=config.run.seed,
            device=device,
            max_payload_bytes=int(config.federation.max_payload_mb * 1e6),
            server_opt=server_opt,
            sparsity_weighted=config.lora.sparsity_weighted,
        )
        evaluator = build_evaluator(
            config, model, loaded.tokenizer, eval_examples, device
        )
        return LoraDriver(
            model, strategy, evaluator, self.method, ServerOptimizer(server_opt)
        )

    def tuned_model(
        self, config: RunConfig, artefact: Path, loaded: LoadedModel
    ) -> nn.Module:
        """The base model with the residual (``exact``) and adapter merged in.

        Raises
        ------
        CheckpointError
            If the artefact's residual does not fit the model.
        """
        del config
        residual = read_residual(artefact)
        peft_model = load_adapter_folder(loaded.model, artefact)
        if residual:
            base = BaseWeights(peft_model)
            try:
                base.assign(fold_residuals(base, residual))
            except ValueError as exc:
                raise CheckpointError(
                    f"{artefact / RESIDUAL_FILE}: {' '.join(str(exc).split())}"
                ) from None
        merged: nn.Module = peft_model.merge_and_unload()
        return merged
