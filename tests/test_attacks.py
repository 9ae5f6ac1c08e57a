"""Simulated attackers (simulation.attacks): who, what each behaviour sends, data.

Unit level: each model attack is run through :class:`AttackMod` on a reply
built with the protocol's encoders and compared with the hand-computed
tensors, scalars and counts; the rewritten reply must still decode. Data
attacks are checked on prepared partition files against a run without an
attack. One in-process LoRA run shows an attacker inside a real federation.
"""

from __future__ import annotations

import logging
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from cli.main import build_parser
from cli.validate import load_checked_config
from corpora import read_jsonl
from protocols.codecs import TensorLayout
from protocols.messages import (
    MESSAGE_TRAIN_LORA,
    LocalTrainConfig,
    LoraTrainIns,
    LoraTrainRes,
    NodeHello,
    RoundSchedule,
    decode_lora_train_ins,
    decode_lora_train_res,
    encode_hello,
    encode_lora_train_ins,
    encode_lora_train_res,
)
from protocols.methods import load_plugin
from protocols.run_folder import RUN_DIR_KEY, RunFolder
from protocols.specs import LoraSpec, SplitSpec, ZOSpec
from protocols.split_messages import (
    GRANT_BYTES,
    MESSAGE_TRAIN_SFPROMPT,
    SplitRoundConfig,
    SplitTrainIns,
    SplitTrainRes,
    decode_split_train_res,
    encode_split_train_ins,
    encode_split_train_res,
)
from protocols.zo_messages import (
    MESSAGE_TRAIN_ZO,
    ZoTrainIns,
    ZoTrainRes,
    decode_zo_train_res,
    encode_zo_train_ins,
    encode_zo_train_res,
)
from server.app import run_server
from server.config import ConfigError, RunConfig, config_to_toml, load_config
from server.flower_cli import write_app
from server.processes import DeployError
from simulation.attacks import (
    ATTACK_APP_REF,
    HONEST_APP_REF,
    AttackError,
    AttackMod,
    build_attack_app,
    client_app_ref,
    flip_labels,
    malicious_partitions,
    noise_generator,
)
from simulation.inprocess import InProcessGrid
from simulation.prepare import prepare_run

ATTACKER = 1
ROUND = 3
SEED = 11


def _config(tmp_path: Path, **overrides: Any) -> RunConfig:
    """A tiny-llama LoRA config of 4 clients; ``attack__x`` sets ``attack.x``."""
    values: dict[str, Any] = {
        "model.name": "tiny-llama",
        "run.rounds": 2,
        "run.seed": SEED,
        "federation.clients": 4,
        "train.local_steps": 1,
        "data.limit": 60,
        "data.eval_examples": 4,
        "eval.max_new_tokens": 2,
        "run.output_dir": str(tmp_path),
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, values)


def _run_folder(tmp_path: Path, config: RunConfig) -> Path:
    """A run folder holding only ``config.toml`` (what the mod reads)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    RunFolder(tmp_path).config.write_text(config_to_toml(config))
    return tmp_path


def _context(run_dir: Path, partition_id: int) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition_id,
        node_config={"partition-id": partition_id, "num-partitions": 4},
        state=RecordDict(),
        run_config={RUN_DIR_KEY: str(run_dir)},
    )


def _through_mod(
    run_dir: Path,
    partition_id: int,
    message_type: str,
    instruction: RecordDict,
    reply_content: RecordDict | Error,
) -> Message:
    """Run AttackMod on ``message_type`` with a fake app answering ``reply_content``."""
    msg = Message(
        instruction, dst_node_id=100 + partition_id, message_type=message_type
    )

    def call_next(message: Message, context: Context) -> Message:
        return Message(reply_content, reply_to=message)

    return AttackMod()(msg, _context(run_dir, partition_id), call_next)


# -- who -------------------------------------------------------------------------


def test_fraction_picks_a_seeded_set_and_clients_win(tmp_path: Path) -> None:
    """A quarter of 4 clients is one attacker, the same one for the same seed,
    not the same for every seed; attack.clients wins over fraction; behaviour
    'none' has no attackers whatever the fraction."""
    picks = {
        seed: malicious_partitions(
            _config(
                tmp_path,
                attack__behaviour="scale",
                attack__fraction=0.25,
                **{"run.seed": seed},
            )
        )
        for seed in range(12)
    }
    assert all(len(p) == 1 and 0 <= p[0] < 4 for p in picks.values())
    again = _config(
        tmp_path, attack__behaviour="scale", attack__fraction=0.25, **{"run.seed": 3}
    )
    assert malicious_partitions(again) == picks[3]
    assert len(set(picks.values())) > 1  # the seed is used
    half = _config(tmp_path, attack__behaviour="sign_flip", attack__fraction=0.5)
    assert len(malicious_partitions(half)) == 2
    listed = _config(
        tmp_path,
        attack__behaviour="scale",
        attack__fraction=0.75,
        attack__clients=[3, 1],
    )
    assert malicious_partitions(listed) == (1, 3)
    assert malicious_partitions(_config(tmp_path, attack__fraction=0.5)) == ()


def test_only_model_attacks_with_attackers_change_the_client_app(
    tmp_path: Path,
) -> None:
    """Data attacks and attacker-free configs run the plain ClientApp."""
    assert client_app_ref(_config(tmp_path)) == HONEST_APP_REF
    assert (
        client_app_ref(
            _config(tmp_path, attack__behaviour="scale", attack__clients=[0])
        )
        == ATTACK_APP_REF
    )
    assert (
        client_app_ref(
            _config(tmp_path, attack__behaviour="label_flip", attack__clients=[0])
        )
        == HONEST_APP_REF
    )
    assert (
        client_app_ref(
            _config(tmp_path, attack__behaviour="scale", attack__fraction=0.1)
        )
        == HONEST_APP_REF  # round(0.4) = 0 attackers
    )


def test_the_submitted_app_names_the_chosen_client_app(tmp_path: Path) -> None:
    """The run's Flower app names the attack ClientApp, which resolves to a
    ClientApp; the default stays client.app:app; a malformed reference is
    refused before anything is written."""
    config = _config(tmp_path, attack__behaviour="sign_flip", attack__clients=[2])
    app_dir = write_app(tmp_path / "run", client_app_ref(config))
    pyproject = tomllib.loads((app_dir / "pyproject.toml").read_text())
    components = pyproject["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "server.app:app", "clientapp": ATTACK_APP_REF}
    assert isinstance(load_plugin(ATTACK_APP_REF), ClientApp)
    app_dir = write_app(tmp_path / "plain")
    plain = tomllib.loads((app_dir / "pyproject.toml").read_text())
    assert plain["tool"]["flwr"]["app"]["components"]["clientapp"] == HONEST_APP_REF
    with pytest.raises(DeployError, match="ClientApp reference"):
        write_app(tmp_path / "bad", 'x" \nevil = "1')


# -- LoRA replies ----------------------------------------------------------------

_LORA_SPEC = LoraSpec(model="tiny-llama", rank=2, target_modules=("q_proj",))
_TRAIN = LocalTrainConfig(
    server_round=ROUND,
    local_steps=2,
    batch_size=2,
    seed=SEED,
    learning_rate=1e-3,
    weight_decay=0.0,
)
# Small dyadic values: every expected result below is exact in float32.
_GLOBAL = {
    "a.lora_A.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4,
    "a.lora_B.weight": -torch.arange(4, dtype=torch.float32).reshape(2, 2) / 8,
}
_DELTA = {
    "a.lora_A.weight": torch.tensor([[0.5, -0.25, 0.0], [1.0, 0.125, -2.0]]),
    "a.lora_B.weight": torch.tensor([[0.0, 0.75], [-0.5, 0.25]]),
}
_TRAINED = {k: _GLOBAL[k] + _DELTA[k] for k in _GLOBAL}


def _lora_reply(
    tmp_path: Path, partition_id: int = ATTACKER, **attack: Any
) -> LoraTrainRes:
    config = _config(tmp_path, attack__clients=[ATTACKER], **attack)
    ins = encode_lora_train_ins(LoraTrainIns(_LORA_SPEC, _TRAIN, dict(_GLOBAL)))
    res = encode_lora_train_res(LoraTrainRes(dict(_TRAINED), 7, 1.5))
    out = _through_mod(
        _run_folder(tmp_path, config), partition_id, MESSAGE_TRAIN_LORA, ins, res
    )
    # What the server does with it: it must still decode.
    return decode_lora_train_res(out.content, expected=TensorLayout.of(_GLOBAL))


@pytest.mark.parametrize(
    ("attack", "expected"),
    [
        (
            {"attack__behaviour": "scale", "attack__scale": 1e6},
            {k: _GLOBAL[k] + 1e6 * _DELTA[k] for k in _GLOBAL},
        ),
        (
            {"attack__behaviour": "sign_flip"},
            {k: _GLOBAL[k] - _DELTA[k] for k in _GLOBAL},
        ),
        (
            {"attack__behaviour": "constant", "attack__value": 1e30},
            {k: torch.full_like(v, 1e30) for k, v in _GLOBAL.items()},
        ),
        ({"attack__behaviour": "inflate_examples"}, _TRAINED),
    ],
    ids=["scale", "sign_flip", "constant", "inflate_examples"],
)
def test_lora_model_attacks_send_the_hand_computed_adapter(
    tmp_path: Path,
    flower_identity: None,
    attack: dict[str, Any],
    expected: dict[str, torch.Tensor],
) -> None:
    """Breaks if a behaviour computes another adapter than its formula (update
    d = trained - global), changes the count when it should not, or leaves a
    reply the server cannot decode."""
    res = _lora_reply(tmp_path, **attack)
    assert list(res.adapter) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(res.adapter[name], tensor), name
    inflated = attack["attack__behaviour"] == "inflate_examples"
    assert res.num_examples == (2**62 if inflated else 7)
    assert res.train_loss == 1.5


def test_lora_gaussian_replaces_the_update_with_seeded_noise(
    tmp_path: Path, flower_identity: None
) -> None:
    """gaussian sends global + N(0, noise_std^2) drawn from (seed, attacker,
    round): the honest update is gone and the draw is reproducible."""
    res = _lora_reply(tmp_path, attack__behaviour="gaussian", attack__noise_std=0.5)
    gen = noise_generator(SEED, ATTACKER, ROUND)
    for name, g in _GLOBAL.items():
        noise = torch.randn(g.shape, generator=gen, dtype=torch.float32)
        assert torch.equal(
            res.adapter[name], (g.double() + 0.5 * noise.double()).float()
        )
    again = _lora_reply(
        tmp_path / "again", attack__behaviour="gaussian", attack__noise_std=0.5
    )
    assert all(torch.equal(again.adapter[k], res.adapter[k]) for k in _GLOBAL)
    other_round = noise_generator(SEED, ATTACKER, ROUND + 1)
    assert not torch.equal(
        torch.randn(2, 3, generator=other_round),
        torch.randn(2, 3, generator=noise_generator(SEED, ATTACKER, ROUND)),
    )


def test_an_honest_node_and_error_replies_pass_untouched(
    tmp_path: Path, flower_identity: None
) -> None:
    """Only the malicious partition's successful train replies are rewritten."""
    honest = _lora_reply(tmp_path, partition_id=0, attack__behaviour="scale")
    for name, tensor in _TRAINED.items():
        assert torch.equal(honest.adapter[name], tensor)
    assert honest.num_examples == 7

    config = _config(tmp_path, attack__behaviour="constant", attack__clients=[ATTACKER])
    run_dir = _run_folder(tmp_path, config)
    ins = encode_lora_train_ins(LoraTrainIns(_LORA_SPEC, _TRAIN, dict(_GLOBAL)))
    error = Error(code=4002, reason="no data")
    out = _through_mod(run_dir, ATTACKER, MESSAGE_TRAIN_LORA, ins, error)
    assert out.has_error() and out.error.reason == "no data"
    hello = encode_hello(NodeHello("p0001", 7, b""))
    out = _through_mod(run_dir, ATTACKER, "query.hello", RecordDict(), hello)
    assert out.content["hello"]["num-examples"] == 7


def test_without_a_run_folder_a_node_is_honest(flower_identity: None) -> None:
    """A deployed node (no run-dir) is never an attacker."""
    context = Context(1, 5, {"partition-id": ATTACKER}, RecordDict(), {})
    assert AttackMod().attacker(context) is None


# -- FedKSeed replies ------------------------------------------------------------

_ZO_SPEC = ZOSpec(model="tiny-llama", walk_fingerprint="w", generator="g", num_seeds=16)
_INDICES = torch.tensor([1, 3, 3, 15], dtype=torch.int32)
_SCALARS = torch.tensor([0.5, -1.25, 2.0, 0.0], dtype=torch.float32)


def _zo_reply(
    tmp_path: Path, partition_id: int = ATTACKER, **attack: Any
) -> ZoTrainRes:
    config = _config(tmp_path, attack__clients=[ATTACKER], **attack)
    schedule = RoundSchedule(server_round=ROUND, local_steps=4, batch_size=2, seed=SEED)
    ins = encode_zo_train_ins(ZoTrainIns(_ZO_SPEC, schedule, 2, 2, "h", ()))
    res = encode_zo_train_res(
        ZoTrainRes(
            _INDICES.numpy(), _SCALARS.clone().numpy(), 9, 2.5, 2, "h", skipped_steps=1
        )
    )
    out = _through_mod(
        _run_folder(tmp_path, config), partition_id, MESSAGE_TRAIN_ZO, ins, res
    )
    return decode_zo_train_res(out.content, num_seeds=16, max_steps=4)


@pytest.mark.parametrize(
    ("attack", "scalars", "count"),
    [
        ({"attack__behaviour": "scale", "attack__scale": 1e6}, _SCALARS * 1e6, 9),
        ({"attack__behaviour": "sign_flip"}, -_SCALARS, 9),
        (
            {"attack__behaviour": "constant", "attack__value": 1e20},
            torch.full((4,), 1e20),
            9,
        ),
        ({"attack__behaviour": "inflate_examples"}, _SCALARS, 2**62),
    ],
    ids=["scale", "sign_flip", "constant", "inflate_examples"],
)
def test_fedkseed_model_attacks_send_the_hand_computed_scalars(
    tmp_path: Path,
    flower_identity: None,
    attack: dict[str, Any],
    scalars: torch.Tensor,
    count: int,
) -> None:
    """Breaks if a behaviour changes the seeds, computes other scalars, or
    breaks the sync proof the server checks."""
    res = _zo_reply(tmp_path, **attack)
    assert torch.equal(torch.from_numpy(res.indices), _INDICES)
    assert torch.equal(torch.from_numpy(res.scalars), scalars.float())
    assert res.num_examples == count
    assert (res.synced_round, res.synced_hash, res.skipped_steps) == (2, "h", 1)


def test_fedkseed_gaussian_and_honest_node(
    tmp_path: Path, flower_identity: None
) -> None:
    """gaussian replaces the scalars with N(0, noise_std^2) from (seed,
    attacker, round); an honest partition's scalars are unchanged."""
    res = _zo_reply(tmp_path, attack__behaviour="gaussian", attack__noise_std=2.0)
    noise = torch.randn(4, generator=noise_generator(SEED, ATTACKER, ROUND))
    assert torch.equal(torch.from_numpy(res.scalars), (2.0 * noise.double()).float())
    honest = _zo_reply(tmp_path / "h", partition_id=2, attack__behaviour="gaussian")
    assert torch.equal(torch.from_numpy(honest.scalars), _SCALARS)
    assert honest.num_examples == 9


# -- SFPrompt replies ------------------------------------------------------------


def test_sfprompt_scale_acts_on_prompts_and_tail(
    tmp_path: Path, flower_identity: None
) -> None:
    """SFPrompt's trainable tensors get the LoRA treatment: g + scale * d."""
    config = _config(
        tmp_path,
        attack__behaviour="scale",
        attack__scale=8.0,
        attack__clients=[ATTACKER],
    )
    spec = SplitSpec(
        model="tiny-llama", num_prompts=2, client_blocks=1, num_blocks=2, hidden_size=3
    )
    round_config = SplitRoundConfig(
        server_round=ROUND,
        local_steps=1,
        local_loss_steps=0,
        batch_size=2,
        learning_rate=0.1,
        gamma=0.5,
        seed=SEED,
        trunk_address="127.0.0.1:1",
        trunk_grant=bytes(GRANT_BYTES),
    )
    ins = encode_split_train_ins(SplitTrainIns(spec, round_config, dict(_GLOBAL)))
    res = encode_split_train_res(SplitTrainRes(dict(_TRAINED), 5, 1.0, 1.0, 5, 10, 20))
    out = _through_mod(
        _run_folder(tmp_path, config), ATTACKER, MESSAGE_TRAIN_SFPROMPT, ins, res
    )
    back = decode_split_train_res(out.content, expected=TensorLayout.of(_GLOBAL))
    for name, g in _GLOBAL.items():
        assert torch.equal(back.tensors[name], g + 8.0 * _DELTA[name])
    assert (back.num_examples, back.trunk_bytes_up) == (5, 10)


# -- data attacks ----------------------------------------------------------------


def _client_files(run_dir: Path) -> list[list[Any]]:
    folder = RunFolder(run_dir)
    return [read_jsonl(folder.client_data(pid)) for pid in range(4)]


@pytest.fixture(scope="module")
def honest_partitions(tmp_path_factory: pytest.TempPathFactory) -> list[list[Any]]:
    """The partition files of the tiny config without an attack."""
    tmp = tmp_path_factory.mktemp("honest")
    return _client_files(prepare_run(_config(tmp), tmp / "run"))


def test_label_flip_moves_every_target_of_the_attacker_only(
    tmp_path: Path, honest_partitions: list[list[Any]]
) -> None:
    """The attacker's responses each become the next distinct response of the
    training set (sorted, cyclic); prompts, groups and every honest file stay
    as they are; partitions.json names the attacker."""
    config = _config(tmp_path, attack__behaviour="label_flip", attack__clients=[2])
    run_dir = prepare_run(config, tmp_path / "run")
    files = _client_files(run_dir)
    targets = sorted({e.response for part in honest_partitions for e in part})
    assert len(targets) >= 2
    successor = {t: targets[(i + 1) % len(targets)] for i, t in enumerate(targets)}
    for pid in (0, 1, 3):
        assert files[pid] == honest_partitions[pid]
    flipped, clean = files[2], honest_partitions[2]
    assert [(e.prompt, e.group) for e in flipped] == [
        (e.prompt, e.group) for e in clean
    ]
    assert [e.response for e in flipped] == [successor[e.response] for e in clean]
    assert all(a.response != b.response for a, b in zip(flipped, clean, strict=True))
    recorded = RunFolder(run_dir).read_record(RunFolder(run_dir).partitions)
    assert recorded is not None
    assert recorded["attack"] == {"behaviour": "label_flip", "malicious": [2]}


def test_shuffle_labels_permutes_the_attackers_targets(
    tmp_path: Path, honest_partitions: list[list[Any]]
) -> None:
    """The attacker keeps its prompts and its multiset of responses, but they
    no longer match; the same seed shuffles the same way."""
    config = _config(tmp_path, attack__behaviour="shuffle_labels", attack__clients=[0])
    files = _client_files(prepare_run(config, tmp_path / "run"))
    assert files[1:] == honest_partitions[1:]
    mine, clean = files[0], honest_partitions[0]
    assert [e.prompt for e in mine] == [e.prompt for e in clean]
    assert sorted(e.response for e in mine) == sorted(e.response for e in clean)
    assert [e.response for e in mine] != [e.response for e in clean]
    again = _client_files(prepare_run(config, tmp_path / "again"))
    assert again[0] == mine


def test_label_flip_needs_two_targets() -> None:
    """With a single distinct response nothing can be flipped: say so."""
    with pytest.raises(AttackError, match="label_flip"):
        flip_labels([], ["yes", "yes"])


# -- deployment ------------------------------------------------------------------


def test_a_deployed_server_refuses_an_attack(tmp_path: Path) -> None:
    """server start (deployed=True) refuses attackers naming attack.behaviour,
    on one line; the same config simulates, and an attack without attackers
    is accepted for deployment."""
    path = tmp_path / "run.toml"
    path.write_text(
        f"""[run]
output_dir = "{tmp_path / "runs"}"
[model]
name = "tiny-llama"
[federation]
clients = 2
[data]
limit = 60
eval_examples = 4
[attack]
behaviour = "sign_flip"
clients = [1]
"""
    )
    args = build_parser().parse_args(["validate", str(path)])
    with pytest.raises(ConfigError, match="attack.behaviour") as info:
        load_checked_config(path, args, deployed=True)
    assert "\n" not in str(info.value)
    assert load_checked_config(path, args).attack.behaviour == "sign_flip"
    path.write_text(path.read_text().replace("clients = [1]\n", ""))
    assert load_checked_config(path, args, deployed=True).attack.clients == ()


# -- a whole run -----------------------------------------------------------------


class _Tap:
    """The attack ClientApp, keeping each LoRA update's L2 norm by partition id."""

    def __init__(self) -> None:
        self.app = build_attack_app()
        self.update_norms: dict[int, list[float]] = {}

    def __call__(self, msg: Message, context: Context) -> Message:
        reply = self.app(msg, context)
        if msg.metadata.message_type == MESSAGE_TRAIN_LORA and not reply.has_error():
            sent = decode_lora_train_ins(msg.content).adapter
            back = decode_lora_train_res(
                reply.content, expected=TensorLayout.of(sent)
            ).adapter
            norm = math.sqrt(
                sum(
                    float((back[k].double() - t.double()).pow(2).sum())
                    for k, t in sent.items()
                )
            )
            pid = int(context.node_config["partition-id"])
            self.update_norms.setdefault(pid, []).append(norm)
        return reply


def test_an_in_process_run_survives_a_scaling_attacker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """4 LoRA clients, partition 1 scales its update by 1e6 in both rounds.
    Breaks if the attacker's reply is not the scaled one, if the run does not
    complete, or if the default (bounded) aggregation does not clip the
    attacker, alone, every round and keep the eval loss near where honest
    training keeps it (within 0.05 of the initial 5.57 for 2 tiny rounds; an
    unclipped 1e6 update moves it by orders of magnitude)."""
    config = _config(
        tmp_path,
        attack__behaviour="scale",
        attack__scale=1e6,
        attack__clients=[ATTACKER],
    )
    run_dir = prepare_run(config, tmp_path / "run")
    tap = _Tap()
    with caplog.at_level(logging.INFO, logger="simulation.attacks"):
        run_server(InProcessGrid(tap, 4, run_dir=run_dir), config, run_dir)
    folder = RunFolder(run_dir)
    assert folder.read_status().state == "completed"
    rows = folder.read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert len(tap.update_norms[ATTACKER]) == 2
    honest = max(n for pid in (0, 2, 3) for n in tap.update_norms[pid])
    assert 0 < honest and min(tap.update_norms[ATTACKER]) > 1e4 * honest
    assert sum("sends a scale reply" in r.getMessage() for r in caplog.records) == 2
    for row in rows[1:]:
        assert (row["clients"], row["rejected"], row["clipped"]) == (4, 0, 1), row
        assert abs(row["eval_loss"] - rows[0]["eval_loss"]) < 0.05, row
