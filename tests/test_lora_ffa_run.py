"""FFA-LoRA in a whole run: clients train B only, A stays the initial A.

Tiny-llama in process (:mod:`tests.lora_runs`), three clients, three rounds of
``lora.aggregation = "ffa"``. Without the client freezing A, round 2's replies
all change A (B is no longer zero, so A gets a gradient) and the server
refuses every one of them: the run fails. Here every round accepts every
client, each reply's A is bit-identical to the A it was sent, the global A
never moves, B does, and held-out loss falls.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.lora_runs import lora_config, run


@pytest.mark.parametrize(
    "privacy",
    [
        {},
        # Local DP: the client clips and noises B only; noise on A would make
        # the server refuse every reply.
        {
            "privacy.mode": "local",
            "privacy.noise_multiplier": 0.5,
            "privacy.clip_norm": 1.0,
        },
    ],
    ids=["plain", "local-dp"],
)
def test_ffa_run_trains_b_only_and_keeps_a_frozen(
    tmp_path: Path, privacy: dict[str, object]
) -> None:
    torch.set_num_threads(1)
    rec = run(lora_config(tmp_path, "ffa", 3, {"lora.aggregation": "ffa", **privacy}))
    assert len(rec.rounds) == 3
    for rnd in rec.rounds:
        assert len(rnd.res) == 3
        for node, res in rnd.res.items():
            sent = rnd.ins[node].adapter
            for name, t in res.adapter.items():
                if ".lora_A." in name:
                    assert torch.equal(t, sent[name]), (node, name)
    first, last = rec.evaluated[0][0], rec.evaluated[-1][0]
    a_names = [k for k in first if ".lora_A." in k]
    b_names = [k for k in first if ".lora_B." in k]
    assert a_names and all(torch.equal(first[k], last[k]) for k in a_names)
    assert any(not torch.equal(first[k], last[k]) for k in b_names)
    rows = [json.loads(line) for line in rec.folder.metrics.read_text().splitlines()]
    assert all(r.get("rejected", 0) == 0 for r in rows)
    if not privacy:  # noised B need not lower the loss in three rounds
        assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
