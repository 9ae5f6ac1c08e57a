"""Whole LoRA runs in process for the LoRA-family tests: record what moved.

The real ServerApp loop and ClientApp on tiny-llama
(:class:`~simulation.inprocess.InProcessGrid`). :class:`RecordingGrid` keeps
every round's decoded ``train.lora`` instructions and replies (and can stop
the server when a round is sent, as ``server stop`` does); :func:`run`
records the server model's effective weights each time it is evaluated.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Message

from client.app import app as client_app
from protocols import (
    MESSAGE_TRAIN_LORA,
    LoraTrainIns,
    LoraTrainRes,
    TensorLayout,
    decode_lora_train_ins,
    decode_lora_train_res,
)
from protocols.run_folder import RunFolder
from server.app import run_server
from server.config import RunConfig, load_config
from server.lora_driver import LoraDriver
from simulation.inprocess import InProcessGrid
from simulation.prepare import prepare_run


def lora_config(
    tmp_path: Path, name: str, clients: int, overrides: dict[str, Any]
) -> RunConfig:
    """A 3-round tiny-llama LoRA run: unclipped, weights the example counts.

    (``weight_multiple`` 100: the partitions' counts are not capped, so a
    client's weight is its ``num_examples`` share.)
    """
    return load_config(
        None,
        {
            "run.name": name,
            "run.rounds": 3,
            "run.output_dir": str(tmp_path),
            "model.name": "tiny-llama",
            "model.max_length": 32,
            "data.limit": 60,
            "data.eval_examples": 6,
            "federation.clients": clients,
            "federation.clip": "off",
            "federation.weight_multiple": 100.0,
            "train.local_steps": 3,
            "train.batch_size": 2,
            "train.learning_rate": 0.01,
            "eval.max_new_tokens": 2,
            **overrides,
        },
    )


@dataclass
class Round:
    """One round as the nodes saw it, by node id."""

    ins: dict[int, LoraTrainIns] = field(default_factory=dict)
    res: dict[int, LoraTrainRes] = field(default_factory=dict)


class RecordingGrid(InProcessGrid):
    """Records each ``train.lora`` round; stops when round ``stop_at`` is sent."""

    def __init__(self, clients: int, run_dir: Path, stop_at: int | None) -> None:
        super().__init__(client_app, clients, run_dir=run_dir)
        self.stop_at = stop_at
        self.rounds: list[Round] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not any(m.metadata.message_type == MESSAGE_TRAIN_LORA for m in messages):
            return super().send_and_receive(messages, timeout=timeout)
        if self.stop_at is not None and len(self.rounds) + 1 == self.stop_at:
            raise KeyboardInterrupt("stopped by the test")
        rnd = Round()
        for m in messages:
            rnd.ins[m.metadata.dst_node_id] = decode_lora_train_ins(m.content)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for m, r in zip(messages, replies, strict=True):  # replies in the order sent
            assert not r.has_error(), r.error.reason
            node = m.metadata.dst_node_id
            layout = TensorLayout.of(rnd.ins[node].adapter)
            rnd.res[node] = decode_lora_train_res(r.content, expected=layout)
        self.rounds.append(rnd)
        return replies


@dataclass
class Recorded:
    """A finished run, its rounds and the server model at each evaluation."""

    folder: RunFolder
    rounds: list[Round]
    # Per evaluation: (adapter, residual, prefix -> live base weight).
    evaluated: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]]


@contextmanager
def _recording_evaluations(out: list[Any]) -> Iterator[None]:
    original = LoraDriver.evaluate

    def evaluate(self: LoraDriver) -> Any:
        result = original(self)
        bases = {
            p: self.model.get_submodule(p).get_base_layer().weight.detach().clone()
            for p in module_prefixes(self.adapter)
        }
        out.append(
            (
                {k: v.clone() for k, v in self.adapter.items()},
                {k: v.clone() for k, v in self.residual.items()},
                bases,
            )
        )
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LoraDriver, "evaluate", evaluate)
        yield


def module_prefixes(adapter: dict[str, torch.Tensor]) -> list[str]:
    """The adapted modules' prefixes, in the adapter's order."""
    suffix = ".lora_A.weight"
    return [k[: -len(suffix)] for k in adapter if k.endswith(suffix)]


def run(config: RunConfig, stop_at: int | None = None) -> Recorded:
    """Run ``config`` whole, or stop when round ``stop_at`` is sent and resume."""
    clients = config.federation.clients
    run_dir = prepare_run(config)
    evaluated: list[Any] = []
    with _recording_evaluations(evaluated):
        grid = RecordingGrid(clients, run_dir, stop_at)
        if stop_at is None:
            run_server(grid, config, run_dir, simulation=True)
            return Recorded(RunFolder(run_dir), grid.rounds, evaluated)
        with pytest.raises(KeyboardInterrupt):
            run_server(grid, config, run_dir, simulation=True)
        folder = RunFolder(run_dir)
        assert folder.checkpoint_round() == stop_at - 1
        again = RecordingGrid(clients, run_dir, None)
        run_server(again, config, run_dir, resume=True, simulation=True)
    return Recorded(folder, grid.rounds + again.rounds, evaluated)


def checkpoint(folder: RunFolder, extra: str | None = None) -> dict[str, torch.Tensor]:
    """The last checkpoint's adapter, or its extra tensor file ``extra``."""
    state = folder.checkpoint_record()
    return folder.read_checkpoint_tensors(state, file=extra)


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same names in the same order and bit-identical tensors."""
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
