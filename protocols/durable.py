"""Durable file writes: a crash leaves the old file or the new one, never half.

The one implementation every layer uses (run folders, data partitions, client
snapshots). A write goes to a temporary file beside the target, is flushed and
fsync'ed, then renamed over the target with :func:`os.replace`, which is atomic
on POSIX; the folder is fsync'ed too, so the rename itself survives a power
loss. A folder written as a whole (a checkpoint, an adapter folder) is built
beside its target and swapped in with :func:`replace_dir`; a crash between the
swap's two renames leaves the previous folder, which :func:`committed_dir`
finds. :func:`append_line` is the one exception to whole-file replacement: an
fsync'ed append, for logs whose torn last line readers tolerate.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "append_line",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "committed_dir",
    "replace_dir",
]


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename still holds
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Produce ``path`` atomically with ``write(tmp_path)``.

    For writers that insist on a file name (``safetensors.torch.save_file``):
    ``write`` fills a temporary file beside ``path`` (its return value is
    ignored), which is then fsync'ed and renamed into place. Parent folders
    are created.

    Raises
    ------
    OSError
        If the folder cannot be written; the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temp file, fsync, rename).

    Raises
    ------
    TypeError
        If ``data`` is not bytes (nothing is written).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"atomic_write_bytes needs bytes, got {type(data).__name__}")
    atomic_write(path, lambda tmp: tmp.write_bytes(bytes(data)))


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with UTF-8 ``text`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def append_line(path: Path, line: str) -> None:
    """Append one line (a newline is added) and fsync it.

    Raises
    ------
    ValueError
        If ``line`` itself holds a newline (it would read back as two lines).
    """
    if "\n" in line or "\r" in line:
        raise ValueError("append_line writes one line: the text holds a line break")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _previous(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def committed_dir(target: Path) -> Path:
    """``target``, or its previous version if a crash interrupted :func:`replace_dir`.

    Read-only: the next :func:`replace_dir` of ``target`` puts things right.
    """
    target = Path(target)
    previous = _previous(target)
    if not target.exists() and previous.is_dir():
        return previous
    return target


def replace_dir(staged: Path, target: Path) -> None:
    """Swap the complete folder ``staged`` in as ``target`` (same parent folder).

    The old ``target`` is renamed aside, ``staged`` renamed into place, then
    the old one removed; at every instant either ``target`` or its previous
    version (:func:`committed_dir`) is a whole folder. Write and fsync the
    files of ``staged`` (with :func:`atomic_write`) before calling this.
    """
    staged, target = Path(staged), Path(target)
    previous = _previous(target)
    if not target.exists() and previous.is_dir():
        os.replace(previous, target)  # a crash came between the two renames
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        os.replace(target, previous)
    os.replace(staged, target)
    _fsync_dir(target.parent)
    shutil.rmtree(previous, ignore_errors=True)
