"""FedKSeed over a LoRA adapter: only the adapter's A and B are perturbed.

The protocol is FedKSeed's (seeds and scalars on the wire, bit-exact replay,
hash checks); what changes is the model the spec perturbs, built by
:mod:`models.zo_model`. The server's driver and the real ClientApp exchange
real Flower messages in-process, as in ``tests/test_fedkseed.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from peft import PeftModel
from transformers import AutoModelForCausalLM

from client.app import build_client_app
from client.runtime import ClientRuntime
from corpora import Example, generate_tasks, write_jsonl
from models import collate_train, load_causal_lm, tokenize_example
from models.loading import model_skeleton
from models.zo_model import AdapterShape, load_zo_model, zo_walk
from protocols import ProtocolError, ZOSpec, state_hash
from protocols.run_folder import RunFolder
from protocols.zo_messages import decode_zo_train_res
from server.app import build_driver
from server.config import ConfigError, RunConfig, config_to_toml, load_config
from server.export import export_run
from server.methods import build_spec
from server.zo_driver import ZoDriver

ADAPTER = AdapterShape(rank=4, alpha=8.0, targets=("q_proj", "v_proj"), seed=5)


# ------------------------------------------------------------------ the model
def test_w0_is_deterministic_and_set_by_the_adapter_seed() -> None:
    """Two builds of one adapter give the same w0 bit for bit (and leave
    torch's RNG alone); another adapter seed gives another w0; A is drawn at
    PEFT's default scale and B is zero, so the adapted model starts as the base.

    Breaks if the init reads torch's RNG or the stream depends on the build.
    """
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = load_zo_model("tiny-llama", adapter=ADAPTER)
    assert torch.equal(torch.rand(3), before), "the init consumed torch's RNG"
    b = load_zo_model("tiny-llama", adapter=ADAPTER)
    assert state_hash(a.params()) == state_hash(b.params())
    assert all(
        torch.equal(x, y) for (_, x), (_, y) in zip(a.params(), b.params(), strict=True)
    )
    other = AdapterShape(ADAPTER.rank, ADAPTER.alpha, ADAPTER.targets, seed=6)
    c = load_zo_model("tiny-llama", adapter=other)
    assert state_hash(c.params()) != state_hash(a.params())
    for name, p in a.params():
        if "lora_B" in name:
            assert not p.any()
        else:
            want = 1 / (3 * p.shape[1]) ** 0.5  # std of U(-1/sqrt(fan_in), ...)
            assert 0.8 * want < float(p.detach().std()) < 1.2 * want
    base = load_causal_lm("tiny-llama")
    ids = torch.arange(20).reshape(2, 10)
    with torch.no_grad():
        assert torch.equal(
            a.model(input_ids=ids).logits, base.model(input_ids=ids).logits
        )


def test_the_walk_holds_only_the_adapter_matrices() -> None:
    """The walk is every targeted module's lora_A and lora_B, nothing of the
    base; a weightless skeleton gives the same walk (``pollinate validate``).
    """
    zo = load_zo_model("tiny-llama", adapter=ADAPTER)
    names = zo.walk.names
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    # q_proj: A (4, 64), B (64, 4); v_proj (2 KV heads of 16): B (32, 4)
    assert zo.walk.numel == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    assert all(
        not p.requires_grad for n, p in zo.model.named_parameters() if "lora_" not in n
    )
    skeleton = zo_walk(model_skeleton("tiny-llama"), (), ADAPTER)
    assert skeleton.fingerprint() == zo.walk.fingerprint()
    with pytest.raises(ProtocolError, match="include"):
        zo_walk(model_skeleton("tiny-llama"), ("*q_proj*",), ADAPTER)


# ------------------------------------------------------------------ the spec
def _spec(**adapter: Any) -> ZOSpec:
    return ZOSpec(
        model="tiny-llama", walk_fingerprint="ab" * 8, generator="g/1", **adapter
    )


def test_an_adapter_spec_round_trips_and_an_old_record_still_decodes() -> None:
    """The adapter fields travel in the spec's ConfigRecord; a record written
    before they existed (no adapter keys, fingerprint over the old fields)
    decodes to a spec without adapter, whose record and fingerprint are still
    the old ones.

    Breaks if the new fields become required or enter an old spec's fingerprint.
    """
    spec = _spec(
        adapter_rank=8, adapter_alpha=4.0, adapter_targets=("q_proj",), adapter_seed=9
    )
    assert spec.has_adapter
    assert ZOSpec.from_config_record(spec.to_config_record()) == spec
    old_fields = {
        "model": "tiny-llama",
        "walk_fingerprint": "ab" * 8,
        "generator": "g/1",
        "include": [],
        "num_seeds": 1024,
        "master_seed": 0,
        "eps": 5e-4,
        "learning_rate": 3e-7,
        "sampling": "uniform",
        "grad_clip": 1000.0,
        "max_length": 128,
    }
    text = json.dumps(["ZOSpec", 1, old_fields], sort_keys=True)
    fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
    record = {**old_fields, "schema-version": 1, "fingerprint": fingerprint}
    old = ZOSpec.from_config_record(record)
    assert not old.has_adapter and old == _spec()
    assert old.fingerprint() == fingerprint
    assert dict(old.to_config_record()) == record
    tampered = {**dict(spec.to_config_record()), "adapter_seed": 10}
    with pytest.raises(ProtocolError, match="fingerprint"):
        ZOSpec.from_config_record(tampered)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"adapter_rank": 257, "adapter_targets": ("q_proj",)}, "adapter_rank"),
        ({"adapter_rank": -1}, "adapter_rank"),
        ({"adapter_rank": 4}, "adapter_targets"),
        ({"adapter_rank": 4, "adapter_targets": ("",)}, "adapter_targets"),
        ({"adapter_targets": ("q_proj",)}, "adapter_targets"),
        (
            {"adapter_rank": 4, "adapter_targets": ("q",), "adapter_alpha": 0.0},
            "adapter_alpha",
        ),
        ({"adapter_rank": 4, "adapter_targets": ("q",), "include": ("*",)}, "include"),
    ],
)
def test_a_bad_adapter_spec_is_refused(fields: dict[str, Any], message: str) -> None:
    """Out-of-range rank, no targets, targets without rank, a bad alpha, or
    ``include`` together with an adapter are refused, naming the field."""
    with pytest.raises(ProtocolError, match=message):
        _spec(**fields)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"zo.adapter_rank": 4, "zo.include": ["*q_proj*"]}, "cannot be combined"),
        ({"zo.adapter_rank": 4, "zo.adapter_targets": []}, "must name at least one"),
        ({"zo.adapter_rank": 512}, "zo.adapter_rank"),
        ({"zo.adapter_alpha": -1.0}, "zo.adapter_alpha"),
        ({"zo.adapter_seed": -1}, "zo.adapter_seed"),
    ],
)
def test_config_refuses_bad_adapter_settings(
    overrides: dict[str, Any], message: str
) -> None:
    """``[zo]`` adapter keys are checked when the config is parsed."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_unset_adapter_alpha_is_twice_the_rank(tmp_path: Path) -> None:
    """The adapter's scale alpha / r stays 2 whatever the rank unless alpha is
    set: a fixed 16 scaled a rank-2 adapter by 8, four times the measured
    setting (bench.zo_adapter). The run folder's config records the value,
    so a resume reads the same alpha back."""
    assert load_config(None, {"zo.adapter_rank": 2}).zo.adapter_alpha == 4.0
    assert load_config(None, {"zo.adapter_rank": 8}).zo.adapter_alpha == 16.0
    explicit = {"zo.adapter_rank": 2, "zo.adapter_alpha": 16.0}
    assert load_config(None, explicit).zo.adapter_alpha == 16.0
    path = tmp_path / "run.toml"
    path.write_text('[run]\nmethod = "fedkseed"\n\n[zo]\nadapter_rank = 4\n')
    config = load_config(path)
    assert config.zo.adapter_alpha == 8.0
    path.write_text(config_to_toml(config))
    assert "adapter_alpha = 8.0" in path.read_text()
    assert load_config(path).zo.adapter_alpha == 8.0


def test_the_run_spec_records_the_adapter_from_config() -> None:
    """The spec built from ``[zo]`` records the adapter and its walk; without
    ``adapter_rank`` the adapter keys stay out of it (a plain FedKSeed spec)."""
    config = load_config(None, _overrides())
    spec = build_spec(config)
    assert isinstance(spec, ZOSpec)
    assert (spec.adapter_rank, spec.adapter_alpha, spec.adapter_seed) == (4, 8.0, 5)
    assert spec.adapter_targets == ("o_proj", "down_proj")
    zo = load_zo_model("tiny-llama", adapter=AdapterShape.of(spec))
    assert spec.walk_fingerprint == zo.walk.fingerprint()
    plain = build_spec(load_config(None, _overrides(adapter_rank=0)))
    assert isinstance(plain, ZOSpec) and not plain.has_adapter
    assert "adapter_rank" not in plain.to_config_record()


# --------------------------------------------------------------- federation
def _overrides(steps: int = 16, **zo: Any) -> dict[str, Any]:
    """A tiny adapter-mode FedKSeed run; the settings lower the loss (below).

    Many candidate seeds matter: with K seeds the run moves only in K
    directions of the adapter's ~2,300, and a few dozen barely descend. So
    does the batch: a step over a node's 16 examples (no data noise) lowers
    the loss for every adapter seed tried (5, 11, 12, 14, 15, 16: by
    0.075-0.13 nats), batches of 4 only for some (-0.01 to 0.06).
    """
    settings = {
        "adapter_rank": 4,
        "adapter_alpha": 8.0,
        "adapter_seed": 5,
        "adapter_targets": ["o_proj", "down_proj"],
        "num_seeds": 1024,
        "learning_rate": 1e-1,
        "eps": 1e-2,
        **zo,
    }
    return {
        "run.method": "fedkseed",
        "model.name": "tiny-llama",
        "model.max_length": 64,
        "train.local_steps": steps,
        "train.batch_size": 16,
        "eval.max_new_tokens": 2,
        **{f"zo.{k}": v for k, v in settings.items()},
    }


class _Fed:
    """A FedKSeed server driver and three nodes served by one ClientApp."""

    def __init__(
        self,
        config: RunConfig,
        tmp_path: Path,
        examples: list[Example],
        run_id: int = 7,
    ) -> None:
        self.config = config
        self.driver: ZoDriver = build_driver(config, examples[:4])  # type: ignore[assignment]
        self.contexts = {}
        for node in (1, 2, 3):
            path = tmp_path / f"node{node}.jsonl"
            write_jsonl(examples[node * 16 : node * 16 + 16], path)
            self.contexts[node] = Context(
                run_id=run_id,
                node_id=node,
                node_config={"data-path": str(path), "label": f"n{node}"},
                state=RecordDict(),
                run_config={},
            )
        self.new_device()

    def new_device(self) -> None:
        """A fresh device process: nothing cached in memory."""
        self.runtime = ClientRuntime()
        self.app = build_client_app(self.runtime)

    def round(self, server_round: int, alive: set[int]) -> list[Message]:
        nodes = {n: f"n{n}" for n in sorted(self.contexts)}
        messages = self.driver.configure(server_round, nodes)
        replies = [
            self.app(m, self.contexts[m.metadata.dst_node_id])
            for m in messages
            if m.metadata.dst_node_id in alive
        ]
        labelled = [(f"n{r.metadata.src_node_id}", r) for r in replies]
        result = self.driver.apply(server_round, labelled)
        assert result.rejected == 0, [r.error.reason for r in replies if r.has_error()]
        assert result.clients == len(alive)
        return replies

    def client_hashes(self) -> set[str]:
        return {state.hash for state in self.runtime._zo.values()}


@pytest.fixture()
def examples() -> list[Example]:
    return generate_tasks(96, seed=1)


@pytest.fixture()
def isolated_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flower_identity: None
) -> Path:
    monkeypatch.setenv("POLLINATE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def _loss(driver: ZoDriver, examples: list[Example]) -> float:
    tokenizer = load_causal_lm("tiny-llama").tokenizer
    batch = collate_train(
        [tokenize_example(e, tokenizer, 64) for e in examples], tokenizer.pad_token_id
    )
    with torch.no_grad():
        out = driver.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            labels=batch.labels,
        )
    return float(out.loss)


def _train(
    isolated_cache: Path, examples: list[Example], rounds: int, **zo: Any
) -> tuple[float, float]:
    fed = _Fed(load_config(None, _overrides(**zo)), isolated_cache, examples)
    held_out = examples[64:96]
    before = _loss(fed.driver, held_out)
    for server_round in range(1, rounds + 1):
        fed.round(server_round, {1, 2, 3})
    return before, _loss(fed.driver, held_out)


def test_adapter_fedkseed_lowers_the_held_out_loss(
    isolated_cache: Path, examples: list[Example]
) -> None:
    """Four rounds of three clients lower the loss on 32 unseen examples by
    more than 0.04 nats (0.117 measured; with ``zo.learning_rate`` 1e-5 the
    same run moves it by less than 0.001, failing this check).

    Breaks if the perturbed adapter does not reach the forward pass (peft
    wrapper bypassed, B never perturbed) or the server's update has the wrong
    sign or scale.
    """
    before, after = _train(isolated_cache, examples, rounds=4)
    assert before - after > 0.04, (before, after)


def test_clients_and_server_stay_on_one_hash_every_round(
    isolated_cache: Path, examples: list[Example]
) -> None:
    """Every reply of every round was trained from exactly the server's model
    (its synced hash), through dropouts and a node that joins in round 4
    from a fresh process; resetting a node to w0 gives w0's hash again.

    Breaks if client and server build different adapters or walks, or
    replay differs by one bit.
    """
    fed = _Fed(
        load_config(None, _overrides(steps=4, num_seeds=64)), isolated_cache, examples
    )
    w0_hash = fed.driver.hash
    assert w0_hash == state_hash(
        load_zo_model("tiny-llama", adapter=ADAPTER_OF_RUN).params()
    )
    seen = [w0_hash]
    for server_round, alive in enumerate([{1, 2}, {2}, {1, 2}], start=1):
        replies = fed.round(server_round, alive)
        assert {_synced(r) for r in replies} == {(server_round - 1, seen[-1])}
        seen.append(fed.driver.hash)
    assert len(set(seen)) == len(seen), "some round did not change the adapter"
    fed.new_device()
    replies = fed.round(4, {3})
    assert {_synced(r) for r in replies} == {(3, seen[-1])}
    (state,) = fed.runtime._zo.values()
    state._reset_to_w0()
    assert state.hash == w0_hash and state.round == 0


ADAPTER_OF_RUN = AdapterShape(4, 8.0, ("o_proj", "down_proj"), 5)


def _synced(reply: Message) -> tuple[int, str]:
    assert not reply.has_error(), reply.error.reason
    record = reply.content
    res = decode_zo_train_res(record, num_seeds=64, max_steps=4)
    return res.synced_round, res.synced_hash


def test_a_restarted_server_resumes_bit_exactly(
    isolated_cache: Path, examples: list[Example]
) -> None:
    """A server checkpointed after round 2 and killed, rebuilt in a new
    process and restored, runs round 3 with fresh devices (they replay the
    whole history from w0, none is rejected) and ends on the model an
    uninterrupted run reaches: same hash, equal adapter tensors.

    Breaks if restore does not rebuild the adapter's w0 or replays the seed
    history differently from the run.
    """
    config = load_config(None, _overrides(steps=4, num_seeds=64))
    whole = _Fed(config, isolated_cache / "whole", examples, run_id=1)
    for server_round in (1, 2, 3):
        whole.round(server_round, {1, 2})
    crashed = _Fed(config, isolated_cache / "crash", examples, run_id=2)
    for server_round in (1, 2):
        crashed.round(server_round, {1, 2})
    folder = RunFolder(isolated_cache / "run")
    crashed.driver.checkpoint(folder, 2, {})
    at_kill = crashed.driver.hash
    del crashed
    resumed = _Fed(config, isolated_cache / "resumed", examples, run_id=3)
    assert resumed.driver.restore(folder) == 2
    assert resumed.driver.hash == at_kill
    resumed.round(3, {1, 2})
    assert resumed.driver.hash == whole.driver.hash
    assert all(
        torch.equal(a, b)
        for (_, a), (_, b) in zip(
            resumed.driver.params, whole.driver.params, strict=True
        )
    )


def test_export_merges_the_tuned_adapter_into_a_plain_model(
    isolated_cache: Path, examples: list[Example]
) -> None:
    """``merged`` is a plain Hugging Face folder (no PEFT keys) whose weights
    differ from the base model's where adapters were; ``adapter`` is a PEFT
    adapter folder that reproduces the merged model's logits.

    Breaks if the export ignores the adapter (writes the base model) or
    merges it at the wrong scale.
    """
    config = load_config(None, _overrides(steps=4, num_seeds=64))
    fed = _Fed(config, isolated_cache, examples)
    for server_round in (1, 2):
        fed.round(server_round, {1, 2, 3})
    run = RunFolder(isolated_cache / "run")
    run.path.mkdir()
    run.config.write_text(config_to_toml(config))
    fed.driver.finish(run)
    merged_dir = export_run(run.path, isolated_cache / "merged", "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    base = load_causal_lm("tiny-llama").model
    names = dict(merged.named_parameters())
    assert not any("lora" in n for n in names)
    changed = {n for n, p in base.named_parameters() if not torch.equal(p, names[n])}
    assert changed and all(("o_proj" in n or "down_proj" in n) for n in changed)
    adapter_dir = export_run(run.path, isolated_cache / "adapter", "adapter")
    with_adapter = PeftModel.from_pretrained(
        load_causal_lm("tiny-llama").model, adapter_dir
    )
    ids = torch.arange(24).reshape(2, 12)
    with torch.no_grad():
        want = merged(input_ids=ids).logits
        got = with_adapter(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-5)


@pytest.mark.long
def test_a_killed_adapter_run_resumes_to_the_uninterrupted_result(
    tmp_path: Path,
) -> None:
    """``pollinate simulate`` of adapter-mode FedKSeed killed after round 2
    and resumed ends with the metrics and model hash of an uninterrupted run
    (the machinery of ``tests/test_resume.py``, through the real engine)."""
    from cli.main import main as cli_main
    from simulation import launch, read_metrics
    from tests.test_resume import ZO, _prepared, _strip

    extra = [*ZO, "--set", "zo.adapter_rank=4", "--set", "zo.learning_rate=1e-1"]
    whole = _prepared(tmp_path / "whole", *extra)
    assert launch(whole, rounds=3).ok
    crashed = _prepared(tmp_path / "crash", *extra)
    result = launch(crashed, rounds=3, env={"POLLINATE_FAULT_AFTER_ROUND": "2"})
    assert not result.ok
    assert cli_main(["resume", str(crashed)]) == 0
    a = read_metrics(whole / "metrics.jsonl")
    b = read_metrics(crashed / "metrics.jsonl")
    for rows in (a, b):
        for row in rows:
            row.pop("bytes_down")
    assert _strip(a) == _strip(b)
    assert a[-1]["model_hash"] == b[-1]["model_hash"]
    assert export_run(crashed, tmp_path / "merged", "merged").is_dir()
