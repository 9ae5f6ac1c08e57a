"""Everything that holds global state: the ServerApp, evaluation, checkpoints.

``server.app:app`` is the ServerApp Flower loads. :class:`RunConfig` is the
one parser of user configuration.
"""

from server.app import build_server_app, run_server
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
    "build_server_app",
    "config_to_toml",
    "load_config",
    "pick_device",
    "pick_metric",
    "run_rounds",
    "run_server",
]
