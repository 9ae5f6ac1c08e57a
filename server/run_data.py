"""A run's data, read, split and fitted once, when the run is prepared.

Preparing a run (:func:`simulation.prepare.prepare_run`, a deployed server's
:func:`server.deploy.prepare_server_run`) reads ``data.source``, splits it by
the one rule of :func:`corpora.split_for_run` (held-out examples, or whole
held-out groups) and settles what the config left to the data:

* ``model.max_length = "auto"`` becomes the smallest multiple of 32 that fits
  99% of the training and evaluation examples (:func:`models.batching.fit_max_length`,
  clamped to [64, 1024]);
* ``data.eval_examples`` unset becomes the size of the evaluation set drawn
  (``min(256, a quarter of the examples)``, or fewer when held-out groups have fewer);
* ``data.heldout_group_count`` becomes the list of groups it drew
  (``data.heldout_groups``), so the run folder's ``config.toml`` says which
  groups no client trains on and gives the same split again.

The resolved config is what the run folder's ``config.toml`` holds, so every
process that reads it (server, clients, resume, edge export) sees numbers.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from corpora import Example, RunSplit, load_examples, split_for_run
from server.config import RunConfig

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "RunData",
    "fit_run_max_length",
    "load_run_data",
    "resolve_config",
    "resolved_max_length",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunData:
    """A prepared run's data: the resolved config and the split examples."""

    config: RunConfig
    train: list[Example]
    evaluation: list[Example]
    heldout_groups: tuple[str, ...]


def fit_run_max_length(model_name: str, examples: Sequence[Example]) -> int:
    """``model.max_length = "auto"`` for these examples, with the model's tokenizer.

    Raises
    ------
    models.ModelLoadError
        If the model's tokenizer (which counts the tokens) cannot be loaded.
    """
    # Here, not at import: transformers only when a length is fitted.
    from models import load_tokenizer
    from models.batching import fit_max_length

    tokenizer = load_tokenizer(model_name)  # the weights are not needed
    return fit_max_length(examples, tokenizer)  # its defaults are the "auto" rule


def resolve_config(config: RunConfig, split: RunSplit) -> RunConfig:
    """``config`` with what it left to the data settled by ``split``.

    Raises
    ------
    models.ModelLoadError
        If ``model.max_length`` is ``"auto"`` and the model's tokenizer cannot be loaded.
    """
    tree = config.model_dump(mode="json")
    if config.model.max_length == "auto":
        fitted = fit_run_max_length(config.model.name, split.train + split.evaluation)
        log.info(
            "model.max_length 'auto' -> %d tokens (99%% of the %d examples fit)",
            fitted,
            len(split.train) + len(split.evaluation),
        )
        tree["model"]["max_length"] = fitted
    asked = config.data.eval_examples
    if asked is not None and asked > len(split.evaluation):
        log.warning(
            "data.eval_examples %d: the held-out groups have %d examples, all evaluated",
            asked,
            len(split.evaluation),
        )
    tree["data"]["eval_examples"] = len(split.evaluation)
    tree["data"]["heldout_groups"] = list(split.heldout_groups)
    tree["data"]["heldout_group_count"] = 0
    return RunConfig.model_validate(tree)


def _split(config: RunConfig) -> RunSplit:
    """``data.source`` read and split as the config says."""
    data = config.data
    examples = load_examples(data.source, limit=data.limit, seed=config.run.seed)
    return split_for_run(
        examples,
        heldout_groups=data.heldout_groups,
        heldout_group_count=data.heldout_group_count,
        n_eval=data.eval_examples,
        seed=config.run.seed,
    )


def load_run_data(config: RunConfig) -> RunData:
    """Read ``data.source``, split it as configured and resolve the config.

    Raises
    ------
    corpora.DatasetError
        If the data cannot be read or split as configured (unknown held-out
        groups, too many held out, too few examples).
    models.ModelLoadError
        If ``model.max_length`` is ``"auto"`` and the model's tokenizer cannot be loaded.
    """
    split = _split(config)
    if split.heldout_groups:
        log.info(
            "held-out groups (no client trains on them, evaluation is drawn from "
            "them): %s; %d evaluation examples, %d training examples",
            ", ".join(split.heldout_groups),
            len(split.evaluation),
            len(split.train),
        )
    resolved = resolve_config(config, split)
    return RunData(resolved, split.train, split.evaluation, split.heldout_groups)


def resolved_max_length(config: RunConfig) -> int:
    """``model.max_length`` as a number, fitted to the data when ``"auto"``.

    A prepared run's config already holds the number; for a config that was
    not prepared (a spec built straight from a TOML file) the data is read and
    split the way preparing does, so both give the same length.

    Raises
    ------
    corpora.DatasetError, models.ModelLoadError
        As :func:`load_run_data`.
    """
    if config.model.max_length != "auto":
        return config.model.max_length
    return _fit_unprepared(config)


@functools.lru_cache(maxsize=8)
def _fit_unprepared(config: RunConfig) -> int:
    """:func:`resolved_max_length` of an unprepared config, once per process.

    The driver and its evaluator both ask; the config is frozen and hashable,
    so the data is read and the tokenizer loaded once.
    """
    split = _split(config)
    log.info(
        "model.max_length 'auto' fitted to %s (the run was not prepared)",
        config.data.source,
    )
    return fit_run_max_length(config.model.name, split.train + split.evaluation)
