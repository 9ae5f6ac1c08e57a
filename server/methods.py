"""What a method provides on the server, and how the server finds it.

The registry (:mod:`protocols.methods`) names each method's server plug-in; a
plug-in is a class built with its registry entry that provides the three
things the server needs of a method (:class:`ServerMethod`):

``spec(config, model)``
    The method's spec (:mod:`protocols.specs`) for a run config and the base
    model's architecture (a weightless skeleton is enough: ``pollinate
    validate`` builds every method's spec that way and so names every bad
    setting before anything starts).
``driver(config, eval_examples, device)``
    The :class:`~server.federation.RoundDriver` that holds the global state
    during a run.
``tuned_model(config, artefact, loaded)``
    The trained model for export, from the run's final artefact.

:func:`server_method` is the only way server code gets a method's behaviour.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from protocols.methods import Method, get_method, load_plugin

if TYPE_CHECKING:
    import torch
    from torch import nn

    from corpora import Example
    from models import LoadedModel
    from protocols import LoraSpec, SplitSpec, ZOSpec
    from server.config import RunConfig
    from server.federation import RoundDriver

__all__ = ["ServerMethod", "build_spec", "server_method"]


@runtime_checkable
class ServerMethod(Protocol):
    """A method's server side (see the module docstring)."""

    method: Method

    def spec(
        self, config: RunConfig, model: nn.Module
    ) -> LoraSpec | ZOSpec | SplitSpec:
        """The spec every client must honour; raises ``ProtocolError`` if bad."""

    def driver(
        self,
        config: RunConfig,
        eval_examples: list[Example],
        device: torch.device,
        *,
        run_dir: Path | None = None,
    ) -> RoundDriver:
        """The round driver, with the global state on ``device``.

        ``run_dir`` (the run folder, None outside a run) lets a method find
        what the deployment recorded there, such as its TLS certificates.
        """

    def tuned_model(
        self, config: RunConfig, artefact: Path, loaded: LoadedModel
    ) -> nn.Module:
        """The base model with the run's training folded in (for export)."""


def server_method(name: str) -> ServerMethod:
    """The server plug-in of the method registered as ``name``.

    Raises
    ------
    protocols.methods.UnknownMethodError
        If no method has that name.
    TypeError
        If the registered plug-in does not provide :class:`ServerMethod`.
    """
    entry = get_method(name)
    plugin = load_plugin(entry.server)(entry)
    if not isinstance(plugin, ServerMethod):
        raise TypeError(f"{entry.server} does not provide the ServerMethod protocol")
    return plugin


def build_spec(config: RunConfig) -> LoraSpec | ZOSpec | SplitSpec:
    """The configured method's spec, built on a weightless model skeleton.

    Raises
    ------
    protocols.ProtocolError
        If a setting breaks the method's contract (named in the message).
    models.ModelLoadError
        If the model's architecture cannot be read.
    """
    from models.loading import model_skeleton

    method = server_method(config.run.method)
    return method.spec(config, model_skeleton(config.model.name))
