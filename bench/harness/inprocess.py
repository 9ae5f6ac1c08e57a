"""Federations run in process: their size, and one run start to finish.

The benchmarks that run many small federations without Ray start the
server's round loop (:func:`server.app.run_server`) against a
:class:`simulation.inprocess.InProcessGrid` that hands each real Flower
message to a ClientApp; :func:`serve_in_process` is the one place they
prepare such a run and start it, :func:`run_in_process` adds the wall time,
the error (a run that raises is a result) and what its run folder holds.
Models stay cached in the ClientApp's runtime between runs in one process,
so only the first run pays for loading the model.

The project's modules are imported inside the functions, so importing this
module stays lean.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness.measure import now
from bench.harness.run_folders import read_run


@dataclass(frozen=True)
class RunScale:
    """The size of every federation of one benchmark mode (full or ``--quick``).

    Attributes
    ----------
    model : str
        The model name.
    clients : int
        Clients (all sampled).
    rounds : int
        Federated rounds.
    local_steps : int
        Local optimizer steps per client and round.
    batch_size : int
        Sequences per local step.
    max_length : int
        Tokens per sequence.
    limit : int
        Examples read from the dataset.
    eval_examples : int
        Held-out examples of the central evaluation.
    new_tokens : int
        Tokens generated per held-out example.
    """

    model: str
    clients: int
    rounds: int
    local_steps: int
    batch_size: int
    max_length: int
    limit: int
    eval_examples: int
    new_tokens: int

    def overrides(self) -> dict[str, Any]:
        """The dotted-key settings of this scale (a run's config adds the rest)."""
        return {
            "run.rounds": self.rounds,
            "model.name": self.model,
            "model.max_length": self.max_length,
            "data.limit": self.limit,
            "data.eval_examples": self.eval_examples,
            "federation.clients": self.clients,
            "train.local_steps": self.local_steps,
            "train.batch_size": self.batch_size,
            "eval.max_new_tokens": self.new_tokens,
        }


def one_line_error(exc: BaseException) -> str:
    """``Type: message`` on one line, the message cut at 300 characters."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def serve_in_process(
    overrides: Mapping[str, Any],
    *,
    client_app: Any = None,
    simulation: bool = True,
    on_run_dir: Callable[[Path], None] | None = None,
) -> Path:
    """Prepare one run from dotted-key ``overrides`` and run its round loop here.

    Parameters
    ----------
    overrides : Mapping[str, Any]
        The run's config over the defaults (``run.output_dir`` included).
    client_app : Any
        The ClientApp the grid hands messages to (default Pollinate's).
    simulation : bool
        ``run_server``'s ``simulation`` (every node exists from the start).
    on_run_dir : Callable[[Path], None] | None
        Called with the run folder once it is prepared, before the loop.

    Returns
    -------
    Path
        The run folder.

    Raises
    ------
    Exception
        Whatever stopped the run (its run folder says ``failed``).
    """
    from server.app import run_server
    from server.config import load_config
    from simulation.inprocess import InProcessGrid
    from simulation.prepare import prepare_run

    if client_app is None:
        from client.app import app as client_app
    config = load_config(None, dict(overrides))
    run_dir = prepare_run(config)
    if on_run_dir is not None:
        on_run_dir(run_dir)
    grid = InProcessGrid(client_app, config.federation.clients, run_dir=run_dir)
    run_server(grid, config, run_dir, simulation=simulation)
    return run_dir


def run_in_process(
    overrides: Mapping[str, Any], *, client_app: Any = None
) -> dict[str, Any]:
    """:func:`serve_in_process`, timed; a run that raises is a result.

    Returns
    -------
    dict[str, Any]
        ``wall_s`` (the whole run, preparation included), ``error`` (``None``
        or :func:`one_line_error` of what stopped it), then what
        :func:`~bench.harness.run_folders.read_run` reads from its run folder
        (when one was prepared: whatever rounds it finished).
    """
    made: list[Path] = []
    t0 = now()
    error = None
    try:
        serve_in_process(overrides, client_app=client_app, on_run_dir=made.append)
    except Exception as exc:  # the run's outcome is a result here
        error = one_line_error(exc)
    out: dict[str, Any] = {"wall_s": now() - t0, "error": error}
    if made:
        out.update(read_run(made[0]))
    return out
