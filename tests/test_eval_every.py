"""``eval.every`` in the round loop and the evaluation fields of a metrics row.

A fake driver and grid (no Flower run), as in tests/test_round_loop.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from protocols.run_folder import RunFolder
from server.config import ConfigError, load_config
from server.evaluation import EvalResult
from server.federation import FederationError, RoundResult
from simulation import read_metrics
from strategies import NodeBook
from tests.conftest import UnlimitedBudget, run_fake_rounds

NODES = NodeBook({1: "n1", 2: "n2"})
EVAL_KEYS = (
    "eval_loss",
    "eval_metric",
    "eval_metric_name",
    "eval_metric_low",
    "eval_metric_high",
    "eval_examples",
    "eval_s",
)


class _Driver:
    """Counts evaluations; its metric is 0.1 x the number of evaluations so far;
    fails round ``fail_at`` (a crash after the previous round was recorded)."""

    method = "fake"
    strategy = UnlimitedBudget()

    def __init__(self, fail_at: int | None = None) -> None:
        self.evaluations = 0
        self.fail_at = fail_at
        self.saved: dict[int, dict] = {}

    def configure(self, server_round: int, nodes: object) -> list:
        return []

    def apply(self, server_round: int, replies: object) -> RoundResult:
        if server_round == self.fail_at:
            raise FederationError(f"round {server_round}: no usable update")
        return RoundResult(2, 0, 1.0)

    def evaluate(self) -> EvalResult:
        self.evaluations += 1
        metric = 0.1 * self.evaluations
        return EvalResult(2.0, metric, "rouge_l", 40, metric - 0.05, metric + 0.05, 0.5)

    def checkpoint(self, folder: RunFolder, server_round: int, extra: dict) -> None:
        self.saved[server_round] = extra

    def finish(self, folder: RunFolder) -> None: ...

    def close(self) -> None: ...

    def restore(self, folder: RunFolder) -> int:
        return 0


def test_every_n_rounds_plus_round_zero_and_the_last(tmp_path: Path) -> None:
    """every = 2 over 5 rounds evaluates rounds 0, 2, 4 and 5 (the last) and
    no other; the other rows keep their training fields with every eval_*
    field null. Breaks if the schedule or the null fields are wrong."""
    driver = _Driver()
    assert run_fake_rounds(driver, tmp_path, rounds=5, eval_every=2) == 5
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert driver.evaluations == 4
    evaluated = [r["round"] for r in rows if r["eval_metric"] is not None]
    assert evaluated == [0, 2, 4, 5]
    for row in rows:
        if row["round"] in (1, 3):
            assert all(row[key] is None for key in EVAL_KEYS), row
            assert row["clients"] == 2 and row["train_loss"] == 1.0
        else:
            assert row["eval_metric_name"] == "rouge_l" and row["eval_examples"] == 40
            assert row["eval_metric_low"] == pytest.approx(row["eval_metric"] - 0.05)
            assert row["eval_metric_high"] == pytest.approx(row["eval_metric"] + 0.05)
            assert (
                isinstance(row["eval_s"], float)
                and 0 <= row["eval_s"] <= row["seconds"]
            )
    assert [r["eval_metric"] for r in rows if r["round"] in (0, 2, 4, 5)] == (
        pytest.approx([0.1, 0.2, 0.3, 0.4])
    )


def test_every_one_evaluates_every_round(tmp_path: Path) -> None:
    """The default evaluates each round, as before eval.every existed."""
    driver = _Driver()
    run_fake_rounds(driver, tmp_path, rounds=3)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert driver.evaluations == 4
    assert all(r["eval_metric"] is not None for r in rows)


def test_resume_keeps_the_schedule_and_the_checkpointed_rows(tmp_path: Path) -> None:
    """A run that fails in round 4 and resumes from its round-3 checkpoint
    records rounds 0..6 once each, evaluated at 0, 3, 6 (every = 3, 6 last);
    the checkpoint holds each row as recorded, null eval fields included."""
    first = _Driver(fail_at=4)
    with pytest.raises(FederationError):
        run_fake_rounds(first, tmp_path, rounds=6, eval_every=3)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for row in rows[1:]:
        assert first.saved[row["round"]]["metrics"] == row
    assert first.saved[2]["metrics"]["eval_metric"] is None
    second = _Driver()
    second.saved = dict(first.saved)
    start = max(second.saved)
    run_fake_rounds(second, tmp_path, rounds=6, eval_every=3, start_round=start)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert [r["round"] for r in rows if r["eval_metric"] is not None] == [0, 3, 6]
    assert second.evaluations == 1  # round 6 only


def test_eval_every_is_checked(tmp_path: Path) -> None:
    """``eval.every`` defaults to 1 and refuses 0 by its name; run_rounds
    refuses a value below 1 rather than dividing by zero."""
    assert load_config().eval.every == 1
    assert load_config(None, {"eval.every": 5}).eval.every == 5
    with pytest.raises(ConfigError, match="every"):
        load_config(None, {"eval.every": 0})
    assert (
        "rouge_l_fedkseed"
        in load_config(None, {"eval.metric": "rouge_l_fedkseed"}).eval.metric
    )
    with pytest.raises(ValueError, match="eval_every"):
        run_fake_rounds(_Driver(), tmp_path, rounds=1, eval_every=0)
