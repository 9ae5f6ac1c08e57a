"""Choosing which nodes train in a round, reproducibly.

Flower's node ids are random per run, so nodes are ordered by a stable label
(the partition a simulated node holds, or a deployed node's name) and drawn
with a generator seeded by (run seed, round). The same seed then picks the
same clients in every run.

A label names one node: :func:`settle_label_claims` decides at hello which
node keeps a label that several claim (a label granted once keeps its
holder), and :class:`NodeBook` refuses to hold a label twice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = [
    "NodeBook",
    "SamplingError",
    "round_size",
    "sample_nodes",
    "settle_label_claims",
]


class SamplingError(ValueError):
    """Not enough nodes to satisfy the sampling settings."""


def round_size(available: int, *, fraction: float, min_nodes: int) -> int:
    """How many of ``available`` nodes a round samples.

    ``min(available, max(min_nodes, ceil(fraction * available)))``; the
    product is rounded to 9 decimals first, since 0.55 * 100 is
    55.000000000000007 in binary floating point.
    """
    wanted = math.ceil(round(fraction * available, 9))
    return min(available, max(min_nodes, wanted))


def sample_nodes(
    node_labels: Mapping[int, str],
    *,
    fraction: float,
    min_nodes: int,
    seed: int,
    server_round: int,
) -> list[int]:
    """Pick ``max(min_nodes, ceil(fraction * N))`` nodes, ordered by label.

    Parameters
    ----------
    node_labels : Mapping[int, str]
        Node id to a label that is stable across runs (unique per node).
    fraction : float
        Share of the nodes to pick, in (0, 1].
    min_nodes : int
        Fewest nodes a round may use (>= 1).
    seed, server_round : int
        Seed the draw; the same pair gives the same nodes.

    Returns
    -------
    list[int]
        Chosen node ids, sorted by label.

    Raises
    ------
    SamplingError
        If fewer than ``min_nodes`` nodes are available or arguments are bad.
    """
    if not 0.0 < fraction <= 1.0:
        raise SamplingError(f"fraction must be in (0, 1], got {fraction}")
    if min_nodes < 1:
        raise SamplingError(f"min_nodes must be >= 1, got {min_nodes}")
    ordered = sorted(node_labels, key=lambda n: (node_labels[n], n))
    if len(ordered) < min_nodes:
        raise SamplingError(
            f"{len(ordered)} nodes available, the round needs at least {min_nodes}"
        )
    count = round_size(len(ordered), fraction=fraction, min_nodes=min_nodes)
    rng = np.random.default_rng([seed, server_round])
    picked = rng.choice(len(ordered), size=count, replace=False)
    return [ordered[i] for i in sorted(picked)]


def settle_label_claims(
    claims: Mapping[int, str],
    *,
    held: Mapping[int, str] | None = None,
) -> tuple[dict[int, str], dict[int, str]]:
    """Give each claimed label to one node: its holder, else the lowest claimant.

    A label in ``held`` (granted at an earlier hello of the same run) keeps
    its holder and every new claim of it is refused; a label first claimed
    now goes to the lowest node id that claims it. Without node
    authentication nothing tells the rightful holder of a label from an
    impostor, so the rule is only fair in being deterministic: it depends on
    ``held`` and the set of ``(node id, label)`` claims alone, not on which
    reply arrived first, and node ids are drawn by the SuperLink, not chosen
    by nodes (an impostor can only re-register to draw again). No label is
    ever handed to a second node id, and every refused claimant stays
    refused for the whole run, so the holder's updates count every round. It
    is no defence: with node authentication a claim reaches this point only
    with a valid signature by its label's key.

    Parameters
    ----------
    claims : Mapping[int, str]
        Node id to the label it claims now.
    held : Mapping[int, str] | None
        Node id to the label it already holds; none of these nodes claims
        again.

    Returns
    -------
    tuple[dict[int, str], dict[int, str]]
        ``(labels, refused)``: node id to the label it is granted now (the
        new grants only, every label once and none in ``held``); and node id
        to the reason it was refused (naming the holder).

    Raises
    ------
    SamplingError
        If a node in ``held`` claims again (the caller asked it twice).
    """
    earlier = dict(held or {})
    again = sorted(set(claims) & set(earlier))
    if again:
        raise SamplingError(f"nodes {again} already hold a label and claim again")
    holder = {label: node for node, label in earlier.items()}
    labels: dict[int, str] = {}
    refused: dict[int, str] = {}
    for node in sorted(claims):
        label = claims[node]
        if label in holder:
            how = "the lowest node id claiming it"
            if holder[label] in earlier:
                how = "granted at an earlier hello"
            refused[node] = (
                f"label {label!r} is already held by node {holder[label]} ({how})"
            )
            continue
        holder[label] = node
        labels[node] = label
    return labels, refused


class NodeBook:
    """The federation's nodes by stable label, and who trains each round.

    The round loop owns one: it learns the labels when the federation
    assembles and asks for each round's sample.

    Parameters
    ----------
    labels : Mapping[int, str]
        Node id to its stable label, each label once
        (:func:`settle_label_claims`).
    fraction, min_nodes, seed : see :func:`sample_nodes`.

    Raises
    ------
    SamplingError
        If two nodes hold one label.
    """

    def __init__(
        self,
        labels: Mapping[int, str],
        *,
        fraction: float = 1.0,
        min_nodes: int = 1,
        seed: int = 0,
    ) -> None:
        seen: dict[str, int] = {}
        for node, label in sorted(labels.items()):
            if label in seen:
                raise SamplingError(
                    f"label {label!r} is held by nodes {seen[label]} and {node}: "
                    "settle duplicate claims at hello (settle_label_claims)"
                )
            seen[label] = node
        self.labels = dict(labels)
        self.fraction = fraction
        self.min_nodes = min_nodes
        self.seed = seed

    def label(self, node_id: int) -> str:
        """The stable label of a node (derived from its id if it never said hello)."""
        return self.labels.get(node_id, f"node-{node_id}")

    def sample(self, server_round: int) -> dict[int, str]:
        """The round's nodes, id to label, ordered by label.

        Raises
        ------
        SamplingError
            If fewer than ``min_nodes`` nodes are known.
        """
        chosen = sample_nodes(
            self.labels,
            fraction=self.fraction,
            min_nodes=self.min_nodes,
            seed=self.seed,
            server_round=server_round,
        )
        return {node: self.labels[node] for node in chosen}
