"""Content manifests: the sha256 of every file of a checkpoint or an artefact.

A *sealed* folder (a checkpoint, a PEFT adapter folder) holds
``manifest.json`` beside its files; a sealed single file (``model/x.safetensors``)
has it beside itself as ``x.safetensors.manifest.json``. The manifest is
written last (:mod:`protocols.durable`), so a folder whose manifest is missing
or disagrees with its files was torn by a crash or changed since: it is
refused, naming the file, instead of being taken at its word::

    {"format": "pollinate-manifest", "version": 1,
     "files": {"state.json": {"sha256": "…", "bytes": 812}, …},
     "meta": {"round": 3}}

``meta`` carries what the writer wants checked against the files' content
(a checkpoint's round). A manifest guards against damage and against edits
by hand, not against someone who rewrites the manifest too: it is not a
signature.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocols.durable import atomic_write_text

__all__ = [
    "file_sha256",
    "MANIFEST_NAME",
    "Manifest",
    "ManifestError",
    "manifest_path",
    "read_manifest",
    "seal",
    "verified_bytes",
    "verify",
]

MANIFEST_NAME = "manifest.json"
_FORMAT = "pollinate-manifest"
_VERSION = 1
_MAX_MANIFEST_BYTES = 1024 * 1024  # a few hundred bytes per file


class ManifestError(ValueError):
    """A sealed file or folder is damaged, changed or unsealed; names the file."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a manifest records.

    Attributes
    ----------
    path : Path
        The manifest file itself.
    root : Path
        The folder the file names are relative to.
    files : dict[str, str]
        Relative POSIX path -> lowercase hex sha256.
    meta : dict[str, Any]
        What the writer asked to be recorded with the hashes.
    """

    path: Path
    root: Path
    files: dict[str, str]
    meta: dict[str, Any] = field(default_factory=dict)


def manifest_path(target: Path) -> Path:
    """Where ``target``'s manifest lives (inside a folder, beside a file)."""
    target = Path(target)
    if target.is_dir():
        return target / MANIFEST_NAME
    return target.with_name(f"{target.name}.{MANIFEST_NAME}")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _members(target: Path) -> dict[str, Path]:
    """The files a seal of ``target`` covers, by relative POSIX name."""
    if not target.is_dir():
        return {target.name: target}
    return {
        p.relative_to(target).as_posix(): p
        for p in sorted(target.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(".")
    }


def seal(target: Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Hash every file of ``target`` (a folder, or one file) and write its manifest.

    Call it once the files are complete: the manifest is the last write, so
    its presence says the rest is whole. Returns the manifest's path.

    Raises
    ------
    ManifestError
        If ``target`` does not exist or ``meta`` is not JSON.
    """
    target = Path(target)
    if not target.exists():
        raise ManifestError(f"cannot seal {target}: it does not exist")
    files = {
        name: {"sha256": file_sha256(path), "bytes": path.stat().st_size}
        for name, path in _members(target).items()
    }
    record = {
        "format": _FORMAT,
        "version": _VERSION,
        "files": files,
        "meta": dict(meta or {}),
    }
    try:
        text = json.dumps(record, indent=1, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"manifest meta of {target} is not JSON: {exc}") from None
    path = manifest_path(target)
    atomic_write_text(path, text)
    return path


def _safe_name(name: object) -> bool:
    if not isinstance(name, str) or not name or name.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def read_manifest(target: Path) -> Manifest:
    """The manifest of ``target``, its shape checked (files are not hashed).

    Raises
    ------
    ManifestError
        If there is none (the folder was never sealed, or a crash tore it),
        or it is damaged; the message names the manifest.
    """
    target = Path(target)
    path = manifest_path(target)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(
            f"{path} is missing: {target} is incomplete or was not written by "
            "this version of Pollinate"
        ) from None
    except OSError as exc:
        raise ManifestError(f"{path} is unreadable: {exc}") from None
    if len(raw) > _MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path} is damaged: {len(raw)} bytes")
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is damaged: not valid JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        raise ManifestError(f"{path} is damaged: not a Pollinate manifest")
    if record.get("version") != _VERSION:
        raise ManifestError(
            f"{path} has manifest version {record.get('version')!r}, this "
            f"Pollinate reads version {_VERSION}"
        )
    files, meta = record.get("files"), record.get("meta", {})
    if not isinstance(files, dict) or not isinstance(meta, dict):
        raise ManifestError(f"{path} is damaged: 'files' or 'meta' is not an object")
    hashes: dict[str, str] = {}
    for name, entry in files.items():
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not _safe_name(name) or not isinstance(digest, str) or len(digest) != 64:
            raise ManifestError(f"{path} is damaged: bad entry {name!r}")
        hashes[name] = digest
    root = target if path.parent == target else target.parent
    return Manifest(path, root, hashes, meta)


def verified_bytes(manifest: Manifest, name: str) -> bytes:
    """The content of the sealed file ``name``, checked against ``manifest``.

    Read once, hashed, then returned: what the caller parses is what was
    checked.

    Raises
    ------
    ManifestError
        If the manifest does not list ``name``, the file is missing, or its
        sha256 differs (the message names the file).
    """
    path = manifest.root / name
    want = manifest.files.get(name)
    if want is None:
        raise ManifestError(f"{path} is not listed in {manifest.path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path} is missing or unreadable: {exc}") from None
    if hashlib.sha256(data).hexdigest() != want:
        raise ManifestError(
            f"{path} is damaged: its sha256 differs from the one in {manifest.path}"
        )
    return data


def verify(target: Path) -> Manifest:
    """Check every file ``target``'s manifest lists; return the manifest.

    Files beside them that the manifest does not list are refused too (a
    sealed folder holds what was sealed).

    Raises
    ------
    ManifestError
        On a missing or damaged manifest, or a file that is missing, changed
        or unlisted (the message names it).
    """
    target = Path(target)
    manifest = read_manifest(target)
    for name in manifest.files:
        path = manifest.root / name
        try:
            digest = file_sha256(path)
        except OSError as exc:
            raise ManifestError(f"{path} is missing or unreadable: {exc}") from None
        if digest != manifest.files[name]:
            raise ManifestError(
                f"{path} is damaged: its sha256 differs from the one in {manifest.path}"
            )
    extra = sorted(set(_members(target)) - set(manifest.files))
    if extra:
        raise ManifestError(
            f"{target / extra[0]} is not listed in {manifest.path}: the folder "
            "changed after it was written"
        )
    return manifest
