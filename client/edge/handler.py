"""FedKSeed on an edge node: catch up by seed replay, run ZO steps, send scalars.

The edge twin of :mod:`client.zo_handler`: :mod:`client.app` routes
``train.zo`` here for a node whose node config says ``runtime = "onnx"``.
The model is the node's edge bundle on ONNX Runtime, the replay and the steps
are NumPy (:mod:`client.edge.state`, :mod:`client.edge.trainer`), and the
reply is the torch client's: (seed index, scalar) pairs, the synced round and
the hash that proves the node holds the server's model. FedKSeed-Pro's
probabilities are :meth:`~protocols.zo_messages.ZoTrainIns.probabilities`;
local DP and client-side clipping are :mod:`strategies.seed_clip`. Every
refusal is raised; :mod:`client.app` turns it into an error reply. Nothing
here imports torch.
"""

from __future__ import annotations

from flwr.app import Context, Message

from client.edge.runtime import EdgeRuntime
from client.edge.trainer import edge_local_steps
from client.node import NodeConfigError, NodeSettings
from protocols.zo_messages import ZoTrainRes, decode_zo_train_ins, encode_zo_train_res
from strategies.seed_clip import clipped_pairs, local_dp_pairs, noise_rng

__all__ = ["handle"]


def handle(
    msg: Message, context: Context, node: NodeSettings, runtime: EdgeRuntime
) -> Message:
    """Sync to the target model, train locally, reply with (seed, scalar) pairs.

    Raises
    ------
    NodeConfigError
        If the node is not an ``onnx`` node with a bundle.
    EdgeBundleError
        If the bundle is damaged or made for another spec than the server's.
    OutOfSyncError
        If the replayed model is not the server's (or a snapshot is damaged).
    """
    if node.runtime != "onnx" or node.bundle is None:
        raise NodeConfigError(
            f"node runs the {node.runtime!r} runtime: the edge handler needs "
            "runtime 'onnx' with a bundle"
        )
    ins = decode_zo_train_ins(msg.content)
    state = runtime.zo_state(node.bundle, context.run_id, node.state_dir)
    state.sync(ins)
    data = runtime.local_data(node.data_path, state.model)
    synced_round, synced_hash = state.round, state.hash
    state.mark_trained()
    try:
        stats = edge_local_steps(
            state.model,
            data.tokenized,
            ins.config,
            seeds=state.seeds,
            eps=ins.spec.eps,
            learning_rate=ins.spec.learning_rate,
            probabilities=ins.probabilities(),
            label=node.label,
        )
    finally:
        state.restore()  # back to the synced global model, whatever happened
    indices, scalars = stats.indices, stats.scalars
    if ins.local_privacy is not None:
        # A simulated node (run-folder state dir) draws repeatable noise.
        seed = ins.config.seed if node.state_dir is not None else None
        indices, scalars = local_dp_pairs(
            indices,
            scalars,
            clip_norm=ins.local_privacy.clip_norm,
            noise_multiplier=ins.local_privacy.noise_multiplier,
            rng=noise_rng(seed, ins.config.server_round, f"local:{node.label}"),
        )
    elif ins.client_clip is not None:
        indices, scalars = clipped_pairs(
            indices, scalars, clip_norm=ins.client_clip.clip_norm
        )
    res = ZoTrainRes(
        indices=indices,
        scalars=scalars,
        num_examples=len(data.examples),
        train_loss=stats.mean_loss,
        synced_round=synced_round,
        synced_hash=synced_hash,
        skipped_steps=stats.skipped,
    )
    return Message(encode_zo_train_res(res), reply_to=msg)
