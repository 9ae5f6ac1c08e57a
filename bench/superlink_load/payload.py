"""The load test's payload and its verifier, copied verbatim into the app.

The server sends each node, per round, :func:`make_payload`'s arrays; the
ClientApp returns :func:`expected_reply` of them and the :func:`payload_digest`
of what it received; :func:`check_reply` judges both directions bit for bit.
These four functions are written into the app's ``loadapp.py`` with
``inspect.getsource`` (:mod:`bench.superlink_load.app`): they may use only
numpy, hashlib and each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

# These four functions are copied into the app's ``loadapp.py``: they may use
# only numpy, hashlib and each other.


def make_payload(
    seed: int, server_round: int, node_index: int, n_arrays: int, mib: float
) -> list[np.ndarray]:
    """The arrays the server sends one node in one round.

    Parameters
    ----------
    seed : int
        Run seed.
    server_round : int
        1-based round.
    node_index : int
        Position of the node among the sorted node ids (content differs per
        node, so Flower cannot deduplicate the objects).
    n_arrays : int
        Number of arrays, at least 1.
    mib : float
        Total size in MiB (2**20 bytes); split as evenly as float32 allows.

    Returns
    -------
    list[np.ndarray]
        ``n_arrays`` 1-D float32 arrays in [0, 1), each at least one element.
    """
    total = max(int(mib * 2**20) // 4, n_arrays)
    rng = np.random.default_rng([seed, server_round, node_index])
    flat = rng.random(total, dtype=np.float32)
    base, extra = divmod(total, n_arrays)
    sizes = [base + (1 if i < extra else 0) for i in range(n_arrays)]
    return np.split(flat, np.cumsum(sizes)[:-1])


def payload_digest(arrays: Sequence[np.ndarray]) -> str:
    """sha256 (hex) over dtype, shape and bytes of every array, in order."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def expected_reply(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """What the ClientApp returns for ``arrays``: each array plus one (float32)."""
    return [a + np.float32(1.0) for a in arrays]


def check_reply(
    sent: Sequence[np.ndarray],
    reply: Mapping[str, np.ndarray] | None,
    reported_digest: str | None,
) -> str:
    """Verdict on one node's reply: ``"ok"`` or what is wrong with it.

    Parameters
    ----------
    sent : Sequence[np.ndarray]
        The arrays the server sent this node (keys ``"0"``, ``"1"``, ...).
    reply : Mapping[str, np.ndarray] | None
        The reply's arrays by key; ``None`` when no reply came.
    reported_digest : str | None
        :func:`payload_digest` of what the node says it received.

    Returns
    -------
    str
        ``"ok"`` only if the node received exactly ``sent`` (downlink) and
        returned exactly :func:`expected_reply` of it (uplink), bit for bit.
    """
    if reply is None:
        return "missing: no reply"
    if reported_digest != payload_digest(sent):
        return "corrupt downlink: the node's sha256 of what it received differs"
    keys = [str(i) for i in range(len(sent))]
    if sorted(reply) != sorted(keys):
        return f"corrupt uplink: {len(reply)} arrays, expected {len(sent)}"
    want = expected_reply(sent)
    for key, expected in zip(keys, want, strict=True):
        got = reply[key]
        if got.dtype != expected.dtype or got.shape != expected.shape:
            return f"corrupt uplink: array {key} is {got.dtype}{got.shape}"
        if not np.array_equal(got, expected):
            bad = int(np.count_nonzero(got != expected))
            return f"corrupt uplink: array {key} differs in {bad} values"
    return "ok"
