"""Client-side LoRA: the local trainer and the ClientApp handlers (tiny model).

train_lora must actually learn and be bitwise reproducible from (seed, round,
label), since federated runs are compared run to run. The handlers are the
client's trust boundary: a valid instruction yields a decodable reply, and
every bad instruction or bad node setup yields an error reply that names the
problem instead of raising.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict

import models
from client.app import build_client_app
from client.batches import derive_seed
from client.lora_trainer import train_lora
from corpora import Example, generate_tasks, write_jsonl
from protocols import (
    MESSAGE_HELLO,
    MESSAGE_TRAIN_LORA,
    LocalTrainConfig,
    LoraSpec,
    LoraTrainIns,
    decode_hello,
    decode_lora_train_res,
    encode_lora_train_ins,
)
from protocols.messages import ERROR_BAD_INSTRUCTION, ERROR_NODE_SETUP

SPEC = LoraSpec(model="tiny-llama", max_length=64)
CPU = torch.device("cpu")

_APP = build_client_app()


def hello(msg: Message, context: Context) -> Message:
    """The ClientApp's answer to ``query.hello`` (routed by the app)."""
    return _APP(msg, context)


train = hello  # the app routes ``train.lora`` the same way


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: tiny matmuls gain nothing from more, and on a busy
    machine OpenMP spin-waiting makes each step up to 100x slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _fresh_lora() -> tuple[torch.nn.Module, object]:
    loaded = models.load_causal_lm("tiny-llama")
    return models.attach_lora(loaded.model, SPEC), loaded.tokenizer


def _tokenized(tokenizer: object, n: int = 32) -> list[models.TokenizedExample]:
    return [
        models.tokenize_example(e, tokenizer, SPEC.max_length)
        for e in generate_tasks(n, 0)
    ]


def _config(
    steps: int, lr: float = 3e-3, batch: int = 4, round_: int = 1
) -> LocalTrainConfig:
    return LocalTrainConfig(
        server_round=round_,
        local_steps=steps,
        batch_size=batch,
        learning_rate=lr,
        weight_decay=0.0,
        seed=0,
    )


def _eval_loss(model: torch.nn.Module, examples: list, pad_id: int) -> float:
    batch = models.collate_train(examples, pad_id)
    with torch.no_grad():
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            labels=batch.labels,
        )
    return float(out.loss)


# -- train_lora ---------------------------------------------------------------------


def test_train_lora_lowers_loss() -> None:
    """30 AdamW steps at lr 3e-3 on 32 task examples must lower the loss on those
    examples (measured before/after with the model), and a second call must
    report a lower mean training loss than the first; an optimiser that never
    stepped or a frozen adapter would leave it unchanged."""
    model, tok = _fresh_lora()
    data = _tokenized(tok)
    pad = int(tok.pad_token_id)
    before = _eval_loss(model, data, pad)
    first = train_lora(model, data, _config(30), pad_id=pad, label="p0000", device=CPU)
    after = _eval_loss(model, data, pad)
    second = train_lora(
        model, data, _config(30, round_=2), pad_id=pad, label="p0000", device=CPU
    )
    assert math.isfinite(first.mean_loss)
    assert after < before - 0.05, (before, after)
    assert second.mean_loss < first.mean_loss
    assert first.steps == 30 and first.examples_seen == 30 * 4
    assert not model.training  # left in eval mode


def test_train_lora_only_adapter_changes() -> None:
    """Training must change only adapter tensors: the base weights stay frozen."""
    model, tok = _fresh_lora()
    base_before = {
        k: v.clone() for k, v in model.named_parameters() if "lora_" not in k
    }
    adapter_before = models.adapter_tensors(model)
    train_lora(
        model,
        _tokenized(tok, 8),
        _config(2),
        pad_id=int(tok.pad_token_id),
        label="x",
        device=CPU,
    )
    for k, v in model.named_parameters():
        if "lora_" not in k:
            assert torch.equal(v, base_before[k]), k
    after = models.adapter_tensors(model)
    assert any(not torch.equal(after[k], adapter_before[k]) for k in after)


def test_train_lora_deterministic_per_label() -> None:
    """Two fresh models with the same config and label must end with
    bit-identical adapters; another label must give different adapters (each
    client gets its own batch order)."""
    results = []
    for label in ("p0001", "p0001", "p0002"):
        model, tok = _fresh_lora()
        stats = train_lora(
            model,
            _tokenized(tok, 16),
            _config(4),
            pad_id=int(tok.pad_token_id),
            label=label,
            device=CPU,
        )
        results.append((models.adapter_tensors(model), stats.mean_loss))
    (a, la), (b, lb), (c, _) = results
    assert la == lb
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(a[name], c[name]) for name in a)


def test_train_lora_leaves_global_rng_alone() -> None:
    """Training uses private generators: the caller's global torch RNG state must
    be the same after the call (otherwise simulation draws would shift)."""
    model, tok = _fresh_lora()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    train_lora(
        model,
        _tokenized(tok, 8),
        _config(2),
        pad_id=int(tok.pad_token_id),
        label="x",
        device=CPU,
    )
    assert torch.equal(torch.random.get_rng_state(), state)


def test_train_lora_no_examples_raises() -> None:
    """No examples is a ValueError, not a silent no-op."""
    model, tok = _fresh_lora()
    with pytest.raises(ValueError, match="no training examples"):
        train_lora(
            model, [], _config(1), pad_id=int(tok.pad_token_id), label="x", device=CPU
        )


def test_derive_seed_stable() -> None:
    """Seeds are a pure function of their parts (same across processes), 63-bit."""
    assert derive_seed(0, 1, "a") == derive_seed(0, 1, "a")
    assert derive_seed(0, 1, "a") != derive_seed(0, 1, "b")
    assert derive_seed(0, 1, "a") != derive_seed(0, 2, "a")
    assert 0 <= derive_seed(5, 5, "z") < 2**63


# -- ClientApp handlers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("node") / "client-0007.jsonl"
    write_jsonl(generate_tasks(12, seed=3), path)
    return path


@pytest.fixture(scope="module")
def global_adapter() -> dict[str, torch.Tensor]:
    model, _ = _fresh_lora()
    return models.adapter_tensors(model)


def _context(node_config: dict) -> Context:
    return Context(
        run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={}
    )


def _train_msg(adapter: dict[str, torch.Tensor]) -> Message:
    config = LocalTrainConfig(
        server_round=1,
        local_steps=2,
        batch_size=4,
        learning_rate=1e-3,
        weight_decay=0.0,
        seed=0,
    )
    content = encode_lora_train_ins(
        LoraTrainIns(spec=SPEC, config=config, adapter=adapter)
    )
    return Message(content, dst_node_id=5, message_type=MESSAGE_TRAIN_LORA)


def test_train_handler_valid_instruction(
    flower_identity: None, data_file: Path, global_adapter: dict
) -> None:
    """A valid instruction yields a reply (not an error) whose adapter decodes
    against the model's layout, reports the node's example count and a finite
    loss, and differs from the adapter that was sent (it trained)."""
    msg = _train_msg(global_adapter)
    reply = train(msg, _context({"data-path": str(data_file)}))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    model, _ = _fresh_lora()
    res = decode_lora_train_res(reply.content, expected=models.adapter_layout(model))
    assert res.num_examples == 12
    assert math.isfinite(res.train_loss) and res.train_loss > 0
    assert any(
        not torch.equal(res.adapter[k], global_adapter[k]) for k in global_adapter
    )


def test_train_handler_reproducible(
    flower_identity: None, data_file: Path, global_adapter: dict
) -> None:
    """The same instruction twice (the cached model is reused) must give the
    bit-identical adapter: the handler reloads the global adapter each time."""
    ctx = _context({"data-path": str(data_file)})
    model, _ = _fresh_lora()
    layout = models.adapter_layout(model)
    a = decode_lora_train_res(
        train(_train_msg(global_adapter), ctx).content, expected=layout
    )
    b = decode_lora_train_res(
        train(_train_msg(global_adapter), ctx).content, expected=layout
    )
    assert a.train_loss == b.train_loss
    for name in a.adapter:
        assert torch.equal(a.adapter[name], b.adapter[name])


def test_train_handler_tampered_spec(
    flower_identity: None, data_file: Path, global_adapter: dict
) -> None:
    """A spec edited after encoding must produce an error reply mentioning the
    fingerprint, never training under a spec the server did not send."""
    msg = _train_msg(global_adapter)
    msg.content["spec"]["rank"] = 4
    reply = train(msg, _context({"data-path": str(data_file)}))
    assert reply.has_error()
    assert reply.error.code == ERROR_BAD_INSTRUCTION
    assert "fingerprint" in reply.error.reason


def test_train_handler_wrong_shape_adapter(
    flower_identity: None, data_file: Path, global_adapter: dict
) -> None:
    """An adapter tensor of the wrong shape must produce an error reply naming it."""
    bad = dict(global_adapter)
    name = next(iter(bad))
    bad[name] = torch.zeros(bad[name].shape[0], bad[name].shape[1] + 1)
    reply = train(_train_msg(bad), _context({"data-path": str(data_file)}))
    assert reply.has_error()
    assert reply.error.code == ERROR_BAD_INSTRUCTION
    assert name in reply.error.reason


def test_train_handler_no_data_config(
    flower_identity: None, global_adapter: dict
) -> None:
    """A node started without data-path or partition-id answers with an error
    naming 'data-path' (how to fix it)."""
    reply = train(_train_msg(global_adapter), _context({}))
    assert reply.has_error()
    assert reply.error.code == ERROR_NODE_SETUP
    assert "data-path" in reply.error.reason


def test_train_handler_missing_data_file(
    flower_identity: None, tmp_path: Path, global_adapter: dict
) -> None:
    """A data-path pointing at nothing answers with an error naming the path."""
    missing = tmp_path / "gone.jsonl"
    reply = train(_train_msg(global_adapter), _context({"data-path": str(missing)}))
    assert reply.has_error()
    assert reply.error.code == ERROR_NODE_SETUP
    assert str(missing) in reply.error.reason


def test_hello_reports_count_and_label(flower_identity: None, data_file: Path) -> None:
    """hello returns the node's example count and its label (file stem by default,
    or the configured label)."""
    msg = Message(RecordDict(), dst_node_id=5, message_type=MESSAGE_HELLO)
    info = decode_hello(hello(msg, _context({"data-path": str(data_file)})).content)
    assert info.num_examples == 12 and info.label == "client-0007"
    labelled = hello(msg, _context({"data-path": str(data_file), "label": "site-a"}))
    assert decode_hello(labelled.content).label == "site-a"


def test_hello_errors(flower_identity: None, tmp_path: Path) -> None:
    """hello without data config, or with a missing file, is an error reply."""
    msg = Message(RecordDict(), dst_node_id=5, message_type=MESSAGE_HELLO)
    assert hello(msg, _context({})).has_error()
    missing = tmp_path / "none.jsonl"
    reply = hello(msg, _context({"data-path": str(missing)}))
    assert reply.has_error() and str(missing) in reply.error.reason


def test_hello_simulated_partition(
    flower_identity: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A simulated node (partition-id + run-dir) reads run_dir/data/client-NNNN.jsonl
    and is labelled pNNNN; without a run folder it answers with an error naming
    'run-dir'."""
    write_jsonl(generate_tasks(5, seed=8), tmp_path / "data" / "client-0003.jsonl")
    msg = Message(RecordDict(), dst_node_id=5, message_type=MESSAGE_HELLO)
    ctx = Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 3},
        state=RecordDict(),
        run_config={"run-dir": str(tmp_path)},
    )
    info = decode_hello(hello(msg, ctx).content)
    assert info == decode_hello(hello(msg, ctx).content)
    assert info.label == "p0003" and info.num_examples == 5
    reply = hello(msg, _context({"partition-id": 3}))
    assert reply.has_error() and "run-dir" in reply.error.reason


def test_hello_counts_fresh_file(flower_identity: None, tmp_path: Path) -> None:
    """A file the node never trained on is counted by reading it."""
    path = tmp_path / "small.jsonl"
    write_jsonl([Example("p", "r", "g")] * 3, path)
    msg = Message(RecordDict(), dst_node_id=5, message_type=MESSAGE_HELLO)
    assert (
        decode_hello(
            hello(msg, _context({"data-path": str(path)})).content
        ).num_examples
        == 3
    )


def test_attaching_lora_raises_no_deprecation_warning() -> None:
    """A default run attaches LoRA on every node: PEFT's constructor must not
    surface transformers' deprecation of ``is_gradient_checkpointing`` (or any
    other deprecation) into the run's log."""
    import warnings

    lm = models.load_causal_lm("tiny-llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models.attach_lora(lm.model, LoraSpec(model="tiny-llama", rank=2))
    bad = [
        w for w in caught if issubclass(w.category, DeprecationWarning | FutureWarning)
    ]
    assert bad == [], [str(w.message) for w in bad]
