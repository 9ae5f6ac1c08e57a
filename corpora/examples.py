"""The ``Example`` record and Pollinate's canonical JSONL format.

This module owns the unit of text data shared by clients and server
(:class:`Example`), the package's error type (:class:`DatasetError`),
gzip-transparent text reading (:func:`read_text`, :func:`open_text`), reading and atomically
writing the canonical JSONL format (:func:`read_jsonl`, :func:`write_jsonl`),
and the seeded, group-stratified train/eval split (:func:`split_holdout`).

The canonical format is one JSON object per line with exactly the string keys
``prompt``, ``response`` and ``group``. Files whose name ends in ``.gz`` are
written gzip-compressed; gzip input is recognised by its magic bytes.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from protocols.durable import atomic_write_bytes

CANONICAL_FIELDS: tuple[str, ...] = ("prompt", "response", "group")
_GZIP_MAGIC = b"\x1f\x8b"


class DatasetError(ValueError):
    """Raised when text data cannot be read, parsed, generated or split."""


@dataclass(frozen=True, slots=True)
class Example:
    """One instruction-tuning example.

    Attributes
    ----------
    prompt : str
        The input text shown to the model.
    response : str
        The target text the model should produce.
    group : str
        Task, category or label of the example; used for non-IID
        partitioning and per-task metrics.
    """

    prompt: str
    response: str
    group: str


def _check_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path, if it names a regular file."""
    file = Path(path)
    if file.is_dir():
        raise DatasetError(f"{os.fspath(path)}: is a folder, not a data file")
    if not file.is_file():
        raise DatasetError(f"dataset file not found: {str(file)!r}")
    return file


def read_text(path: str | os.PathLike[str]) -> str:
    """The whole text of a UTF-8 data file, decompressing gzip.

    Gzip data is recognised by its magic bytes, whatever the file name; a
    UTF-8 byte-order mark is dropped. Reading whole is what lets every way a
    file can be broken become a :class:`DatasetError` that names it (and the
    line, for bad UTF-8) instead of an ``EOFError`` or ``zlib.error``
    surfacing mid-parse.

    Parameters
    ----------
    path : str or os.PathLike
        File to read.

    Returns
    -------
    str
        Its text, line endings untouched.

    Raises
    ------
    DatasetError
        If the path is missing or a folder, cannot be read (permissions, I/O),
        is a damaged or truncated gzip stream, or is not UTF-8 text.
    """
    file = _check_file(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{file}: cannot read: {exc.strerror or exc}") from None
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(
                f"{file}: damaged or truncated gzip data ({exc})"
            ) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DatasetError(
            f"{file} line {line}: not UTF-8 text (byte {data[exc.start]:#04x}); "
            "data files must be UTF-8"
        ) from None


def open_text(path: str | os.PathLike[str]) -> TextIO:
    """Open a UTF-8 text file for reading, decompressing gzip transparently.

    Parameters
    ----------
    path : str or os.PathLike
        File to open. Gzip data is recognised by its magic bytes, whatever
        the file name.

    Returns
    -------
    TextIO
        A text stream; the caller closes it.

    Raises
    ------
    DatasetError
        If the path does not exist, is not a regular file or cannot be opened.
        (Decoding errors surface while reading; :func:`read_text` reports
        those too.)
    """
    file = _check_file(path)
    try:
        with file.open("rb") as handle:
            magic = handle.read(2)
        if magic == _GZIP_MAGIC:
            return io.TextIOWrapper(gzip.open(file, "rb"), encoding="utf-8", newline="")
        return file.open("r", encoding="utf-8", newline="")
    except OSError as exc:
        raise DatasetError(f"{file}: cannot read: {exc.strerror or exc}") from None


def _parse_canonical(line: str, where: str) -> Example:
    """Parse one canonical JSONL line; ``where`` names file and line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: invalid JSON ({exc.msg})") from exc
    if not isinstance(record, dict):
        raise DatasetError(
            f"{where}: expected a JSON object, got {type(record).__name__}"
        )
    values = []
    for field in CANONICAL_FIELDS:
        if field not in record:
            raise DatasetError(
                f"{where}: missing field {field!r} (required: {', '.join(CANONICAL_FIELDS)})"
            )
        value = record[field]
        if not isinstance(value, str):
            raise DatasetError(
                f"{where}: field {field!r} must be a string, got {type(value).__name__}"
            )
        values.append(value)
    return Example(prompt=values[0], response=values[1], group=values[2])


def read_jsonl(path: str | os.PathLike[str]) -> list[Example]:
    """Read examples stored in the canonical JSONL format.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.jsonl`` file, optionally gzip-compressed. Blank lines are skipped.

    Returns
    -------
    list of Example
        The examples in file order (possibly empty).

    Raises
    ------
    DatasetError
        If the file is missing or unreadable (see :func:`read_text`), a line
        is not valid JSON, or a line lacks one of the string fields ``prompt``, ``response``, ``group``; the message
        names the file and line number.
    """
    examples: list[Example] = []
    lines = io.StringIO(read_text(path), newline="")
    for line_number, line in enumerate(lines, start=1):
        if line.strip():
            where = f"{os.fspath(path)} line {line_number}"
            examples.append(_parse_canonical(line, where))
    return examples


def write_jsonl(examples: Iterable[Example], path: str | os.PathLike[str]) -> None:
    """Write examples in the canonical JSONL format, atomically.

    The file is replaced whole (:func:`protocols.durable.atomic_write_bytes`),
    so readers never see a partial file. A path ending in ``.gz`` is written gzip-compressed (with a zero
    timestamp, so equal input gives equal bytes). Parent directories are
    created when missing.

    Parameters
    ----------
    examples : iterable of Example
        The examples to write, in order.
    path : str or os.PathLike
        Destination file.

    Raises
    ------
    DatasetError
        If an item is not an :class:`Example`.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for position, example in enumerate(examples):
        if not isinstance(example, Example):
            raise DatasetError(
                f"write_jsonl({str(target)!r}): item {position} is "
                f"{type(example).__name__}, expected Example"
            )
        record = {
            "prompt": example.prompt,
            "response": example.response,
            "group": example.group,
        }
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    payload = "".join(lines).encode("utf-8")
    if target.name.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    atomic_write_bytes(target, payload)


def _stratified_quotas(
    sizes: dict[str, int], n_eval: int, total: int
) -> dict[str, int]:
    """Split ``n_eval`` over groups in proportion to size (largest remainder)."""
    exact = {group: n_eval * size / total for group, size in sizes.items()}
    quotas = {group: int(value) for group, value in exact.items()}
    leftover = n_eval - sum(quotas.values())
    by_remainder = sorted(
        sizes, key=lambda group: (-(exact[group] - quotas[group]), group)
    )
    for group in by_remainder[:leftover]:
        quotas[group] += 1
    return quotas


def split_holdout(
    examples: Sequence[Example], n_eval: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split examples into a training part and a held-out evaluation part.

    The evaluation part is stratified by ``group``: each group contributes in
    proportion to its size (largest-remainder rounding, ties broken by group
    name), and which members of a group are held out is a seeded random draw.
    Both parts keep the original relative order of the examples.

    Parameters
    ----------
    examples : sequence of Example
        The full dataset.
    n_eval : int
        Number of held-out examples, ``0 <= n_eval < len(examples)``.
    seed : int
        Seed of the :class:`random.Random` that picks the held-out examples.

    Returns
    -------
    tuple of (list of Example, list of Example)
        ``(train, eval)`` with ``len(eval) == n_eval``.

    Raises
    ------
    DatasetError
        If ``n_eval`` is negative or not smaller than ``len(examples)``.
    """
    total = len(examples)
    if n_eval < 0 or n_eval >= total:
        raise DatasetError(
            f"split_holdout: n_eval={n_eval} must be >= 0 and < the number of examples ({total})"
        )
    rng = random.Random(seed)
    members: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        members[example.group].append(index)
    quotas = _stratified_quotas({g: len(m) for g, m in members.items()}, n_eval, total)
    held_out: set[int] = set()
    for group in sorted(members):
        held_out.update(rng.sample(members[group], quotas[group]))
    train = [ex for index, ex in enumerate(examples) if index not in held_out]
    evaluation = [ex for index, ex in enumerate(examples) if index in held_out]
    return train, evaluation
