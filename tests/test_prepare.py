"""Run-folder preparation from real local data, and models from local folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cli.main import main
from corpora import read_jsonl
from models import load_causal_lm


def test_prepare_only_splits_a_real_csv_dataset_one_label_group_per_client(
    tmp_path: Path, shared_data: Path
) -> None:
    """``--prepare-only`` on banking77 (CSV, gz) writes a held-out set and one
    file per client; with ``--partition task`` no label is shared by clients.

    Breaks if local CSV data cannot go through the same options as the default.
    """
    code = main(
        [
            "simulate",
            "--prepare-only",
            "--dataset",
            str(shared_data / "banking77" / "train.csv.gz"),
            "--partition",
            "task",
            "--clients",
            "4",
            "--limit",
            "800",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    (run_dir,) = tmp_path.iterdir()
    parts = [read_jsonl(run_dir / "data" / f"client-{i:04d}.jsonl") for i in range(4)]
    held_out = read_jsonl(run_dir / "data" / "eval.jsonl")
    assert (
        all(parts) and len(held_out) == 800 // 4
    )  # eval_examples: a quarter, at most 256
    groups = [{e.group for e in p} for p in parts]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not groups[i] & groups[j]
    summary = json.loads((run_dir / "partitions.json").read_text())
    assert summary["sizes"] == [len(p) for p in parts]
    assert sum(summary["sizes"]) + len(held_out) == 800


def test_a_local_model_folder_loads_like_a_builtin(tmp_path: Path) -> None:
    """A model saved with save_pretrained loads by path with identical logits.

    Breaks if local folders are not accepted where model names are.
    """
    tiny = load_causal_lm("tiny-llama")
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    again = load_causal_lm(str(tmp_path / "m"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(
            tiny.model(input_ids=ids).logits, again.model(input_ids=ids).logits
        )
    assert again.tokenizer("hi")["input_ids"] == tiny.tokenizer("hi")["input_ids"]
