"""End-to-end simulation runs on Flower's simulation runtime with a tiny model.

These start real processes (a SuperLink in simulation mode, Flower's
simulation process and Ray) through the same code path as
``pollinate simulate``; each run takes about half a minute.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from cli.main import main as cli_main
from models import load_causal_lm
from server.config import load_config
from simulation import launch, prepare_run, read_metrics
from tests.conftest import free_port, small_run_args

pytestmark = pytest.mark.integration

REQUIRED = {
    "round",
    "clients",
    "train_loss",
    "eval_loss",
    "eval_metric",
    "eval_metric_name",
    "bytes_up",
    "bytes_down",
    "seconds",
}
TINY = [
    "--model",
    "tiny-llama",
    "--rounds",
    "2",
    "--clients",
    "3",
    "--local-steps",
    "3",
    "--batch-size",
    "4",
    "--limit",
    "240",
    "--set",
    "data.eval_examples=16",
    "--set",
    "eval.max_new_tokens=4",
]


def _run_cli(out: Path, *extra: str) -> Path:
    code = cli_main(["simulate", *TINY, "--output-dir", str(out), *extra])
    assert code == 0, f"pollinate simulate exited {code}"
    (run_dir,) = out.iterdir()
    return run_dir


def test_three_clients_two_rounds_write_a_complete_run_folder(tmp_path: Path) -> None:
    """The CLI runs 2 rounds with 3 clients and leaves every promised artefact.

    Breaks if a round is lost, a field is missing from metrics.jsonl, bytes
    are not counted, or the final adapter/plot is not written.
    """
    run_dir = _run_cli(tmp_path)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert REQUIRED <= set(row), REQUIRED - set(row)
    for row in rows[1:]:
        assert row["clients"] == 3
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
        assert row["train_loss"] is not None
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    assert (run_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_config(run_dir / "config.toml").federation.clients == 3
    # No deprecation or future warning from the engine (Flower, Ray) in its log.
    log = (run_dir / "simulation.log").read_text()
    assert "DeprecationWarning" not in log and "FutureWarning" not in log
    # The final adapter is a PEFT folder that loads onto the base model.
    base = load_causal_lm("tiny-llama").model
    tuned = PeftModel.from_pretrained(base, run_dir / "adapter")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        with tuned.disable_adapter():
            plain = tuned(input_ids=ids).logits
        adapted = tuned(input_ids=ids).logits
    assert not torch.equal(plain, adapted), "trained adapter changed nothing"
    ckpt = load_file(run_dir / "checkpoint" / "adapter.safetensors")
    assert ckpt and all(torch.isfinite(t).all() for t in ckpt.values())


def test_seeded_runs_are_identical(tmp_path: Path) -> None:
    """Two runs of one config give identical metrics and a bit-identical adapter.

    Breaks on any unseeded draw (sampling, batch order, init) or a
    reply-order-dependent sum.
    """
    first = _run_cli(tmp_path / "a", "--fraction", "0.5")
    second = _run_cli(tmp_path / "b", "--fraction", "0.5")

    def strip(rows: list[dict[str, object]]) -> list[dict[str, object]]:
        return [
            {k: v for k, v in r.items() if k not in ("seconds", "eval_s")} for r in rows
        ]

    a = strip(read_metrics(first / "metrics.jsonl"))
    b = strip(read_metrics(second / "metrics.jsonl"))
    assert a == b
    assert a[1]["clients"] == 2  # ceil(0.5 * 3) clients sampled
    wa = load_file(first / "checkpoint" / "adapter.safetensors")
    wb = load_file(second / "checkpoint" / "adapter.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _tiny_config(tmp_path: Path):  # noqa: ANN202 - RunConfig
    from cli.main import build_parser
    from cli.overrides import collect_overrides

    args = build_parser().parse_args(["simulate", *TINY, "--output-dir", str(tmp_path)])
    return load_config(None, collect_overrides(args))


def test_a_client_without_usable_data_is_left_out(tmp_path: Path) -> None:
    """A node whose data file is corrupt is excluded; the run goes on with the rest.

    Breaks if one bad node stops the federation or is counted as a client.
    """
    config = _tiny_config(tmp_path)
    run_dir = prepare_run(config)
    (run_dir / "data" / "client-0001.jsonl").write_text("{not json\n")
    result = launch(run_dir, rounds=config.run.rounds)
    assert result.ok, (result.state, result.error)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["clients"] for r in rows[1:]] == [2, 2]


def test_a_failed_run_is_reported_as_a_failure(tmp_path: Path) -> None:
    """When no client can train, the launcher reports failure with the reason.

    Breaks if a crashed ServerApp is reported as success (Flower's own CLI
    exits 0 in that case) or the error is lost.
    """
    config = _tiny_config(tmp_path)
    run_dir = prepare_run(config)
    for path in (run_dir / "data").glob("client-*.jsonl"):
        path.write_text("{not json\n")
    result = launch(run_dir, rounds=config.run.rounds)
    assert not result.ok
    assert result.returncode != 0
    assert result.state == "failed"
    assert "no node answered" in (result.error or "")


@pytest.mark.timeout(300)
def test_a_stale_ray_cluster_file_does_not_stall_a_local_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ray head killed without ``ray stop`` leaves ``ray_current_cluster``
    naming a dead address. A local run must start its own Ray instead of
    connecting there (it used to wait forever in ``ray.init``).

    Breaks if the simulation lets Ray pick up the last cluster it knew of.
    """
    # Ray's temp folder must be short: it holds Unix sockets (108-byte paths).
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        run_dir = _run_cli(tmp_path, "--rounds", "1", "--clients", "2")
        rows = read_metrics(run_dir / "metrics.jsonl")
        assert [r["clients"] for r in rows[1:]] == [2]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_fedkseed_pro_run_lowers_the_loss_with_kilobytes_per_round(
    tmp_path: Path,
) -> None:
    """FedKSeed-Pro through the CLI: loss falls, and each client costs a few KB.

    Breaks if seed replay diverges between clients and server (replies would be
    rejected as out of sync), or if weights travel instead of scalars.
    """
    run_dir = _run_cli(
        tmp_path,
        "--set",
        'run.method="fedkseed-pro"',
        "--set",
        "zo.num_seeds=64",
        "--set",
        "zo.learning_rate=1e-3",
        "--set",
        "zo.eps=1e-3",
        "--local-steps",
        "20",
    )
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    for row in rows[1:]:
        assert row["method"] == "fedkseed-pro"
        assert row["clients"] == 3 and row["rejected"] == 0
        assert row["bytes_up"] / row["clients"] < 2_000
        assert row["bytes_down"] / row["clients"] < 4_000
    assert (run_dir / "model" / "perturbed.safetensors").exists()


def test_sfprompt_run_trains_over_the_trunk_service(tmp_path: Path) -> None:
    """SFPrompt through the CLI: two clients, two rounds over real gRPC on
    127.0.0.1; the loss falls and activation traffic is in the byte ledger.

    Breaks if the trunk service is not started/stopped with the run, sessions
    interfere, or split traffic is not counted.
    """
    args = ["--method", "sfprompt", "--batch-size", "4", "--lr", "3e-3"]
    code = cli_main(
        small_run_args(
            tmp_path,
            *args,
            rounds=2,
            local_steps=5,
            limit=200,
            eval_examples=16,
            max_new_tokens=4,
        )
    )
    assert code == 0
    (run_dir,) = tmp_path.iterdir()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    for row in rows[1:]:
        assert (
            row["method"] == "sfprompt" and row["clients"] == 2 and row["rejected"] == 0
        )
        assert 0 < row["kept_examples"]
    # prompts + norm + untied head both ways, plus activations both ways
    assert rows[1]["bytes_up"] > rows[1]["bytes_down"] > 0
    assert (run_dir / "model" / "prompts_and_tail.safetensors").exists()


@pytest.mark.long
def test_sfprompt_trunk_runs_over_tls_with_a_dev_pki(tmp_path: Path) -> None:
    """With ``[split] tls_*`` set, the trunk serves TLS only and devices reach
    it with the CA sent over the Flower connection.

    Breaks if the certificate is not used by the server or not trusted by
    the devices (the run would fail with UNAVAILABLE).
    """
    assert cli_main(["certs", str(tmp_path / "pki")]) == 0
    pki = tmp_path / "pki"
    tls = [
        f'split.tls_certfile="{pki / "server.crt"}"',
        f'split.tls_keyfile="{pki / "server.key"}"',
        f'split.tls_ca_certfile="{pki / "ca.crt"}"',
    ]
    settings = [arg for setting in tls for arg in ("--set", setting)]
    code = cli_main(
        small_run_args(
            tmp_path / "runs", "--method", "sfprompt", "--batch-size", "4", *settings
        )
    )
    assert code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[1]["clients"] == 2 and rows[1]["rejected"] == 0
    assert "TLS" in (run_dir / "simulation.log").read_text()
