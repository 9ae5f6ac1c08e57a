"""The Natural Instructions prompt: each task's definition, then the input.

The reader takes the definitions from ``tasks.json`` beside the data file,
validates that outside file, refuses a task without a definition, and keeps
the bare input (warning once) when there is no ``tasks.json``.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections import defaultdict
from pathlib import Path

import pytest

from corpora import DatasetError, load_examples, ni_prompt
from corpora import readers as readers_module

DEFINITIONS = {
    "task_a": "Definition: answer the question.",
    "task_b": "Definition: write a question for the answer.",
}


def _write_ni(folder: Path, tasks: object | None = None) -> Path:
    """A tiny NI file whose two tasks share one input; ``tasks.json`` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    records = [
        {"task": "task_a", "input": "Shared passage.", "targets": ["yes"]},
        {"task": "task_b", "input": "Shared passage.", "targets": ["Is it?"]},
        {"task": "task_a", "input": "Other passage.", "targets": ["no", "nope"]},
    ]
    data = folder / "ni.jsonl.gz"
    data.write_bytes(
        gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    )
    if tasks is not None:
        text = tasks if isinstance(tasks, str) else json.dumps(tasks)
        (folder / "tasks.json").write_text(text)
    return data


def _tasks(definitions: dict[str, str]) -> dict[str, object]:
    return {
        "source": "test",
        "tasks": [{"task": t, "definition": d} for t, d in definitions.items()],
    }


def test_prompt_is_the_definition_then_the_input(tmp_path: Path) -> None:
    """Each prompt is its task's definition plus the input; the shared input
    gives two different prompts; the response is the first target."""
    examples = load_examples(str(_write_ni(tmp_path, _tasks(DEFINITIONS))))
    assert [e.prompt for e in examples] == [
        "Definition: answer the question.\n\nInput: Shared passage.",
        "Definition: write a question for the answer.\n\nInput: Shared passage.",
        "Definition: answer the question.\n\nInput: Other passage.",
    ]
    assert [e.response for e in examples] == ["yes", "Is it?", "no"]
    assert [e.group for e in examples] == ["task_a", "task_b", "task_a"]
    assert examples[0].prompt == ni_prompt(DEFINITIONS["task_a"], "Shared passage.")


def test_a_task_without_a_definition_is_refused(tmp_path: Path) -> None:
    """A record whose task tasks.json does not define: one line naming the record."""
    data = _write_ni(tmp_path, _tasks({"task_a": DEFINITIONS["task_a"]}))
    with pytest.raises(DatasetError, match=r"line 2: task 'task_b' has no definition"):
        load_examples(str(data))


@pytest.mark.parametrize(
    ("tasks", "fault"),
    [
        ("{not json", "invalid JSON"),
        ([{"task": "task_a", "definition": "x"}], "JSON object with a 'tasks' list"),
        ({"tasks": {"task_a": "x"}}, "JSON object with a 'tasks' list"),
        ({"tasks": [{"task": "task_a"}]}, "tasks entry 1 must be an object"),
        ({"tasks": [{"task": 3, "definition": "x"}]}, "tasks entry 1"),
        ({"tasks": ["task_a"]}, "tasks entry 1"),
    ],
)
def test_a_malformed_tasks_file_is_refused(
    tmp_path: Path, tasks: object, fault: str
) -> None:
    """tasks.json is outside input: each fault is one line naming the file."""
    data = _write_ni(tmp_path, tasks)
    with pytest.raises(DatasetError, match=fault) as info:
        load_examples(str(data))
    assert str(tmp_path / "tasks.json") in str(info.value)
    assert "\n" not in str(info.value)


def test_an_oversized_tasks_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tasks.json beyond the size bound is refused before it is parsed."""
    monkeypatch.setattr(readers_module, "MAX_TASKS_JSON_BYTES", 100)
    data = _write_ni(tmp_path, _tasks({"task_a": "x" * 200, "task_b": "y"}))
    with pytest.raises(DatasetError, match="more than the 100"):
        load_examples(str(data))


def test_without_tasks_file_the_bare_input_is_kept_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No tasks.json: prompts are the inputs, and the warning is given once."""
    data = _write_ni(tmp_path / "bare")
    with caplog.at_level(logging.WARNING, logger="corpora.readers"):
        first = load_examples(str(data))
        load_examples(str(data))
    assert [e.prompt for e in first] == [
        "Shared passage.",
        "Shared passage.",
        "Other passage.",
    ]
    warnings = [r for r in caplog.records if "no tasks.json" in r.getMessage()]
    assert len(warnings) == 1


def test_real_ni_prompts_are_unique_per_task_and_input(shared_data: Path) -> None:
    """On the real NI v1 file, every task has its definition, and the prompt is
    unique per (task, input), where the bare inputs repeat across tasks
    (0.4 s: in the default suite)."""
    source = shared_data / "natural-instructions-v1" / "ni-v1-61tasks-cap200.jsonl.gz"
    examples = load_examples(str(source))
    assert len(examples) == 12017 and len({e.group for e in examples}) == 61
    tasks = json.loads((source.parent / "tasks.json").read_text())["tasks"]
    definition = {t["task"]: t["definition"] for t in tasks}
    assert all(e.prompt.startswith(definition[e.group].strip()) for e in examples)
    inputs = [e.prompt.split("\n\nInput: ", 1)[1] for e in examples]
    tasks_of: dict[str, set[str]] = defaultdict(set)
    for example, text in zip(examples, inputs, strict=True):
        tasks_of[text].add(example.group)
    shared = sum(len(tasks_of[text]) > 1 for text in inputs)
    assert shared == 2592  # instances whose input another task has too
    pairs = {(e.group, text) for e, text in zip(examples, inputs, strict=True)}
    prompts = {e.prompt for e in examples}
    assert len(prompts) == len(pairs)  # one prompt per distinct (task, input)
