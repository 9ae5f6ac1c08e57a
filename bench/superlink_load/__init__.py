"""Load test of a real SuperLink: large, many-array messages to real SuperNodes.

Our deployment runs Flower's SuperLink with its default in-memory state store
(``server.deploy.start_superlink``: no ``--database``); this benchmark proves
that choice under load and measures the SQLite store beside it
(``bench/README.md`` has the why, the results and how to run it). For one
store it writes a tiny Flower app (:mod:`~bench.superlink_load.app`), starts
a real ``flower-superlink`` and N real ``flower-supernode`` processes on
127.0.0.1 (:mod:`~bench.superlink_load.deployment`), submits the app with
``flwr run`` and stops every process afterwards. The ServerApp sends every
node, for R rounds, one message of A float32 arrays totalling S MiB
(:mod:`~bench.superlink_load.payload`: distinct bytes per node, so nothing is
deduplicated) and checks both directions bit for bit; the payload helpers
and the verifier are written into the app verbatim, so the unit tests check
the very code the deployed ServerApp runs.

Run: ``python -m bench.superlink_load --nodes 4 --arrays 1000 --mb 32
--rounds 3 --store both`` (:mod:`~bench.superlink_load.__main__`).
"""

from bench.superlink_load.app import write_load_app
from bench.superlink_load.deployment import (
    STORES,
    LoadDeployment,
    LoadSpec,
    run_load,
)
from bench.superlink_load.payload import (
    check_reply,
    expected_reply,
    make_payload,
    payload_digest,
)

__all__ = [
    "STORES",
    "LoadDeployment",
    "LoadSpec",
    "check_reply",
    "expected_reply",
    "make_payload",
    "payload_digest",
    "run_load",
    "write_load_app",
]
