"""The simulation engine process: one run folder, Flower's Ray backend.

Run as ``python -m simulation.engine RUN_DIR`` by :mod:`simulation.launcher`,
which owns this process (and Ray's, in the same session) and stops them. The
same ServerApp and ClientApp as in deployment run here; each virtual client
gets one CPU so that clients train in parallel on the cores available.
The exit status is 0 only when the server recorded a completed run.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

__all__ = ["backend_config", "main"]


def backend_config(
    cluster: str | None = None, num_cpus_per_client: float = 1.0
) -> dict[str, object]:
    """Flower's Ray backend settings: CPUs per virtual client, no dashboard.

    Without ``cluster`` (``RAY_ADDRESS``), Ray is told to start a fresh local
    instance (``address="local"``). Left to itself, ``ray.init()`` connects to
    the last cluster named in ``$TMPDIR/ray/ray_current_cluster``; a head that
    was killed leaves that file behind, and the connection then waits forever.
    """
    init_args: dict[str, object] = {"include_dashboard": False, "log_to_driver": True}
    if not cluster:
        init_args["address"] = "local"
    return {
        "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": 0.0},
        "init_args": init_args,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the simulation of one prepared run folder; return the exit status."""
    args = sys.argv[1:] if argv is None else argv
    resume = "--resume" in args
    args = [a for a in args if a != "--resume"]
    if len(args) != 1:
        print("usage: python -m simulation.engine RUN_DIR [--resume]", file=sys.stderr)
        return 2
    run_dir = Path(args[0]).resolve()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )
    # Imported here: the launcher must start fast, and nothing happens at import.
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app
    from server.config import load_config

    config = load_config(run_dir / "config.toml")
    cluster = os.environ.get("RAY_ADDRESS")
    logging.getLogger(__name__).info(
        "Ray: %s",
        f"joining the existing Ray cluster at {cluster}" if cluster else "local",
    )
    os.environ["POLLINATE_RUN_DIR"] = str(run_dir)
    try:
        run_simulation(
            server_app=build_server_app(config, run_dir, resume=resume),
            client_app=build_client_app(run_dir),
            num_supernodes=config.federation.clients,
            backend_config=backend_config(cluster),  # type: ignore[arg-type]
        )
    except Exception as exc:  # noqa: BLE001 - reported through the exit status
        print(f"simulation failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    status = json.loads((run_dir / "status.json").read_text()).get("state")
    return 0 if status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
