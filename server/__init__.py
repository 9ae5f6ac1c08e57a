"""Everything that holds global state: the ServerApp, evaluation, checkpoints.

``server.app:app`` is the ServerApp Flower loads. :class:`RunConfig` is the
one parser of user configuration.

Importing this package is cheap: each public name is imported from its module
(torch, transformers, Flower) on first use, so a light module such as
:mod:`server.config` can be imported without the ServerApp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocols.lazy import lazy_exports

if TYPE_CHECKING:
    from server.app import run_server
    from server.config import ConfigError, RunConfig, config_to_toml, load_config
    from server.evaluation import CentralEvaluator, EvalResult, pick_device, pick_metric
    from server.federation import FederationError, RoundDriver, RoundResult, run_rounds

__all__ = [
    "CentralEvaluator",
    "ConfigError",
    "EvalResult",
    "FederationError",
    "RoundDriver",
    "RoundResult",
    "RunConfig",
    "config_to_toml",
    "load_config",
    "pick_device",
    "pick_metric",
    "run_rounds",
    "run_server",
]

_LAZY = {
    "CentralEvaluator": "server.evaluation",
    "ConfigError": "server.config",
    "EvalResult": "server.evaluation",
    "FederationError": "server.federation",
    "RoundDriver": "server.federation",
    "RoundResult": "server.federation",
    "RunConfig": "server.config",
    "config_to_toml": "server.config",
    "load_config": "server.config",
    "pick_device": "server.evaluation",
    "pick_metric": "server.evaluation",
    "run_rounds": "server.federation",
    "run_server": "server.app",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
