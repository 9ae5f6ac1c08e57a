"""Whole federations under ``privacy.secagg``: the real ServerApp loop and ClientApp.

Each test runs the same tiny-llama federation twice, in process, once with
SecAgg+ and once plainly with the same weights (equal) and no clipping
(SecAgg+ allows neither a per-client bound nor a robust rule), and checks
that the secure round gives the plain round's global state within SecAgg+'s
quantization, that the server's rows say how many nodes were summed, and
that the plain path's numbers are not what the secure path reports by
accident (the two runs differ by the quantization, not by nothing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from client.app import app as client_app
from protocols.run_folder import RunFolder
from server.app import run_server
from server.config import SECAGG_QUANTIZATION, load_config
from simulation.inprocess import InProcessGrid
from simulation.prepare import prepare_run

CLIENTS = 5


def _run(tmp_path: Path, name: str, overrides: dict[str, Any]) -> RunFolder:
    config = load_config(
        None,
        {
            "run.name": name,
            "run.rounds": 1,
            "run.output_dir": str(tmp_path),
            "model.name": "tiny-llama",
            "model.max_length": 32,
            "data.limit": 120,
            "data.eval_examples": 8,
            "federation.clients": CLIENTS,
            "federation.weighting": "equal",
            "federation.clip": "off",
            "federation.weight_multiple": 100.0,
            "train.local_steps": 1,
            "train.batch_size": 2,
            "eval.max_new_tokens": 2,
            **overrides,
        },
    )
    run_dir = prepare_run(config)
    grid = InProcessGrid(client_app, CLIENTS, run_dir=run_dir)
    run_server(grid, config, run_dir, simulation=True)
    return RunFolder(run_dir)


def _state(folder: RunFolder) -> dict[str, Any]:
    return json.loads((folder.path / "checkpoint" / "state.json").read_text())


@pytest.mark.parametrize("weighting", ["equal", "examples"])
def test_a_secure_lora_round_equals_the_plain_round(
    tmp_path: Path, weighting: str
) -> None:
    """The SecAgg+ adapter equals the plain FedAvg adapter within one
    quantization step of a value (2 c / 2^22), with equal weights and with
    the weights the server dictates from the hello counts (the plain round
    weighs the same counts, claimed by the replies), and the row records 5
    summed nodes and no rejection."""
    weights = {"federation.weighting": weighting}
    secure = _run(tmp_path, "secure", {**weights, "privacy.secagg": True})
    plain = _run(tmp_path, "plain", weights)
    rows = secure.read_metrics()
    assert rows[-1]["secagg_survivors"] == CLIENTS and rows[-1]["rejected"] == 0
    assert secure.read_status().state == "completed"
    a = secure.read_checkpoint_tensors(_state(secure))
    b = plain.read_checkpoint_tensors(_state(plain))
    step = 2 * 8.0 / SECAGG_QUANTIZATION  # privacy.secagg_clip default 8
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= step, worst
    assert any(not torch.equal(a[k], b[k]) for k in a), "quantization left no trace"


@pytest.mark.parametrize("method", ["fedkseed", "fedkseed-pro"])
def test_a_secure_fedkseed_round_equals_the_plain_round(
    tmp_path: Path, method: str
) -> None:
    """The SecAgg+ round delta's coefficients equal the plain ones (equal
    weights, no clip) within lr x the quantization step, on the same seeds."""
    zo = {
        "run.method": method,
        "zo.num_seeds": 64,
        "zo.max_abs_grad": 100.0,
        "privacy.secagg_clip": 128.0,
    }
    secure = _run(tmp_path, "secure", {**zo, "privacy.secagg": True})
    plain = _run(tmp_path, "plain", zo)
    assert secure.read_metrics()[-1]["secagg_survivors"] == CLIENTS
    (s,) = _state(secure)["strategy"]["history"]
    (p,) = _state(plain)["strategy"]["history"]
    assert s["indices"] == p["indices"]
    lr = load_config(None, zo).zo.learning_rate
    step = 2 * 128.0 / SECAGG_QUANTIZATION
    diffs = [
        abs(x - y) for x, y in zip(s["coefficients"], p["coefficients"], strict=True)
    ]
    assert max(diffs) <= lr * step * 1.01, max(diffs)


CENTRAL = {
    "privacy.mode": "central",
    "privacy.noise_seed": 7,
    "privacy.noise_multiplier": 0.5,
}


def test_a_secure_central_dp_lora_round_equals_server_side_clipping(
    tmp_path: Path,
) -> None:
    """Central DP under SecAgg+ (Flower's client-side clipping: every client
    clips to C, the server noises the unmasked sum) gives the plain
    server-side clipping run's noisy adapter, same noise seed, within the
    quantization step, and the same epsilon. C = 1e-3 binds on every update
    (the plain run clipped all 5); the noise (std sigma C / 5 = 1e-4) is far
    above the step, so a missing clip or missing noise could not pass."""
    dp = {**CENTRAL, "privacy.clip_norm": 1e-3}
    secure = _run(
        tmp_path,
        "secure",
        {**dp, "privacy.clipping": "client", "privacy.secagg": True},
    )
    plain = _run(tmp_path, "plain", dp)
    srow, prow = secure.read_metrics()[-1], plain.read_metrics()[-1]
    assert srow["secagg_survivors"] == CLIENTS and srow["rejected"] == 0
    assert prow["clipped"] == CLIENTS
    assert srow["epsilon"] == prow["epsilon"] > 0
    a = secure.read_checkpoint_tensors(_state(secure))
    b = plain.read_checkpoint_tensors(_state(plain))
    step = 2 * 8.0 / SECAGG_QUANTIZATION
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= step * 1.01, worst


def test_a_secure_central_dp_fedkseed_round_equals_server_side_clipping(
    tmp_path: Path,
) -> None:
    """FedKSeed: each client merges its steps per seed and clips that vector
    to C; the server adds the seeded noise to all K sums: the coefficients
    equal the plain server-side clipping run's (which clipped every client)
    within lr x the quantization step, on every seed, with the same epsilon."""
    zo = {"run.method": "fedkseed", "zo.num_seeds": 64}
    dp = {**CENTRAL, "privacy.clip_norm": 0.05}
    secure = _run(
        tmp_path,
        "secure",
        {**zo, **dp, "privacy.clipping": "client", "privacy.secagg": True},
    )
    plain = _run(tmp_path, "plain", {**zo, **dp})
    srow, prow = secure.read_metrics()[-1], plain.read_metrics()[-1]
    assert srow["secagg_survivors"] == CLIENTS
    assert prow["dp_clipped"] == CLIENTS
    assert srow["epsilon"] == prow["epsilon"] > 0
    (s,) = _state(secure)["strategy"]["history"]
    (p,) = _state(plain)["strategy"]["history"]
    assert s["indices"] == p["indices"] == list(range(64))  # noise on every seed
    lr = load_config(None, zo).zo.learning_rate
    step = 2 * 8.0 / SECAGG_QUANTIZATION
    diffs = [
        abs(x - y) for x, y in zip(s["coefficients"], p["coefficients"], strict=True)
    ]
    assert max(diffs) <= lr * step * 1.01 + 1e-9 * max(map(abs, p["coefficients"]))
