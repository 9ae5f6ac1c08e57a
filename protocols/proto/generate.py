"""Regenerate the Python modules of ``trunk.proto``, reproducibly.

Run from the repository root, with the project's environment::

    python -m protocols.proto.generate --protoc-python /path/to/protoc-venv/bin/python

or, when the current interpreter has ``grpc_tools`` itself, without the flag.
The module needs only the standard library, so ``python protocols/proto/generate.py``
also works from an environment that has the generator but not the project.

The generated code embeds the versions of the tool that wrote it, so this
script pins them and refuses any other:

* ``grpcio-tools==1.80.0`` (bundles ``protoc`` and the gRPC Python plugin);
* ``protobuf==6.33.6``.

They live in a separate virtual environment, not in the project's::

    python3.11 -m venv /path/to/protoc-venv
    /path/to/protoc-venv/bin/pip install grpcio-tools==1.80.0 protobuf==6.33.6

The tool is always run as a subprocess of the chosen interpreter (``sys.executable``
by default, or ``--protoc-python``), so this module itself needs only the standard
library. It writes ``trunk_pb2.py``, ``trunk_pb2.pyi`` and ``trunk_pb2_grpc.py``,
then post-processes them the same way every time: a ``# ruff: noqa`` first line
(generated code is not linted) and a package-absolute import in the gRPC module
(``from protocols.proto import trunk_pb2 as trunk__pb2``) instead of protoc's
top-level ``import trunk_pb2``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "GENERATED_FILES",
    "GRPC_TOOLS_VERSION",
    "INSTALL_HINT",
    "PROTOBUF_VERSION",
    "PROTO_DIR",
    "PROTO_FILE",
    "GenerationError",
    "generate",
    "main",
    "tool_versions",
]

GRPC_TOOLS_VERSION = "1.80.0"
PROTOBUF_VERSION = "6.33.6"
PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = "trunk.proto"
GENERATED_FILES = ("trunk_pb2.py", "trunk_pb2.pyi", "trunk_pb2_grpc.py")
INSTALL_HINT = (
    "grpc_tools is not importable by {python}. Install the pinned generator in a "
    "separate virtual environment (not the project's):\n"
    "    python3.11 -m venv protoc-venv\n"
    f"    protoc-venv/bin/pip install grpcio-tools=={GRPC_TOOLS_VERSION} "
    f"protobuf=={PROTOBUF_VERSION}\n"
    "then run: python -m protocols.proto.generate "
    "--protoc-python protoc-venv/bin/python"
)

_NOQA = "# ruff: noqa\n"
_PROTOC_IMPORT = "import trunk_pb2 as trunk__pb2"
_PACKAGE_IMPORT = "from protocols.proto import trunk_pb2 as trunk__pb2"
_VERSION_PROBE = (
    "import importlib.metadata as m;"
    "print(m.version('grpcio-tools'), m.version('protobuf'))"
)


class GenerationError(RuntimeError):
    """The generator is missing, has the wrong version, or failed."""


def tool_versions(python: str) -> tuple[str, str]:
    """Versions ``(grpcio-tools, protobuf)`` installed for interpreter ``python``.

    Raises
    ------
    GenerationError
        If the interpreter cannot run or grpc_tools is not installed for it
        (the message says how to install it).
    """
    try:
        done = subprocess.run(
            [python, "-c", "import grpc_tools;" + _VERSION_PROBE],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise GenerationError(f"cannot run {python}: {exc}") from exc
    if done.returncode != 0:
        raise GenerationError(INSTALL_HINT.format(python=python))
    tools, protobuf = done.stdout.split()
    return tools, protobuf


def _postprocess(out_dir: Path) -> None:
    """Add the lint marker and the package-absolute import, idempotently."""
    for name in GENERATED_FILES:
        path = out_dir / name
        text = path.read_text(encoding="utf-8")
        if name == "trunk_pb2_grpc.py":
            if _PROTOC_IMPORT not in text:
                raise GenerationError(
                    f"{name}: protoc's import line {_PROTOC_IMPORT!r} not found"
                )
            text = text.replace(_PROTOC_IMPORT, _PACKAGE_IMPORT, 1)
        if not text.startswith(_NOQA):
            text = _NOQA + text
        path.write_text(text, encoding="utf-8")


def generate(
    out_dir: Path | None = None,
    *,
    python: str | None = None,
    check_versions: bool = True,
) -> list[Path]:
    """Generate the trunk modules into ``out_dir`` (default: this package).

    Parameters
    ----------
    out_dir : Path, optional
        Where the three files are written; defaults to :data:`PROTO_DIR`, which
        overwrites the committed ones.
    python : str, optional
        Interpreter that has ``grpc_tools`` installed (default ``sys.executable``).
    check_versions : bool
        Refuse any generator other than the pinned versions (on by default,
        since the output embeds the versions).

    Returns
    -------
    list[Path]
        Paths of the written files, in :data:`GENERATED_FILES` order.

    Raises
    ------
    GenerationError
        If grpc_tools is missing, has the wrong version, or protoc fails.
    """
    python = python or sys.executable
    target = (out_dir or PROTO_DIR).resolve()
    versions = tool_versions(python)
    if check_versions and versions != (GRPC_TOOLS_VERSION, PROTOBUF_VERSION):
        raise GenerationError(
            f"{python} has grpcio-tools=={versions[0]} protobuf=={versions[1]}; "
            f"the committed code needs grpcio-tools=={GRPC_TOOLS_VERSION} "
            f"protobuf=={PROTOBUF_VERSION}"
        )
    with tempfile.TemporaryDirectory(prefix="pollinate-proto-") as tmp:
        # Generate from a private copy so the source path protoc records is
        # always the bare file name, whatever the caller's working directory.
        shutil.copy2(PROTO_DIR / PROTO_FILE, Path(tmp) / PROTO_FILE)
        work = Path(tmp) / "out"
        work.mkdir()
        done = subprocess.run(
            [
                python,
                "-m",
                "grpc_tools.protoc",
                "-I.",
                f"--python_out={work}",
                f"--pyi_out={work}",
                f"--grpc_python_out={work}",
                PROTO_FILE,
            ],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise GenerationError(f"protoc failed:\n{done.stderr.strip()}")
        _postprocess(work)
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED_FILES:
            shutil.copyfile(work / name, target / name)
            written.append(target / name)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m protocols.proto.generate", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--protoc-python",
        default=None,
        help="interpreter with grpcio-tools installed (default: this one)",
    )
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="output folder (default: here)"
    )
    args = parser.parse_args(argv)
    try:
        paths = generate(args.out_dir, python=args.protoc_python)
    except GenerationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
