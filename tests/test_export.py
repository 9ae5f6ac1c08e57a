"""``pollinate export``: adapter, merged Hugging Face folder, ONNX (checked)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM

from cli.main import main
from models import attach_lora, load_causal_lm
from models.split import build_split, split_spec_for, trainable_state
from protocols.run_folder import RunFolder
from protocols.seeds import ParamWalk, perturb_
from server.checkpoints import save_peft_adapter
from server.config import config_to_toml, load_config
from server.export import ExportError, export_run, tuned_model
from server.methods import build_spec
from server.run_data import resolved_max_length

IDS = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])


def _run_dir(tmp_path: Path, method: str) -> Path:
    run_dir = tmp_path / f"run-{method}"
    run_dir.mkdir()
    config = load_config(None, {"run.method": method, "model.name": "tiny-llama"})
    (run_dir / "config.toml").write_text(config_to_toml(config))
    lm = load_causal_lm("tiny-llama")
    if method == "lora":
        model = attach_lora(lm.model, build_spec(config))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        save_peft_adapter(run_dir / "adapter", model)
    elif method == "fedkseed":
        walk = ParamWalk.from_model(lm.model, ["model.layers.1.*"])
        params = walk.params(lm.model)
        perturb_(params, seed=5, scale=0.05)
        RunFolder(run_dir).write_tensors(
            "model/perturbed.safetensors", dict(params), {}
        )
    else:
        spec = split_spec_for(
            lm.model,
            "tiny-llama",
            num_prompts=8,
            client_blocks=0,
            max_length=resolved_max_length(config),
        )
        head, _, tail = build_split(lm.model, spec)
        with torch.no_grad():
            head.prompts.add_(0.3)
        state = {k: v.detach() for k, v in trainable_state(head, tail).items()}
        RunFolder(run_dir).write_tensors(
            "model/prompts_and_tail.safetensors", state, {}
        )
    return run_dir


@pytest.mark.parametrize("method", ["lora", "fedkseed"])
def test_merged_folder_loads_without_pollinate_and_matches(
    tmp_path: Path, method: str
) -> None:
    """The merged folder loads with plain from_pretrained and gives the tuned
    model's logits; it differs from the base model (training is folded in)."""
    run_dir = _run_dir(tmp_path, method)
    out = export_run(run_dir, tmp_path / "merged", "merged")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    tuned, loaded, _ = tuned_model(run_dir)
    base = load_causal_lm("tiny-llama").model
    with torch.no_grad():
        got = plain(input_ids=IDS, attention_mask=MASK).logits
        want = tuned(input_ids=IDS, attention_mask=MASK).logits
        orig = base(input_ids=IDS, attention_mask=MASK).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, orig, atol=1e-4)
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()


@pytest.mark.parametrize("method", ["lora", "sfprompt"])
def test_onnx_export_gives_pytorch_logits_in_onnx_runtime(
    tmp_path: Path, method: str
) -> None:
    """ONNX Runtime on the exported model reproduces PyTorch's logits (dynamic
    batch and length, padded rows included) within 1e-3."""
    run_dir = _run_dir(tmp_path, method)
    assert (
        main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "o")])
        == 0
    )
    info = json.loads((tmp_path / "o" / "export.json").read_text())
    assert info["max_abs_logit_diff"] < 1e-3
    session = ort.InferenceSession(str(tmp_path / "o" / "model.onnx"))
    ids = torch.randint(0, 250, (4, 23), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[
        0
    ]
    tuned, _, _ = tuned_model(run_dir)
    with torch.no_grad():
        want = tuned(input_ids=ids, attention_mask=mask).logits.numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-3


def test_adapter_export_copies_what_was_trained(tmp_path: Path) -> None:
    """``--format adapter`` copies the PEFT folder and the run's config."""
    run_dir = _run_dir(tmp_path, "lora")
    out = export_run(run_dir, tmp_path / "a", "adapter")
    assert (out / "adapter_model.safetensors").read_bytes() == (
        run_dir / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    assert (out / "config.toml").exists()


def test_export_errors_name_the_problem(tmp_path: Path) -> None:
    """Incomplete runs, existing targets and unsupported combinations are refused."""
    run_dir = _run_dir(tmp_path, "sfprompt")
    with pytest.raises(ExportError, match="onnx"):
        export_run(run_dir, tmp_path / "m", "merged")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ExportError, match="exists"):
        export_run(run_dir, tmp_path / "taken", "adapter")
    (run_dir / "model" / "prompts_and_tail.safetensors").unlink()
    with pytest.raises(ExportError, match="pollinate resume"):
        export_run(run_dir, tmp_path / "x", "adapter")
