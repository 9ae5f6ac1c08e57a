"""The ``Example`` record and Pollinate's canonical JSONL format.

This module owns the unit of text data shared by clients and server
(:class:`Example`), the package's error type (:class:`DatasetError`),
gzip-transparent text reading (:func:`read_text`, :func:`open_text`), reading and atomically
writing the canonical JSONL format (:func:`read_jsonl`, :func:`write_jsonl`),
the seeded, group-stratified train/eval split (:func:`split_holdout`), the
split that holds whole groups out (:func:`split_heldout_groups`), and the one
rule a run is split by (:func:`split_for_run`).

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


DEFAULT_EVAL_EXAMPLES = 256
"""Held-out examples when ``data.eval_examples`` is not set (at most a quarter)."""


def eval_size(n_eval: int | None, total: int) -> int:
    """The held-out set's size: ``n_eval``, or ``min(256, total // 4)`` (at least 1)."""
    if n_eval is not None:
        return n_eval
    return min(DEFAULT_EVAL_EXAMPLES, max(1, total // 4))


def pick_heldout_groups(
    examples: Sequence[Example],
    *,
    groups: Sequence[str] = (),
    count: int = 0,
    seed: int = 0,
) -> tuple[str, ...]:
    """The groups held out whole: those named, or ``count`` drawn by ``seed``.

    Parameters
    ----------
    examples : sequence of Example
        The full dataset; its groups are the ones that can be held out.
    groups : sequence of str
        Groups named by the caller (exclusive with ``count``).
    count : int
        How many groups a seeded draw picks (exclusive with ``groups``).
    seed : int
        Seed of the :class:`random.Random` that draws ``count`` groups.

    Returns
    -------
    tuple of str
        The held-out groups, sorted; empty when neither is given.

    Raises
    ------
    DatasetError
        If both are given, a name is not a group of the data, or the groups
        held out would leave no group to train on.
    """
    if groups and count:
        raise DatasetError(
            "heldout_groups and heldout_group_count are exclusive: give one"
        )
    known = sorted({e.group for e in examples})
    if count < 0 or (count and count >= len(known)):
        raise DatasetError(
            f"heldout_group_count ({count}) must leave at least one of the "
            f"{len(known)} groups of the data for training"
        )
    if count:
        return tuple(sorted(random.Random(seed).sample(known, count)))
    unknown = sorted(set(groups) - set(known))
    if unknown:
        shown = ", ".join(known[:5]) + (", ..." if len(known) > 5 else "")
        raise DatasetError(
            f"heldout_groups {unknown} are not groups of the data; its "
            f"{len(known)} groups include {shown}"
        )
    if groups and len(set(groups)) >= len(known):
        raise DatasetError(
            f"heldout_groups holds out all {len(known)} groups of the data: "
            "leave at least one for training"
        )
    return tuple(sorted(set(groups)))


def split_heldout_groups(
    examples: Sequence[Example], groups: Sequence[str], n_eval: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out whole groups: train on the others, evaluate on these alone.

    The evaluation part is ``n_eval`` examples of the held-out groups (all of
    them when they have fewer), stratified by group as in
    :func:`split_holdout`; no example of a held-out group is trained on.
    Both parts keep the original relative order of the examples.

    Parameters
    ----------
    examples : sequence of Example
        The full dataset.
    groups : sequence of str
        The held-out groups (see :func:`pick_heldout_groups`), non-empty.
    n_eval : int
        Most held-out examples, ``>= 1``.
    seed : int
        Seed of the draw of evaluation examples.

    Returns
    -------
    tuple of (list of Example, list of Example)
        ``(train, eval)``.

    Raises
    ------
    DatasetError
        If ``groups`` is empty or ``n_eval < 1``.
    """
    if not groups or n_eval < 1:
        raise DatasetError(
            f"split_heldout_groups: need held-out groups and n_eval >= 1, got "
            f"{list(groups)} and {n_eval}"
        )
    held = set(groups)
    train = [e for e in examples if e.group not in held]
    pool = [e for e in examples if e.group in held]
    if n_eval >= len(pool):
        return train, pool
    _, evaluation = split_holdout(pool, n_eval, seed)
    return train, evaluation


@dataclass(frozen=True, slots=True)
class RunSplit:
    """How a run's examples are shared: training, evaluation, held-out groups."""

    train: list[Example]
    evaluation: list[Example]
    heldout_groups: tuple[str, ...]


def split_for_run(
    examples: Sequence[Example],
    *,
    heldout_groups: Sequence[str] = (),
    heldout_group_count: int = 0,
    n_eval: int | None = None,
    seed: int = 0,
) -> RunSplit:
    """A run's split, the one rule every preparation and check applies.

    Without held-out groups, ``n_eval`` examples stratified over every group
    are held out (:func:`split_holdout`); with them, no client trains on
    those groups and the evaluation set comes from them alone
    (:func:`split_heldout_groups`). ``n_eval=None`` means
    :func:`eval_size` (``min(256, len(examples) // 4)``).

    Raises
    ------
    DatasetError
        If the held-out groups are refused (:func:`pick_heldout_groups`) or
        ``n_eval`` is not smaller than the number of examples.
    """
    size = eval_size(n_eval, len(examples))
    groups = pick_heldout_groups(
        examples, groups=heldout_groups, count=heldout_group_count, seed=seed
    )
    if groups:
        train, evaluation = split_heldout_groups(examples, groups, size, seed)
    else:
        train, evaluation = split_holdout(examples, size, seed)
    return RunSplit(train, evaluation, groups)
