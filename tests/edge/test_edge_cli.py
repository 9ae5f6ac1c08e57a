"""``pollinate export --format edge``: from a FedKSeed run folder or its config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli.main import main
from corpora import write_jsonl
from models import load_causal_lm
from protocols.edge_bundle import read_bundle
from protocols.param_walk import ParamWalk
from protocols.run_folder import RunFolder
from protocols.seeds import perturb_
from server.config import config_to_toml, load_config
from server.methods import build_spec
from tests.edge.conftest import text_examples

SETTINGS = {
    "run.method": "fedkseed",
    "model.name": "tiny-llama",
    "zo.include": ["model.layers.1.*"],
    "data.limit": 40,
    "data.eval_examples": 8,
}


def _finished_run(tmp_path: Path) -> Path:
    """A finished tiny FedKSeed run folder: config, held-out data, tuned tensors."""
    run_dir = tmp_path / "run-fedkseed"
    run_dir.mkdir()
    config = load_config(None, SETTINGS)
    folder = RunFolder(run_dir)
    folder.config.write_text(config_to_toml(config))
    folder.eval_data.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(text_examples(6), folder.eval_data)
    lm = load_causal_lm("tiny-llama")
    params = ParamWalk.from_model(lm.model, ["model.layers.1.*"]).params(lm.model)
    perturb_(params, seed=5, scale=0.05)
    folder.write_tensors("model/perturbed.safetensors", dict(params), {})
    return run_dir


def test_export_edge_from_a_run_folder_writes_w0_of_its_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bundle carries the run's spec and w0 (the base weights, not the
    tuned ones: an edge client replays the history from w0)."""
    run_dir = _finished_run(tmp_path)
    out = tmp_path / "bundle"
    code = main(["export", str(run_dir), "--format", "edge", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    bundle = read_bundle(out)
    config = load_config(RunFolder(run_dir).config)
    assert bundle.spec == build_spec(config)
    assert bundle.walk.names[0] == "model.layers.1.self_attn.q_proj.weight"
    base = dict(load_causal_lm("tiny-llama").model.named_parameters())
    for name, value in bundle.load_w0():
        assert torch.equal(torch.from_numpy(value), base[name].detach())


def test_export_edge_from_a_config_file_before_the_run(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(config_to_toml(load_config(None, SETTINGS)))
    out = tmp_path / "bundle"
    assert main(["export", str(path), "--format", "edge", "--out", str(out)]) == 0
    assert read_bundle(out).spec == build_spec(load_config(path))


def test_export_edge_refuses_a_lora_run_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        config_to_toml(load_config(None, {**SETTINGS, "run.method": "lora"}))
    )
    out = tmp_path / "bundle"
    code = main(["export", str(path), "--format", "edge", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "method lora" in err and "'edge'" in err and "\n" not in err
    assert not out.exists()
