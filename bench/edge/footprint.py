"""Section 1: MB on disk of the edge install, the torch client's and ORT alone.

Each install set is a list of requirements resolved to its closure through
the installed distributions' own requirement metadata
(``importlib.metadata``), markers evaluated for this interpreter with the
requested extras only (so ``flwr`` without ``[simulation]`` leaves Ray out).
A distribution's size is the sum of the files its ``RECORD`` lists (each
file once, as it is on disk now). The sets:

- edge: ``edge-requirements.txt`` without its test-only lines;
- torch client: the ``[project] dependencies`` of ``pyproject.toml``;
- ORT inference alone: ``onnxruntime`` and ``numpy``.

Pollinate's own code is the same in every set and not counted. The bundle's
files are sized too (section 2 exports it).
"""

from __future__ import annotations

import importlib.metadata as md
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.edge.settings import EDGE_REQUIREMENTS_FILE, EDGE_TEST_ONLY, ORT_ALONE
from bench.harness import REPO

MB = 1e6


def _canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


def requirement_lines(path: Path) -> list[str]:
    """The requirement lines of a requirements file (comments and blanks dropped)."""
    out = []
    for line in path.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text and not text.startswith("-"):
            out.append(text)
    return out


def edge_requirements() -> list[str]:
    """``edge-requirements.txt`` without :data:`EDGE_TEST_ONLY`."""
    from packaging.requirements import Requirement

    skip = {_canonical(n) for n in EDGE_TEST_ONLY}
    return [
        r
        for r in requirement_lines(REPO / EDGE_REQUIREMENTS_FILE)
        if _canonical(Requirement(r).name) not in skip
    ]


def project_requirements() -> list[str]:
    """``[project] dependencies`` of the repository's ``pyproject.toml``."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return list(data["project"]["dependencies"])


def closure(requirements: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Installed distributions a requirement list pulls in, transitively.

    Returns
    -------
    tuple[dict[str, str], list[str]]
        Canonical name -> installed version, and the required names that are
        not installed (their markers held), sorted.
    """
    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    missing: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = _canonical(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            missing.add(name)
            continue
        found[name] = dist.version
        for text in dist.requires or []:
            sub = Requirement(text)
            envs = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append(sub)
    return dict(sorted(found.items())), sorted(missing)


def dist_bytes(name: str) -> int:
    """Bytes on disk of the files ``name``'s ``RECORD`` lists (each once)."""
    dist = md.distribution(name)
    total = 0
    seen: set[Path] = set()
    for f in dist.files or []:
        path = Path(str(dist.locate_file(f))).resolve()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        total += path.stat().st_size
    return total


def install_set(requirements: list[str]) -> dict[str, Any]:
    """One set's closure and size: ``requirements``, ``dists``, ``missing``, ``mb``."""
    found, missing = closure(requirements)
    sizes = {n: dist_bytes(n) for n in found}
    return {
        "requirements": requirements,
        "dists": {n: {"version": v, "mb": sizes[n] / MB} for n, v in found.items()},
        "missing": missing,
        "mb": sum(sizes.values()) / MB,
    }


def bundle_files(bundle: Path | None) -> dict[str, float] | None:
    """MB of each file of an edge bundle (None without one)."""
    if bundle is None or not bundle.is_dir():
        return None
    return {p.name: p.stat().st_size / MB for p in sorted(bundle.iterdir())}


def section_footprint(bundle: Path | None = None) -> dict[str, Any]:
    """The three install sets' sizes and the bundle's files."""
    sets = {
        "edge": install_set(edge_requirements()),
        "torch": install_set(project_requirements()),
        "ort": install_set(list(ORT_ALONE)),
    }
    largest = sorted(
        sets["torch"]["dists"].items(), key=lambda kv: -float(kv[1]["mb"])
    )[:5]
    return {
        "sets": sets,
        "torch_largest": {n: d["mb"] for n, d in largest},
        "bundle_mb": bundle_files(bundle),
        "method": "sum of RECORD-listed files of each installed distribution in "
        "the closure (importlib.metadata requirements, markers for this "
        "interpreter, extras only where requested)",
    }
