"""Held-out groups: whole tasks no client trains on, the evaluation set drawn from them.

The split rule (:func:`corpora.split_for_run`), its refusals, the config's
checks, and a prepared run whose every client file is checked against the
held-out groups.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from corpora import DatasetError, Example, read_jsonl, split_for_run
from protocols.run_folder import RunFolder
from server.config import ConfigError, load_config
from simulation.prepare import prepare_run


def _examples() -> list[Example]:
    """Five groups of unequal sizes (a: 10, b: 20, c: 30, d: 40, e: 50)."""
    sizes = {"a": 10, "b": 20, "c": 30, "d": 40, "e": 50}
    return [
        Example(f"{group} prompt {i}", f"{group} answer {i}", group)
        for group, size in sizes.items()
        for i in range(size)
    ]


def test_named_groups_are_held_out_whole_and_evaluated_alone() -> None:
    """No training example is of a held-out group; every evaluation example is,
    stratified by group size (b: 20, d: 40 -> 5 and 10 of 15); both keep order."""
    examples = _examples()
    split = split_for_run(examples, heldout_groups=["d", "b"], n_eval=15, seed=3)
    assert split.heldout_groups == ("b", "d")
    assert {e.group for e in split.train} == {"a", "c", "e"}
    assert len(split.train) == 10 + 30 + 50
    assert Counter(e.group for e in split.evaluation) == {"b": 5, "d": 10}
    position = {e: i for i, e in enumerate(examples)}
    assert [position[e] for e in split.evaluation] == sorted(
        position[e] for e in split.evaluation
    )


def test_fewer_held_out_examples_than_asked_are_all_evaluated() -> None:
    """n_eval beyond the held-out groups' examples takes all of them."""
    split = split_for_run(_examples(), heldout_groups=["a"], n_eval=256, seed=0)
    assert [e.prompt for e in split.evaluation] == [f"a prompt {i}" for i in range(10)]


def test_a_group_count_is_a_seeded_draw() -> None:
    """The same seed gives the same groups and examples; the seeds 0..9 do not
    all draw the same groups; named groups equal to a draw give the same split."""
    examples = _examples()
    first = split_for_run(examples, heldout_group_count=2, n_eval=12, seed=5)
    assert split_for_run(examples, heldout_group_count=2, n_eval=12, seed=5) == first
    assert len(first.heldout_groups) == 2
    assert not {e.group for e in first.train} & set(first.heldout_groups)
    draws = {
        split_for_run(examples, heldout_group_count=2, n_eval=12, seed=s).heldout_groups
        for s in range(10)
    }
    assert len(draws) > 1
    named = split_for_run(
        examples, heldout_groups=first.heldout_groups, n_eval=12, seed=5
    )
    assert named == first


def test_default_size_is_a_quarter_up_to_256() -> None:
    """n_eval None: min(256, a quarter of the examples), without held-out groups."""
    examples = _examples()
    assert len(split_for_run(examples, seed=0).evaluation) == 150 // 4
    many = examples * 10
    assert len(split_for_run(many, seed=0).evaluation) == 256


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"heldout_groups": ["a"], "heldout_group_count": 1}, "exclusive"),
        (
            {"heldout_groups": ["a", "zz"]},
            r"\['zz'\] are not groups .* include a, b, c, d, e",
        ),
        ({"heldout_group_count": 5}, "leave at least one of the 5 groups"),
        ({"heldout_groups": ["a", "b", "c", "d", "e"]}, "leave at least one"),
    ],
)
def test_refused_held_out_groups(kwargs: dict, message: str) -> None:
    """Both settings, unknown names (a few known ones listed) and holding out
    every group are refused on one line."""
    with pytest.raises(DatasetError, match=message) as info:
        split_for_run(_examples(), n_eval=4, seed=0, **kwargs)
    assert "\n" not in str(info.value)


def test_config_refuses_both_settings_and_repeated_names() -> None:
    """The config refuses both held-out settings together and a name given twice."""
    with pytest.raises(ConfigError, match="exclude each other"):
        load_config(
            None, {"data.heldout_groups": ["add"], "data.heldout_group_count": 1}
        )
    with pytest.raises(ConfigError, match="names a group twice"):
        load_config(None, {"data.heldout_groups": ["add", "add"]})
    with pytest.raises(ConfigError, match="heldout_group_count"):
        load_config(None, {"data.heldout_group_count": -1})


def test_validate_names_unknown_groups_and_too_few_training_groups(
    tmp_path: Path,
) -> None:
    """``pollinate validate``'s checks: an unknown group, and task partitioning
    with more clients than the groups left to train on."""
    from cli.validate import check_resources

    base = {
        "model.name": "tiny-llama",
        "data.limit": 300,
        "run.output_dir": str(tmp_path),
    }
    unknown = load_config(None, {**base, "data.heldout_groups": ["nope"]})
    problems = check_resources(unknown)
    assert any(p.startswith("data.heldout_groups ['nope']") for p in problems)
    crowded = load_config(
        None,
        {
            **base,
            "data.heldout_group_count": 2,
            "data.partitioning": "task",
            "federation.clients": 5,
        },
    )
    problems = check_resources(crowded)
    assert any("exceeds the 4 groups" in p for p in problems), problems
    fits = crowded.model_copy(
        update={"federation": crowded.federation.model_copy(update={"clients": 4})}
    )
    assert check_resources(fits) == []


def test_prepared_task_partitioned_run_trains_no_client_on_a_held_out_group(
    tmp_path: Path,
) -> None:
    """Through prepare_run and task partitioning: no client file holds an example
    of a held-out group, every evaluation example is of one, and the run folder
    records the groups (config.toml, partitions.json) with the numbers resolved."""
    config = load_config(
        None,
        {
            "model.name": "tiny-llama",
            "data.heldout_group_count": 2,
            "data.partitioning": "task",
            "data.limit": 600,
            "federation.clients": 4,
            "run.seed": 7,
            "run.output_dir": str(tmp_path),
        },
    )
    folder = RunFolder(prepare_run(config, tmp_path / "run"))
    resolved = load_config(folder.config)
    held = set(resolved.data.heldout_groups)
    assert len(held) == 2 and resolved.data.heldout_group_count == 0
    evaluation = read_jsonl(folder.eval_data)
    assert evaluation and {e.group for e in evaluation} <= held
    assert resolved.data.eval_examples == len(evaluation) == min(256, 600 // 4)
    assert isinstance(resolved.model.max_length, int)
    trained: set[str] = set()
    for pid in range(config.federation.clients):
        groups = {e.group for e in read_jsonl(folder.client_data(pid))}
        assert groups and not groups & held, (pid, groups, held)
        trained |= groups
    assert len(trained) == 4  # every other group is some client's
    assert json.loads(folder.partitions.read_text())["heldout_groups"] == sorted(held)
    # the resolved config gives the same split again
    again = RunFolder(prepare_run(resolved, tmp_path / "again"))
    assert read_jsonl(again.eval_data) == evaluation
    assert again.config.read_text() == folder.config.read_text()
