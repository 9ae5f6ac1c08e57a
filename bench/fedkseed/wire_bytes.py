"""Section 1: exact serialized sizes of real ``train.zo`` instructions and replies.

The paper's setting (K = 4096, tau = 200, 10 clients per round): the server's
strategy configures one round for nodes that trained last round and for
nodes that missed 1, 5 and 20 rounds (their catch-up history), and the
client's encoder sizes a reply of tau (index, scalar) pairs. Sizes are
``protocols.payload_bytes`` of the message content, the quantity the run
ledger records as ``bytes_up`` / ``bytes_down``.
"""

from __future__ import annotations

from typing import Any

from bench.fedkseed.settings import (
    MODEL,
    PAPER_CLIENTS,
    PAPER_EPS,
    PAPER_K,
    PAPER_LR,
    PAPER_TAU,
    expected_distinct,
    zo_spec_for,
)
from bench.harness import bytes_by_record

MISSED = (0, 1, 5, 20)
"""Rounds missed by the nodes whose instructions are sized."""


def _configure_round(
    method: str,
    history: list[Any],
    scalars_per_round: list[tuple[Any, Any]],
    rounds_total: int,
    global_hash: str,
) -> list[tuple[str, Any]]:
    """The strategy's instructions for one round, as ``(node label, message)``.

    The one place this bench drives the server's strategy: it builds
    ``strategies.FedKSeed``, sets its seed history, Pro statistics, node
    labels and each node's last synced round, and calls ``configure``.
    """
    import torch

    from strategies import FedKSeed, ZoGlobal

    spec = zo_spec_for(
        {
            "run.method": method,
            "zo.num_seeds": PAPER_K,
            "zo.eps": PAPER_EPS,
            "zo.learning_rate": PAPER_LR,
            "train.local_steps": PAPER_TAU,
            "train.batch_size": 1,
        }
    )
    strategy = FedKSeed(spec=spec, local_steps=PAPER_TAU, batch_size=1)
    strategy.history = list(history)
    if strategy.pro is not None:
        for idx, g in scalars_per_round:
            strategy.pro.update(torch.from_numpy(idx), torch.from_numpy(g))
    labels = {i + 1: f"missed-{r}" for i, r in enumerate(MISSED)}
    # A node that trained in the previous round synced to round R-1 before
    # it trained, so it needs 1 round delta; each missed round adds one.
    for i, r in enumerate(MISSED):
        strategy.node_rounds[labels[i + 1]] = rounds_total - 1 - r
    messages = strategy.configure(
        rounds_total + 1, labels, ZoGlobal(rounds_total, global_hash)
    )
    return [(labels[m.metadata.dst_node_id], m) for m in messages]


def section_bytes(walk: Any, global_hash: str) -> dict[str, Any]:
    """Exact serialized sizes of real train.zo instructions and replies.

    Parameters
    ----------
    walk : protocols.seeds.ParamWalk
        The model's parameter walk (its fingerprint goes into the spec).
    global_hash : str
        The global model's hash the instructions carry.

    Returns
    -------
    dict[str, Any]
        ``settings``; ``ins`` (per method, per missed-round count: bytes and
        bytes per record); ``res`` (the reply); ``synced_total`` and
        ``paper_accounting``.
    """
    import numpy as np

    from protocols import payload_bytes
    from protocols.zo_messages import RoundDelta, ZoTrainRes, encode_zo_train_res
    from simulation.inprocess import use_server_identity

    use_server_identity()
    draws = PAPER_CLIENTS * PAPER_TAU
    d_exact = expected_distinct(PAPER_K, draws)
    d = round(d_exact)
    rounds_total = max(MISSED) + 1  # global model after this many rounds
    rng = np.random.default_rng(0)
    history = []
    scalars_per_round = []
    for r in range(1, rounds_total + 1):
        idx = np.sort(rng.choice(PAPER_K, size=d, replace=False)).astype(np.int32)
        g = rng.normal(0.0, 5.0, size=d)
        coeff = (-PAPER_LR * g).astype(np.float32)
        history.append(RoundDelta(r, idx, coeff))
        scalars_per_round.append((idx, g.astype(np.float32)))

    out: dict[str, Any] = {
        "settings": {
            "K": PAPER_K,
            "tau": PAPER_TAU,
            "clients_per_round": PAPER_CLIENTS,
            "draws_per_round": draws,
            "distinct_seeds_expected": d_exact,
            "distinct_seeds_used": d,
            "eps": PAPER_EPS,
            "learning_rate": PAPER_LR,
            "model": MODEL,
            "walk_fingerprint": walk.fingerprint(),
            "global_round": rounds_total,
        },
        "ins": {},
        "res": {},
    }
    for method in ("fedkseed", "fedkseed-pro"):
        rows = {}
        for label, m in _configure_round(
            method, history, scalars_per_round, rounds_total, global_hash
        ):
            r = int(label.split("-")[1])
            rows[str(r)] = {
                "missed_rounds": r,
                "history_rounds": r + 1,
                "history_entries": (r + 1) * d,
                "bytes": payload_bytes(m.content),
                "by_record": bytes_by_record(m.content),
            }
        out["ins"][method] = rows

    tau_idx = rng.integers(0, PAPER_K, size=PAPER_TAU).astype(np.int32)
    tau_g = rng.normal(0.0, 5.0, size=PAPER_TAU).astype(np.float32)
    res = ZoTrainRes(
        indices=tau_idx,
        scalars=tau_g,
        num_examples=150,
        train_loss=2.345678,
        synced_round=rounds_total,
        synced_hash=global_hash,
        skipped_steps=0,
    )
    content = encode_zo_train_res(res)
    out["res"] = {
        "steps": PAPER_TAU,
        "bytes": payload_bytes(content),
        "by_record": bytes_by_record(content),
    }
    down = out["ins"]["fedkseed"]["0"]["bytes"]
    down_pro = out["ins"]["fedkseed-pro"]["0"]["bytes"]
    up = out["res"]["bytes"]
    out["synced_total"] = {"fedkseed": down + up, "fedkseed-pro": down_pro + up}
    out["paper_accounting"] = {
        "formula": "4K (dense fp32 A down) + 8 tau (index, scalar up)",
        "bytes": 4 * PAPER_K + 8 * PAPER_TAU,
        "our_payload_floor": "8 D (index, coefficient) down + 8 tau up (+ K for Pro)",
        "our_payload_floor_bytes": 8 * d + 8 * PAPER_TAU,
    }
    return out
