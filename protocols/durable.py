"""Durable file writes: a crash leaves the old file or the new one, never half.

The one implementation every layer uses (run folders, data partitions, client
snapshots). A write goes to a temporary file beside the target, is flushed and
fsync'ed, then renamed over the target with :func:`os.replace`, which is atomic
on POSIX; the folder is fsync'ed too, so the rename itself survives a power
loss. :func:`append_line` is the one exception to whole-file replacement: an
fsync'ed append, for logs whose torn last line readers tolerate.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["append_line", "atomic_write", "atomic_write_bytes", "atomic_write_text"]


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
