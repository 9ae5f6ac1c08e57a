"""The method-agnostic round loop, with a fake driver and grid (no Flower run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protocols.run_folder import RunFolder
from server.evaluation import EvalResult
from server.federation import FederationError, RoundResult
from simulation import read_metrics
from strategies import NodeBook
from tests.conftest import UnlimitedBudget, run_fake_rounds

NODES = NodeBook({1: "n1", 2: "n2"})


class _Driver:
    method = "fake"
    strategy = UnlimitedBudget()

    def __init__(self, replies_per_round: list[int]) -> None:
        self.replies = replies_per_round
        self.checkpoints: list[int] = []
        self.finished = False

    def configure(self, server_round: int, nodes: object) -> list:
        return []

    def apply(self, server_round: int, replies: object) -> RoundResult:
        return RoundResult(self.replies[server_round - 1], 0, 1.0)

    def evaluate(self) -> EvalResult:
        return EvalResult(1.0, 0.5, "exact_match", 4)

    def checkpoint(self, folder: RunFolder, server_round: int, extra: dict) -> None:
        self.checkpoints.append(server_round)

    def finish(self, folder: RunFolder) -> None:
        self.finished = True

    def close(self) -> None: ...

    def restore(self, folder: RunFolder) -> int:
        return 0


def test_too_few_replies_fail_the_run_with_the_setting_named(tmp_path: Path) -> None:
    """A round with fewer usable replies than federation.min_replies stops the
    run with a message naming the setting; earlier rounds stay recorded and
    the failing round writes no checkpoint."""
    driver = _Driver([2, 1, 2])
    with pytest.raises(FederationError, match="min_replies"):
        run_fake_rounds(driver, tmp_path, rounds=3, min_replies=2)
    assert driver.checkpoints == [1] and not driver.finished
    assert [r["round"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1]


def test_enough_replies_complete_every_round(tmp_path: Path) -> None:
    """With min_replies met, every round is checkpointed and recorded once."""
    driver = _Driver([2, 1, 2])
    run_fake_rounds(driver, tmp_path, rounds=3, min_replies=1)
    assert driver.checkpoints == [1, 2, 3] and driver.finished
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["clients"] for r in rows] == [0, 2, 1, 2]


class _DivergedDriver(_Driver):
    """A driver whose numbers JSON cannot hold (a model that diverged)."""

    def __init__(self) -> None:
        super().__init__([2, 2])
        self.extras: list[dict] = []

    def apply(self, server_round: int, replies: object) -> RoundResult:
        extra = {"local_loss": float("nan"), "per_node": [1.0, float("-inf")]}
        return RoundResult(2, 0, float("inf"), extra=extra)

    def evaluate(self) -> EvalResult:
        return EvalResult(float("nan"), 0.5, "exact_match", 4)

    def checkpoint(self, folder: RunFolder, server_round: int, extra: dict) -> None:
        json.dumps(extra, allow_nan=False)  # what RunFolder's writer refuses
        self.extras.append(extra)
        super().checkpoint(folder, server_round, extra)


def test_a_row_json_cannot_hold_is_recorded_with_nulls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Breaks if an inf/NaN in a round's numbers kills the run or loses its
    metrics row (strict JSON has neither): each becomes null, logged, in the
    row and in the checkpoint's copy of it, and every round completes."""
    driver = _DivergedDriver()
    run_fake_rounds(driver, tmp_path, rounds=2)
    assert driver.checkpoints == [1, 2] and driver.finished
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert row["eval_loss"] is None and row["eval_metric"] == 0.5
    for row in rows[1:]:
        assert row["train_loss"] is None and row["local_loss"] is None
        assert row["per_node"] == [1.0, None] and row["clients"] == 2
    assert driver.extras[0]["metrics"] == rows[1]
    assert "row.train_loss=inf" in caplog.text and "row.eval_loss=nan" in caplog.text


class _BudgetDriver(_Driver):
    """Has privacy budget for two rounds: configuring round 3 is refused."""

    def __init__(self, replies_per_round: list[int]) -> None:
        super().__init__(replies_per_round)
        self.strategy = self  # type: ignore[assignment]
        self.evaluated: list[int] = []
        self.applied = 0

    def budget_allows(self, sampled: int) -> bool:
        return self.applied < 2

    def configure(self, server_round: int, nodes: object) -> list:
        from strategies.privacy import PrivacyBudgetExhausted

        if not self.budget_allows(len(NODES.labels)):
            raise PrivacyBudgetExhausted("one more round would pass epsilon 1")
        return []

    def apply(self, server_round: int, replies: object) -> RoundResult:
        self.applied += 1
        return super().apply(server_round, replies)


def test_a_spent_privacy_budget_ends_the_run_early_with_its_artefacts(
    tmp_path: Path,
) -> None:
    """The round loop stops before the round that would pass the budget,
    writes the final artefacts and says how many rounds were done."""
    driver = _BudgetDriver([2, 2, 2, 2])
    done = run_fake_rounds(driver, tmp_path, rounds=4)
    assert done == 2
    assert driver.checkpoints == [1, 2] and driver.finished
    assert [r["round"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2]


def test_the_last_round_before_a_spent_budget_is_evaluated(tmp_path: Path) -> None:
    """With ``eval.every`` = 10 over 10 rounds, a run the privacy budget stops
    after round 2 still evaluates round 2: its final model is reported.

    Breaks if the early stop left the final model unevaluated (only round 0
    would carry an eval_loss).
    """
    run_fake_rounds(_BudgetDriver([2] * 10), tmp_path, rounds=10, eval_every=10)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["eval_loss"] is not None for r in rows] == [True, False, True]
