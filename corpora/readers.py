"""Reading local instruction / classification datasets into ``Example`` lists.

This module owns :func:`load_examples`, the single entry point that turns a
data source into examples. A source is either ``"builtin:tasks"`` (the
synthetic tasks of :mod:`corpora.tasks`) or a path to a ``.json``, ``.jsonl``
or ``.csv`` file, optionally gzip-compressed (``.json.gz`` ...).

The record schema is detected from the field names of the first record, in
this order (first match wins):

========================  ==================================================
schema                    fields -> Example
========================  ==================================================
``dolly``                 instruction, context, response, category
``natural_instructions``  task, input, targets (list; first is the response);
                          the prompt is the task's definition (from
                          ``tasks.json`` beside the file) plus the input
``alpaca``                instruction, [input], output, [category | task]
``generic``               prompt, response | completion | output,
                          [group | task | category | label]
``classification``        text, label | category | intent
========================  ==================================================

A JSON file may hold a list of records, or an object whose ``data`` or
``train`` key (or only list-valued key) holds that list. Records that are
two-element ``[text, label]`` lists (the CLINC150 layout) are read as
classification records.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from corpora.examples import DatasetError, Example, read_text
from corpora.tasks import generate_tasks

BUILTIN_SOURCES: tuple[str, ...] = ("builtin:tasks",)
DEFAULT_BUILTIN_SIZE = 2400
SUPPORTED_SUFFIXES: tuple[str, ...] = (".json", ".jsonl", ".csv")
NI_TASKS_FILE = "tasks.json"
"""Natural Instructions: the task definitions, beside the data file."""
MAX_TASKS_JSON_BYTES = 16 * 1024 * 1024
"""Largest ``tasks.json`` read (the 61 tasks of NI v1 take 68 kB)."""

log = logging.getLogger(__name__)
_WARNED_NO_TASKS: set[Path] = set()

Record = Mapping[str, Any]
_Mapper = Callable[[Record, str], Example]

_GROUP_KEYS: tuple[str, ...] = ("group", "task", "category", "label")
_GENERIC_RESPONSE_KEYS: tuple[str, ...] = ("response", "completion", "output")
_CLASS_LABEL_KEYS: tuple[str, ...] = ("label", "category", "intent")
_SCHEMA_HELP = (
    "dolly (instruction, context, response, category); "
    "natural_instructions (task, input, targets); "
    "alpaca (instruction, [input], output); "
    "generic (prompt + response|completion|output); "
    "classification (text + label|category|intent)"
)


def _text(record: Record, field: str, where: str) -> str:
    """Return the string value of a required text field."""
    if field not in record or record[field] is None:
        raise DatasetError(f"{where}: missing field {field!r}")
    value = record[field]
    if not isinstance(value, str):
        raise DatasetError(
            f"{where}: field {field!r} must be a string, got {type(value).__name__}"
        )
    return value


def _label(record: Record, field: str, where: str) -> str:
    """Return a label-like field (string, integer or boolean) as a string."""
    if field not in record or record[field] is None:
        raise DatasetError(f"{where}: missing field {field!r}")
    value = record[field]
    if not isinstance(value, (str, int, bool)):
        raise DatasetError(
            f"{where}: field {field!r} must be a string or integer, got {type(value).__name__}"
        )
    return str(value)


def _optional_text(record: Record, field: str, where: str) -> str:
    """Return an optional text field, ``""`` when absent or null."""
    if record.get(field) is None:
        return ""
    return _text(record, field, where)


def _with_context(instruction: str, context: str) -> str:
    """Join an instruction and a non-empty context into one prompt."""
    if context.strip():
        return f"{instruction}\n\nContext: {context}"
    return instruction


def _map_dolly(record: Record, where: str) -> Example:
    """Map a Dolly record to an example."""
    instruction = _text(record, "instruction", where)
    prompt = _with_context(instruction, _optional_text(record, "context", where))
    return Example(
        prompt, _text(record, "response", where), _label(record, "category", where)
    )


def _map_natural_instructions(record: Record, where: str) -> Example:
    """Map a Natural Instructions v1 record to an example (first target)."""
    targets = record.get("targets")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not isinstance(targets[0], str):
        raise DatasetError(
            f"{where}: field 'targets' must be a non-empty list of strings"
        )
    return Example(
        _text(record, "input", where), targets[0], _label(record, "task", where)
    )


def ni_prompt(definition: str, text: str) -> str:
    """The Natural Instructions prompt: the task's definition, then the input.

    As FedKSeed's Alpaca-style prompt: the definition is the instruction
    (:data:`models.text.PROMPT_TEMPLATE` wraps the whole prompt).
    """
    return f"{definition.strip()}\n\nInput: {text}"


def read_ni_definitions(path: Path) -> dict[str, str]:
    """Each task's definition from a Natural Instructions ``tasks.json``.

    Parameters
    ----------
    path : Path
        A JSON object with a ``tasks`` list of ``{"task": str, "definition":
        str, ...}`` objects, at most :data:`MAX_TASKS_JSON_BYTES` bytes.

    Returns
    -------
    dict of str to str
        Task name to definition.

    Raises
    ------
    DatasetError
        If the file is too large, not JSON, or not of that shape (one line
        naming the file and the fault).
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if size > MAX_TASKS_JSON_BYTES:
        raise DatasetError(
            f"{path}: {size} bytes, more than the {MAX_TASKS_JSON_BYTES} a "
            "task list may have"
        )
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path} line {exc.lineno}: invalid JSON ({exc.msg})"
        ) from None
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, list):
        raise DatasetError(f"{path}: expected a JSON object with a 'tasks' list")
    definitions: dict[str, str] = {}
    for number, entry in enumerate(tasks, start=1):
        task = entry.get("task") if isinstance(entry, dict) else None
        definition = entry.get("definition") if isinstance(entry, dict) else None
        if not isinstance(task, str) or not isinstance(definition, str):
            raise DatasetError(
                f"{path}: tasks entry {number} must be an object with string "
                "'task' and 'definition'"
            )
        definitions[task] = definition
    return definitions


def _with_definitions(
    examples: list[Example], file: Path, records: list[tuple[str, Record]]
) -> list[Example]:
    """NI examples whose prompt is their task's definition plus the input.

    The definitions come from ``tasks.json`` beside ``file``; without one the
    bare inputs are kept (with a warning, once per file).
    """
    tasks_file = file.parent / NI_TASKS_FILE
    if not tasks_file.is_file():
        if file not in _WARNED_NO_TASKS:
            _WARNED_NO_TASKS.add(file)
            log.warning(
                "%s: no %s beside it: prompts are the bare inputs, without "
                "the task definitions",
                file,
                NI_TASKS_FILE,
            )
        return examples
    definitions = read_ni_definitions(tasks_file)
    out = []
    for example, (where, _) in zip(examples, records, strict=True):
        definition = definitions.get(example.group)
        if definition is None:
            raise DatasetError(
                f"{where}: task {example.group!r} has no definition in {tasks_file}"
            )
        out.append(
            Example(
                ni_prompt(definition, example.prompt), example.response, example.group
            )
        )
    return out


def _first_group(record: Record, keys: tuple[str, ...], where: str) -> str:
    """Return the first present group-like field, or ``"default"``."""
    for key in keys:
        if record.get(key) is not None:
            return _label(record, key, where)
    return "default"


def _map_alpaca(record: Record, where: str) -> Example:
    """Map an Alpaca record to an example."""
    instruction = _text(record, "instruction", where)
    prompt = _with_context(instruction, _optional_text(record, "input", where))
    group = _first_group(record, ("category", "task"), where)
    return Example(prompt, _text(record, "output", where), group)


def _map_generic(record: Record, where: str) -> Example:
    """Map a generic prompt/response record to an example."""
    for key in _GENERIC_RESPONSE_KEYS:
        if key in record:
            response = _text(record, key, where)
            break
    else:
        raise DatasetError(
            f"{where}: missing field; need one of {', '.join(_GENERIC_RESPONSE_KEYS)}"
        )
    group = _first_group(record, _GROUP_KEYS, where)
    return Example(_text(record, "prompt", where), response, group)


def _map_classification(record: Record, where: str) -> Example:
    """Map a text classification record to an example (response = label)."""
    for key in _CLASS_LABEL_KEYS:
        if key in record:
            label = _label(record, key, where)
            break
    else:
        raise DatasetError(
            f"{where}: missing field; need one of {', '.join(_CLASS_LABEL_KEYS)}"
        )
    return Example(_text(record, "text", where), label, label)


def detect_schema(fields: set[str] | frozenset[str]) -> str:
    """Name the record schema implied by a record's field names.

    Parameters
    ----------
    fields : set of str
        Field names of one record.

    Returns
    -------
    str
        One of ``dolly``, ``natural_instructions``, ``alpaca``, ``generic``,
        ``classification`` (checked in that order).

    Raises
    ------
    DatasetError
        If no schema matches; the message lists the fields and the schemas.
    """
    if {"instruction", "context", "response", "category"} <= fields:
        return "dolly"
    if {"task", "input", "targets"} <= fields:
        return "natural_instructions"
    if {"instruction", "output"} <= fields:
        return "alpaca"
    if "prompt" in fields and fields & set(_GENERIC_RESPONSE_KEYS):
        return "generic"
    if "text" in fields and fields & set(_CLASS_LABEL_KEYS):
        return "classification"
    raise DatasetError(
        f"unknown record schema with fields {sorted(fields)}; supported schemas: {_SCHEMA_HELP}"
    )


def _mappers() -> dict[str, _Mapper]:
    """Map schema names to record mapping functions."""
    return {
        "dolly": _map_dolly,
        "natural_instructions": _map_natural_instructions,
        "alpaca": _map_alpaca,
        "generic": _map_generic,
        "classification": _map_classification,
    }


def _file_format(path: Path) -> str:
    """Return ``.json``, ``.jsonl`` or ``.csv`` for a (possibly .gz) path."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[: -len(".gz")]
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise DatasetError(
        f"unsupported file type {path.name!r}; allowed: "
        f"{', '.join(SUPPORTED_SUFFIXES)} (optionally followed by .gz)"
    )


def _jsonl_records(path: Path) -> list[tuple[str, Any]]:
    """Read a JSONL file into ``(location, record)`` pairs."""
    records = []
    lines = io.StringIO(read_text(path), newline="")
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {line_number}"
        try:
            records.append((where, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: invalid JSON ({exc.msg})") from None
    return records


def _json_records(path: Path) -> list[tuple[str, Any]]:
    """Read a JSON file (list, or object holding a list) into records."""
    text = read_text(path)
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path} line {exc.lineno}: invalid JSON ({exc.msg})"
        ) from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        key = next((k for k in ("data", "train") if k in lists), None)
        if key is None and len(lists) == 1:
            key = lists[0]
        if key is None:
            raise DatasetError(
                f"{path}: JSON object must hold the records under 'data' or 'train' "
                f"(or a single list-valued key); found keys {sorted(data)}"
            )
        data = data[key]
    if not isinstance(data, list):
        raise DatasetError(
            f"{path}: expected a JSON list of records, got {type(data).__name__}"
        )
    return [
        (f"{path} record {number}", record)
        for number, record in enumerate(data, start=1)
    ]


def _csv_records(path: Path) -> list[tuple[str, Any]]:
    """Read a CSV file with a header row into records."""
    records = []
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if None in row or any(value is None for value in row.values()):
                cells = sum(v is not None for k, v in row.items() if k is not None)
                cells += len(row.get(None) or [])
                raise DatasetError(
                    f"{where}: row has {cells} cells but the header "
                    f"{reader.fieldnames} has {len(reader.fieldnames or [])}"
                )
            records.append((where, row))
    except csv.Error as exc:
        # line_num counts the lines read before the one that failed
        line = reader.line_num + 1
        raise DatasetError(f"{path} line {line}: bad CSV ({exc})") from None
    return records


def _as_record(raw: Any, where: str) -> Record:
    """Check a raw record is an object; ``[text, label]`` pairs become one."""
    if isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], str):
        return {"text": raw[0], "label": raw[1]}
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    return raw


def read_records(path: str | os.PathLike[str]) -> list[Example]:
    """Read every record of a local dataset file into examples.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.json``, ``.jsonl`` or ``.csv`` file, optionally gzip-compressed.

    Returns
    -------
    list of Example
        All examples, in file order.

    Raises
    ------
    DatasetError
        If the file is missing, a folder, unreadable, damaged gzip, not UTF-8
        (see :func:`corpora.examples.read_text`), of an unsupported type,
        empty, not valid JSON/CSV, of an unknown schema, or a record lacks a
        field (the message names the file and, where known, the line).
    """
    file = Path(path)
    if not file.exists():
        raise DatasetError(f"dataset file not found: {str(file)!r}")
    readers = {".json": _json_records, ".jsonl": _jsonl_records, ".csv": _csv_records}
    raw_records = readers[_file_format(file)](file)
    if not raw_records:
        raise DatasetError(f"{file}: dataset is empty (no records)")
    records = [(where, _as_record(raw, where)) for where, raw in raw_records]
    first_where, first = records[0]
    try:
        schema = detect_schema(frozenset(first))
    except DatasetError as exc:
        raise DatasetError(f"{first_where}: {exc}") from exc
    mapper = _mappers()[schema]
    examples = [mapper(record, where) for where, record in records]
    if schema == "natural_instructions":
        return _with_definitions(examples, file, records)
    return examples


def _subset(examples: list[Example], limit: int, seed: int) -> list[Example]:
    """Keep a seeded random subset of ``limit`` examples, in original order."""
    if limit >= len(examples):
        return examples
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(examples), size=limit, replace=False))
    return [examples[int(index)] for index in keep]


def load_examples(
    source: str, *, limit: int | None = None, seed: int = 0
) -> list[Example]:
    """Load examples from a built-in generator or a local dataset file.

    Parameters
    ----------
    source : str
        ``"builtin:tasks"`` or a path to a ``.json``/``.jsonl``/``.csv`` file,
        optionally gzip-compressed. See the module docstring for the schemas.
    limit : int, optional
        For files, keep a seeded random subset of this many examples (in file
        order; all of them when the file has fewer). For ``builtin:tasks``,
        the number of examples to generate (default 2400).
    seed : int, default 0
        Seed of the subset draw, or of the task generator.

    Returns
    -------
    list of Example
        The loaded examples.

    Raises
    ------
    DatasetError
        If ``limit < 1``, the builtin name is unknown, or the file cannot be
        read (see :func:`read_records`).
    """
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
    ):
        raise DatasetError(
            f"load_examples: limit must be None or an integer >= 1, got {limit!r}"
        )
    if source.startswith("builtin:"):
        if source not in BUILTIN_SOURCES:
            raise DatasetError(
                f"unknown builtin source {source!r}; allowed: {', '.join(BUILTIN_SOURCES)}"
            )
        return generate_tasks(limit or DEFAULT_BUILTIN_SIZE, seed)
    examples = read_records(source)
    return examples if limit is None else _subset(examples, limit, seed)
