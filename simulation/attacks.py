"""Simulated hostile clients: who attacks, how, and the ClientApp that does it.

``[attack]`` in a run config (:class:`server.config.AttackSection`) makes some
simulated clients malicious, so that a user can measure what a defence
(``[federation]`` clipping, robust aggregators) is worth. Attackers run in the
same simulation as the honest clients and speak the same protocol: the
server cannot tell them apart, exactly as in a deployment.

Who: :func:`malicious_partitions` (``attack.clients`` when given, else
``round(attack.fraction x federation.clients)`` partitions, rounded half up,
drawn without replacement from the run seed). Deployed servers refuse a
config with attackers (``cli.validate``).

How, by behaviour:

- Model attacks (``scale``, ``sign_flip``, ``gaussian``, ``constant``,
  ``inflate_examples``) act on the reply of an honest client. :data:`app` (or
  :func:`build_attack_app`) is a ClientApp that serves the same handlers as
  ``client.app:app`` behind the Flower client mod :class:`AttackMod`: the
  honest handler trains, then a malicious node's reply is rewritten and
  re-encoded with the protocol's own encoders, so it still decodes on the
  server and only the server's defences stand between it and the model.
  With ``g`` the global tensors of the instruction, ``t`` the honestly
  trained ones and ``d = t - g`` the update:

  ================ ========================== ===============================
  behaviour        LoRA adapter, SFPrompt     FedKSeed scalar gradients ``s``
                   prompts and tail
  ================ ========================== ===============================
  scale            ``g + scale * d``          ``scale * s``
  sign_flip        ``g - d``                  ``-s``
  gaussian         ``g + N(0, noise_std^2)``  ``N(0, noise_std^2)``
  constant         every value ``value``      every scalar ``value``
  inflate_examples tensors kept; the reply claims ``attack.examples`` examples
  ================ ========================== ===============================

  Every behaviour but ``inflate_examples`` keeps the honest example count.
  Gaussian noise is drawn from (run seed, partition id, round). Error
  replies, and replies of honest nodes, pass through untouched.
- Data attacks (``label_flip``, ``shuffle_labels``) poison the malicious
  clients' partition files when the run folder is prepared
  (:func:`poison_examples`, called by :func:`simulation.prepare.prepare_run`);
  those clients then train honestly on bad data. The target of an example
  is its ``response``.

Tests and benchmarks that drive the server with
:class:`simulation.inprocess.InProcessGrid` pass :data:`app` (or
``build_attack_app(client_app)``) instead of ``client.app.app``;
``pollinate simulate`` picks it by itself (:func:`client_app_ref`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from client.app import app as _honest_app
from corpora import Example
from protocols.codecs import TensorLayout
from protocols.messages import (
    ACTION_HELLO,
    MESSAGE_TRAIN_LORA,
    decode_lora_train_ins,
    decode_lora_train_res,
    encode_lora_train_res,
)
from protocols.methods import train_actions
from protocols.run_folder import RUN_DIR_KEY, RunFolder
from protocols.split_messages import (
    MESSAGE_TRAIN_SFPROMPT,
    decode_split_train_ins,
    decode_split_train_res,
    encode_split_train_res,
)
from protocols.zo_messages import (
    MESSAGE_TRAIN_ZO,
    decode_zo_train_ins,
    decode_zo_train_res,
    encode_zo_train_res,
)
from server.config import AttackSection, RunConfig, load_config

__all__ = [
    "ATTACK_APP_REF",
    "DATA_ATTACKS",
    "HONEST_APP_REF",
    "MODEL_ATTACKS",
    "AttackError",
    "AttackMod",
    "app",
    "attack_scalars",
    "attack_tensors",
    "build_attack_app",
    "client_app_ref",
    "describe_attack",
    "flip_labels",
    "malicious_partitions",
    "noise_generator",
    "poison_examples",
    "shuffle_labels",
]

log = logging.getLogger(__name__)

MODEL_ATTACKS = ("scale", "sign_flip", "gaussian", "constant", "inflate_examples")
"""Behaviours that rewrite a malicious client's reply (:class:`AttackMod`)."""
DATA_ATTACKS = ("label_flip", "shuffle_labels")
"""Behaviours that poison a malicious client's data (:func:`poison_examples`)."""

HONEST_APP_REF = "client.app:app"
ATTACK_APP_REF = "simulation.attacks:app"

# Streams of the run seed, so no attack draw repeats another draw of the run.
_CHOICE_STREAM = 0xA77AC
_NOISE_STREAM = 0xA77AD
_SHUFFLE_STREAM = 0xA77AE
# Replies hold at most what an instruction may hold; generous, not a defence.
_MAX_BYTES = 1 << 34


class AttackError(ValueError):
    """An attack cannot be carried out as configured (e.g. nothing to flip to)."""


# --- who -------------------------------------------------------------------


def malicious_partitions(config: RunConfig) -> tuple[int, ...]:
    """The partition ids of the malicious clients, sorted.

    ``attack.clients`` when given; otherwise ``round(attack.fraction x
    federation.clients)`` (half up) ids drawn without replacement from
    ``numpy.random.default_rng([run.seed, stream])``, so a run seed always
    picks the same attackers. Empty when ``attack.behaviour`` is ``none``.
    """
    attack, clients = config.attack, config.federation.clients
    if attack.behaviour == "none":
        return ()
    if attack.clients:
        return tuple(sorted(set(attack.clients)))
    count = min(clients, math.floor(attack.fraction * clients + 0.5))
    rng = np.random.default_rng([config.run.seed, _CHOICE_STREAM])
    return tuple(sorted(int(p) for p in rng.choice(clients, count, replace=False)))


def client_app_ref(config: RunConfig) -> str:
    """The ClientApp a simulation of ``config`` runs (``module:attribute``).

    :data:`ATTACK_APP_REF` when a model attack has malicious clients, else
    the plain :data:`HONEST_APP_REF` (data attacks live in the data files).
    """
    if config.attack.behaviour in MODEL_ATTACKS and malicious_partitions(config):
        return ATTACK_APP_REF
    return HONEST_APP_REF


def describe_attack(config: RunConfig) -> dict[str, object] | None:
    """What the run folder records about the attack; ``None`` without one."""
    malicious = malicious_partitions(config)
    if not malicious:
        return None
    attack = config.attack
    setting: dict[str, dict[str, object]] = {
        "scale": {"scale": attack.scale},
        "gaussian": {"noise_std": attack.noise_std},
        "constant": {"value": attack.value},
        "inflate_examples": {"examples": attack.examples},
    }
    return {
        "behaviour": attack.behaviour,
        "malicious": list(malicious),
        **setting.get(attack.behaviour, {}),
    }


# --- model attacks: pure kernels --------------------------------------------


def noise_generator(seed: int, partition_id: int, server_round: int) -> torch.Generator:
    """The CPU generator of one attacker's Gaussian noise in one round."""
    state = np.random.SeedSequence([seed, _NOISE_STREAM, partition_id, server_round])
    return torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0]))


def attack_tensors(
    global_tensors: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    attack: AttackSection,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """A malicious version of ``trained`` (an adapter, or prompts and tail).

    Parameters
    ----------
    global_tensors : Mapping[str, Tensor]
        The tensors the instruction sent (``g``).
    trained : Mapping[str, Tensor]
        The honest client's tensors (``t``), same names, shapes and dtypes.
    attack : AttackSection
        The behaviour and its settings (see the module's table).
    generator : torch.Generator
        The source of ``gaussian`` noise (CPU, float32 draws).

    Returns
    -------
    dict[str, Tensor]
        Each tensor in ``trained``'s order, dtype and device, computed in
        float64 and rounded once.
    """
    out = {}
    for name, t in trained.items():
        g = global_tensors[name].to(device="cpu", dtype=torch.float64)
        d = t.to(device="cpu", dtype=torch.float64) - g
        if attack.behaviour == "scale":
            bad = g + attack.scale * d
        elif attack.behaviour == "sign_flip":
            bad = g - d
        elif attack.behaviour == "gaussian":
            noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
            bad = g + attack.noise_std * noise.double()
        elif attack.behaviour == "constant":
            bad = torch.full_like(g, attack.value)
        else:
            out[name] = t
            continue
        out[name] = bad.to(device=t.device, dtype=t.dtype)
    return out


def attack_scalars(
    scalars: torch.Tensor, attack: AttackSection, generator: torch.Generator
) -> torch.Tensor:
    """A malicious version of a FedKSeed reply's scalar gradients (float32)."""
    if attack.behaviour == "scale":
        bad = scalars.double() * attack.scale
    elif attack.behaviour == "sign_flip":
        bad = -scalars.double()
    elif attack.behaviour == "gaussian":
        noise = torch.randn(scalars.shape, generator=generator, dtype=torch.float32)
        bad = attack.noise_std * noise.double()
    elif attack.behaviour == "constant":
        bad = torch.full(scalars.shape, attack.value, dtype=torch.float64)
    else:
        return scalars
    return bad.to(torch.float32)


def _claimed(num_examples: int, attack: AttackSection) -> int:
    return attack.examples if attack.behaviour == "inflate_examples" else num_examples


# --- model attacks: the Flower mod ------------------------------------------


@dataclass(frozen=True, slots=True)
class _Attacker:
    """What one malicious node does: the behaviour and the run seed."""

    attack: AttackSection
    seed: int
    partition_id: int

    def generator(self, server_round: int) -> torch.Generator:
        return noise_generator(self.seed, self.partition_id, server_round)


def _lora(msg: Message, reply: Message, who: _Attacker) -> Message:
    ins = decode_lora_train_ins(msg.content, max_bytes=_MAX_BYTES)
    res = decode_lora_train_res(
        reply.content, expected=TensorLayout.of(ins.adapter), max_bytes=_MAX_BYTES
    )
    gen = who.generator(ins.config.server_round)
    bad = replace(
        res,
        adapter=attack_tensors(ins.adapter, res.adapter, who.attack, gen),
        num_examples=_claimed(res.num_examples, who.attack),
    )
    return _with_content(reply, encode_lora_train_res(bad))


def _zo(msg: Message, reply: Message, who: _Attacker) -> Message:
    ins = decode_zo_train_ins(msg.content)
    res = decode_zo_train_res(
        reply.content, num_seeds=ins.spec.num_seeds, max_steps=ins.config.local_steps
    )
    gen = who.generator(ins.config.server_round)
    bad = replace(
        res,
        scalars=attack_scalars(torch.from_numpy(res.scalars), who.attack, gen).numpy(),
        num_examples=_claimed(res.num_examples, who.attack),
    )
    return _with_content(reply, encode_zo_train_res(bad))


def _split(msg: Message, reply: Message, who: _Attacker) -> Message:
    ins = decode_split_train_ins(msg.content, max_bytes=_MAX_BYTES)
    res = decode_split_train_res(
        reply.content, expected=TensorLayout.of(ins.tensors), max_bytes=_MAX_BYTES
    )
    gen = who.generator(ins.config.server_round)
    bad = replace(
        res,
        tensors=attack_tensors(ins.tensors, res.tensors, who.attack, gen),
        num_examples=_claimed(res.num_examples, who.attack),
    )
    return _with_content(reply, encode_split_train_res(bad))


def _with_content(reply: Message, content: RecordDict) -> Message:
    """``reply`` with each record of ``content`` put in place of its own."""
    for key, record in content.items():
        reply.content[key] = record
    return reply


_REWRITES: dict[str, Callable[[Message, Message, _Attacker], Message]] = {
    MESSAGE_TRAIN_LORA: _lora,
    MESSAGE_TRAIN_ZO: _zo,
    MESSAGE_TRAIN_SFPROMPT: _split,
}


class AttackMod:
    """Flower client mod: a malicious node's train reply is rewritten.

    The node learns the run's ``[attack]`` from the run folder that the run
    config ``run-dir`` names (``config.toml``, parsed once per folder and
    process) and who it is from its node config ``partition-id``. A node
    without either (a deployed node) is honest.

    Raises
    ------
    protocols.ProtocolError
        If an honest reply of a malicious node does not decode (a bug, which
        Flower then reports as the ClientApp's exception).
    """

    def __init__(self) -> None:
        self._configs: dict[str, RunConfig] = {}

    def _config(self, run_dir: str) -> RunConfig:
        if run_dir not in self._configs:
            self._configs[run_dir] = load_config(RunFolder(Path(run_dir)).config)
        return self._configs[run_dir]

    def attacker(self, context: Context) -> _Attacker | None:
        """What this node does wrong, or ``None`` for an honest node."""
        run_dir = context.run_config.get(RUN_DIR_KEY)
        pid = context.node_config.get("partition-id")
        if not run_dir or not isinstance(pid, int):
            return None
        config = self._config(str(run_dir))
        if config.attack.behaviour not in MODEL_ATTACKS:
            return None
        if pid not in malicious_partitions(config):
            return None
        return _Attacker(config.attack, config.run.seed, pid)

    def __call__(
        self, msg: Message, context: Context, call_next: ClientAppCallable
    ) -> Message:
        """Run the honest app, then rewrite the reply if this node attacks."""
        reply = call_next(msg, context)
        rewrite = _REWRITES.get(msg.metadata.message_type)
        if rewrite is None or reply.has_error():
            return reply
        who = self.attacker(context)
        if who is None:
            return reply
        log.info(
            "attack: partition %d sends a %s reply to %s",
            who.partition_id,
            who.attack.behaviour,
            msg.metadata.message_type,
        )
        return rewrite(msg, reply, who)


def build_attack_app(client_app: ClientApp | None = None) -> ClientApp:
    """A ClientApp serving ``client_app``'s actions behind :class:`AttackMod`.

    Parameters
    ----------
    client_app : ClientApp, optional
        The honest app (default: ``client.app.app``, sharing its model cache);
        it must serve ``query.hello`` and every registered training action.
    """
    inner = client_app if client_app is not None else _honest_app
    attack_app = ClientApp(mods=[AttackMod()])
    attack_app.query(ACTION_HELLO)(inner)
    for action in train_actions():
        attack_app.train(action)(inner)
    # privacy.secagg: the SecAgg+ stages are default-action "train" messages,
    # served by the honest app's SecAgg+ handler. A model attack cannot act on
    # them (the reply leaves the node masked); data attacks still apply.
    attack_app.train()(inner)
    return attack_app


app = build_attack_app()
"""The attack ClientApp Flower loads (:data:`ATTACK_APP_REF`)."""


# --- data attacks -----------------------------------------------------------


def flip_labels(examples: Sequence[Example], targets: Sequence[str]) -> list[Example]:
    """Each example with its response moved to the next of ``targets``.

    ``targets`` are the distinct responses of the whole training set; each is
    sorted and mapped to its cyclic successor, so every response changes.

    Raises
    ------
    AttackError
        If there are fewer than two distinct targets.
    """
    order = sorted(set(targets))
    if len(order) < 2:
        raise AttackError(
            f"attack.behaviour 'label_flip' needs at least 2 distinct responses in "
            f"the training data, found {len(order)}"
        )
    successor = {t: order[(i + 1) % len(order)] for i, t in enumerate(order)}
    return [replace(e, response=successor[e.response]) for e in examples]


def shuffle_labels(
    examples: Sequence[Example], rng: np.random.Generator
) -> list[Example]:
    """The examples with their responses permuted among them by ``rng``."""
    order = rng.permutation(len(examples))
    return [
        replace(e, response=examples[int(j)].response)
        for e, j in zip(examples, order, strict=True)
    ]


def poison_examples(
    config: RunConfig,
    partition_id: int,
    examples: Sequence[Example],
    targets: Sequence[str],
) -> list[Example]:
    """Partition ``partition_id``'s examples as the run's attack leaves them.

    Unchanged unless the behaviour is a data attack and the partition is
    malicious. ``targets`` are the responses of the whole training set.

    Raises
    ------
    AttackError
        If ``label_flip`` has fewer than two distinct targets.
    """
    behaviour = config.attack.behaviour
    if behaviour not in DATA_ATTACKS or partition_id not in malicious_partitions(
        config
    ):
        return list(examples)
    if behaviour == "label_flip":
        return flip_labels(examples, targets)
    rng = np.random.default_rng([config.run.seed, _SHUFFLE_STREAM, partition_id])
    return shuffle_labels(examples, rng)
