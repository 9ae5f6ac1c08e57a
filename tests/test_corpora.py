"""Tests for the corpora package: dataset readers, canonical JSONL, built-in tasks."""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from corpora import (
    BUILTIN_TASKS,
    DatasetError,
    Example,
    generate_tasks,
    load_examples,
    read_jsonl,
    split_holdout,
    write_jsonl,
)


def shared_data() -> Path:
    """Return the shared data folder that sits beside the repository checkout."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


DOLLY = "dolly-15k/databricks-dolly-15k.jsonl.gz"
NI_V1 = "natural-instructions-v1/ni-v1-61tasks-cap200.jsonl.gz"
BANKING = "banking77/train.csv.gz"


def _write_lines(path: Path, records: list[object], compress: bool = False) -> Path:
    """Write records as JSON lines, gzip-compressed when asked."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    if compress:
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_dolly_counts_and_mapping() -> None:
    """Dolly must give all 15,011 records with the README's category counts; a
    wrong schema order (e.g. alpaca/generic first) or lost context would break it."""
    examples = load_examples(str(shared_data() / DOLLY))
    assert len(examples) == 15011
    expected = {
        "open_qa": 3742,
        "general_qa": 2191,
        "classification": 2136,
        "closed_qa": 1773,
        "brainstorming": 1766,
        "information_extraction": 1506,
        "summarization": 1188,
        "creative_writing": 709,
    }
    assert Counter(e.group for e in examples) == expected
    with gzip.open(shared_data() / DOLLY, "rt", encoding="utf-8") as handle:
        raw = [json.loads(line) for line in handle]
    with_context = next(i for i, r in enumerate(raw) if r["context"].strip())
    assert examples[with_context].prompt == (
        raw[with_context]["instruction"]
        + "\n\nContext: "
        + raw[with_context]["context"]
    )
    assert examples[with_context].response == raw[with_context]["response"]
    without = next(i for i, r in enumerate(raw) if not r["context"])
    assert examples[without].prompt == raw[without]["instruction"]


def test_natural_instructions_counts_and_first_target() -> None:
    """NI v1 must give 12,017 instances over 61 tasks, prompt = the task's
    definition (tasks.json) plus the input, and the first target as response;
    mapping the wrong field or dropping records breaks it."""
    examples = load_examples(str(shared_data() / NI_V1))
    assert len(examples) == 12017
    counts = Counter(e.group for e in examples)
    assert len(counts) == 61
    assert counts["subtask053_multirc_correct_bad_question"] == 58
    with gzip.open(shared_data() / NI_V1, "rt", encoding="utf-8") as handle:
        raw = [json.loads(line) for line in handle]
    tasks_file = (shared_data() / NI_V1).parent / "tasks.json"
    tasks = json.loads(tasks_file.read_text(encoding="utf-8"))["tasks"]
    definition = {t["task"]: t["definition"] for t in tasks}
    for index in (0, 5000, 12016):
        record = raw[index]
        prompt = f"{definition[record['task']].strip()}\n\nInput: {record['input']}"
        assert examples[index] == Example(prompt, record["targets"][0], record["task"])


def test_banking77_csv_matches_direct_read() -> None:
    """banking77 train.csv.gz must load every row with text as prompt and the
    intent as response and group; a CSV/gzip bug would change count or labels."""
    with gzip.open(
        shared_data() / BANKING, "rt", encoding="utf-8", newline=""
    ) as handle:
        rows = list(csv.DictReader(handle))
    examples = load_examples(str(shared_data() / BANKING))
    assert len(examples) == len(rows) == 10003
    assert len({e.group for e in examples}) == 77
    assert all(e.response == e.group for e in examples)
    assert [(e.prompt, e.group) for e in examples] == [
        (r["text"], r["category"]) for r in rows
    ]


def test_limit_is_seeded_subset() -> None:
    """limit must return a deterministic seeded subset in file order; using the
    global RNG or ignoring the seed would make the equality checks fail."""
    path = str(shared_data() / BANKING)
    full = load_examples(path)
    first = load_examples(path, limit=50, seed=3)
    assert len(first) == 50
    assert first == load_examples(path, limit=50, seed=3)
    assert first != load_examples(path, limit=50, seed=4)
    positions = [full.index(e) for e in first]
    assert positions == sorted(positions)
    assert load_examples(path, limit=10**6) == full
    with pytest.raises(DatasetError, match="limit"):
        load_examples(path, limit=0)


def test_jsonl_round_trip_plain_and_gzip(tmp_path: Path) -> None:
    """write_jsonl then read_jsonl must give back equal examples (unicode,
    newlines, .gz) and leave no temp files; broken escaping or atomicity fails."""
    examples = [
        Example('Say "hi"\nplease', "hi ✓", "greet"),
        Example("naïve café", "", "other"),
    ]
    for name in ("data.jsonl", "data.jsonl.gz"):
        path = tmp_path / "out" / name
        write_jsonl(examples, path)
        write_jsonl(examples[:1] + examples, path)
        assert read_jsonl(path) == examples[:1] + examples
        assert load_examples(str(path)) == examples[:1] + examples
    assert gzip.decompress((tmp_path / "out" / "data.jsonl.gz").read_bytes())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "data.jsonl",
        "data.jsonl.gz",
    ]


def test_read_jsonl_names_bad_line(tmp_path: Path) -> None:
    """A canonical file with a record lacking 'group' must fail naming the
    file, the line and the field; silently skipping it would pass bad data."""
    path = _write_lines(
        tmp_path / "c.jsonl",
        [
            {"prompt": "a", "response": "b", "group": "g"},
            {"prompt": "a", "response": "b"},
        ],
    )
    with pytest.raises(DatasetError, match=r"c\.jsonl line 2: missing field 'group'"):
        read_jsonl(path)


def test_schemas_and_gzip_formats(tmp_path: Path) -> None:
    """Each documented schema (alpaca, generic, classification, dict-wrapped JSON,
    [text,label] pairs) in .json.gz/.csv.gz/.jsonl must map as documented."""
    alpaca = _write_lines(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Do", "input": "this", "output": "done"},
            {"instruction": "Go", "output": "gone", "category": "move"},
        ],
    )
    assert load_examples(str(alpaca)) == [
        Example("Do\n\nContext: this", "done", "default"),
        Example("Go", "gone", "move"),
    ]
    generic = tmp_path / "g.json.gz"
    payload = {"data": [{"prompt": "p", "completion": "c", "label": 3}]}
    generic.write_bytes(gzip.compress(json.dumps(payload).encode()))
    assert load_examples(str(generic)) == [Example("p", "c", "3")]
    classes = tmp_path / "k.csv.gz"
    classes.write_bytes(
        gzip.compress(b'text,intent\n"hello, there",greet\nbye,leave\n')
    )
    assert load_examples(str(classes)) == [
        Example("hello, there", "greet", "greet"),
        Example("bye", "leave", "leave"),
    ]
    pairs = tmp_path / "p.json"
    pairs.write_text(json.dumps({"train": [["hi", "greet"]], "val": [["x", "y"]]}))
    assert load_examples(str(pairs)) == [Example("hi", "greet", "greet")]


def test_missing_file_error_names_path(tmp_path: Path) -> None:
    """A missing dataset must raise DatasetError naming the path, not a bare OSError."""
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DatasetError, match=re.escape(str(missing))):
        load_examples(str(missing))


def test_unknown_schema_error_lists_fields_and_schemas(tmp_path: Path) -> None:
    """An unrecognised record must fail listing the fields found and the supported
    schemas, so the user can see what to rename."""
    path = _write_lines(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DatasetError) as info:
        load_examples(str(path))
    message = str(info.value)
    assert "['answer', 'question']" in message
    for schema in (
        "dolly",
        "natural_instructions",
        "alpaca",
        "generic",
        "classification",
    ):
        assert schema in message


def test_record_errors_name_line_and_problem(tmp_path: Path) -> None:
    """Missing fields, empty files, bad JSON and bad suffixes must each raise a
    DatasetError naming what was wrong (line number, 'empty', allowed types)."""
    dolly = {"instruction": "i", "context": "", "response": "r", "category": "c"}
    truncated = {"instruction": "i", "context": ""}
    broken = _write_lines(tmp_path / "d.jsonl", [dolly, dolly, truncated])
    with pytest.raises(
        DatasetError, match=r"d\.jsonl line 3: missing field 'response'"
    ):
        load_examples(str(broken))
    empty = tmp_path / "e.jsonl.gz"
    empty.write_bytes(gzip.compress(b"\n"))
    with pytest.raises(DatasetError, match="empty"):
        load_examples(str(empty))
    bad_json = tmp_path / "b.jsonl"
    bad_json.write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    with pytest.raises(DatasetError, match=r"b\.jsonl line 2: invalid JSON"):
        load_examples(str(bad_json))
    odd = tmp_path / "x.parquet"
    odd.write_text("x")
    with pytest.raises(DatasetError, match=r"\.json, \.jsonl, \.csv"):
        load_examples(str(odd))
    with pytest.raises(DatasetError, match="builtin:tasks"):
        load_examples("builtin:nothing")


def _gz_cut(text: bytes) -> bytes:
    whole = gzip.compress(text)
    return whole[: len(whole) // 2]


GOOD_LINE = b'{"prompt": "p", "response": "r", "group": "g"}\n'


@pytest.mark.parametrize(
    ("name", "content", "named"),
    [
        ("cut.jsonl.gz", _gz_cut(GOOD_LINE * 200), "truncated gzip"),
        ("bad.jsonl.gz", b"\x1f\x8b" + b"\x00" * 50, "gzip"),
        (
            "latin.jsonl",
            GOOD_LINE * 2 + b'{"prompt": "caf\xe9"}\n',
            "line 3: not UTF-8",
        ),
        ("latin.csv", b"text,label\nok,a\ncaf\xe9,b\n", "line 3: not UTF-8"),
        ("huge.csv", b"text,label\n" + b"x" * 200_000 + b",d\n", "line 2: bad CSV"),
        ("late.json", b'[{"prompt": "a",\n "response": }]', "line 2: invalid JSON"),
    ],
    ids=["gz-cut", "gz-corrupt", "jsonl-latin1", "csv-latin1", "csv-huge", "json-late"],
)
def test_broken_files_raise_dataset_error_naming_them(
    tmp_path: Path, name: str, content: bytes, named: str
) -> None:
    """Every way a file is broken (cut or corrupt gzip, bad UTF-8, NUL in CSV,
    bad JSON) must be a DatasetError naming the file and what is wrong, never
    EOFError, zlib.error, UnicodeDecodeError or csv.Error from inside a reader."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DatasetError) as info:
        load_examples(str(path))
    assert str(path) in str(info.value) and named in str(info.value)
    if name.endswith(".jsonl"):
        with pytest.raises(DatasetError, match=re.escape(named)):
            read_jsonl(path)


def test_a_folder_or_unreadable_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder where a file should be, or a file that cannot be read, must be
    a DatasetError naming it (not IsADirectoryError / PermissionError)."""
    folder = tmp_path / "d.jsonl"
    folder.mkdir()
    with pytest.raises(DatasetError, match=r"d\.jsonl: is a folder"):
        load_examples(str(folder))
    locked = _write_lines(tmp_path / "l.jsonl", [{"prompt": "p", "response": "r"}])

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DatasetError, match=r"l\.jsonl: cannot read: Permission denied"):
        load_examples(str(locked))


def test_a_byte_order_mark_is_not_part_of_the_first_field(tmp_path: Path) -> None:
    """A UTF-8 BOM (spreadsheet exports) must not turn 'text' into '\\ufefftext'."""
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\nhello,greet\n")
    assert load_examples(str(path)) == [Example("hello", "greet", "greet")]


def test_split_holdout_stratified_and_seeded() -> None:
    """split_holdout must partition the examples, hold out n_eval stratified by
    group, repeat for a seed and change with another; and reject n_eval >= len."""
    examples = [Example(f"p{i}", "r", "a" if i < 80 else "b") for i in range(100)]
    train, held = split_holdout(examples, 10, seed=1)
    assert len(held) == 10 and len(train) == 90
    assert sorted(train + held, key=lambda e: int(e.prompt[1:])) == examples
    assert Counter(e.group for e in held) == {"a": 8, "b": 2}
    assert split_holdout(examples, 10, seed=1) == (train, held)
    assert split_holdout(examples, 10, seed=2)[1] != held
    with pytest.raises(DatasetError, match="n_eval=100"):
        split_holdout(examples, 100, seed=0)


def test_builtin_tasks_deterministic_and_balanced() -> None:
    """builtin:tasks must be seed-deterministic, differ across seeds, default to
    2400 examples and balance the six tasks; global RNG use would break it."""
    first = load_examples("builtin:tasks", limit=600, seed=7)
    assert first == generate_tasks(600, 7)
    assert first == load_examples("builtin:tasks", limit=600, seed=7)
    assert first != load_examples("builtin:tasks", limit=600, seed=8)
    assert len(load_examples("builtin:tasks")) == 2400
    assert Counter(e.group for e in first) == dict.fromkeys(BUILTIN_TASKS, 100)
    uneven = Counter(e.group for e in generate_tasks(601, 0))
    assert max(uneven.values()) - min(uneven.values()) == 1
    subset = generate_tasks(40, 0, tasks=["add", "uppercase"])
    assert {e.group for e in subset} == {"add", "uppercase"}
    with pytest.raises(DatasetError, match="allowed"):
        generate_tasks(10, 0, tasks=["translate"])


def _check_answer(example: Example) -> bool:
    """Recompute the answer of a built-in task example from its prompt."""
    payload = example.prompt.split(": ", 1)[1]
    words = payload.split()
    if example.group == "uppercase":
        return example.response == payload.upper()
    if example.group == "reverse_words":
        return example.response.split() == words[::-1]
    if example.group == "add":
        first, second = (int(x) for x in payload.split(" + "))
        return (
            10 <= first <= 99
            and 10 <= second <= 99
            and int(example.response) == first + second
        )
    if example.group == "sort_digits":
        return example.response.split() == sorted(words, key=int)
    if example.group == "count_words":
        return int(example.response) == len(words)
    return example.group == "last_word" and example.response == words[-1]


def test_builtin_answers_are_correct_and_short() -> None:
    """Every built-in answer must be recomputable from its prompt, prompts under
    25 words and answers 1-6 words; a wrong generator would fail here."""
    examples = generate_tasks(1200, 11)
    assert all(_check_answer(e) for e in examples)
    assert all(len(e.prompt.split()) < 25 for e in examples)
    assert all(1 <= len(e.response.split()) <= 6 for e in examples)
