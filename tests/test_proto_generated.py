"""The committed trunk gRPC code must be what ``trunk.proto`` generates.

Where the pinned generator is available (``grpc_tools`` in this interpreter, or
an interpreter named by ``POLLINATE_PROTOC_PYTHON``), the files are regenerated
and compared byte for byte. Everywhere, the committed descriptor is compared
with a parse of the ``.proto`` text, so an edit to one without the other fails.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from protocols.proto import generate, trunk_pb2, trunk_pb2_grpc

_MESSAGE = re.compile(r"^message\s+(\w+)\s*\{(.*?)^\}", re.S | re.M)
_FIELD = re.compile(r"^\s*(repeated\s+)?([\w.]+)\s+(\w+)\s*=\s*(\d+)\s*;", re.M)
_RPC = re.compile(r"rpc\s+(\w+)\s*\(\s*(\w+)\s*\)\s*returns\s*\(\s*(\w+)\s*\)")
_SCALARS = {
    "string": FieldDescriptor.TYPE_STRING,
    "bytes": FieldDescriptor.TYPE_BYTES,
    "int64": FieldDescriptor.TYPE_INT64,
    "fixed32": FieldDescriptor.TYPE_FIXED32,
    "bool": FieldDescriptor.TYPE_BOOL,
}


def _generator_python() -> str | None:
    """An interpreter that has grpc_tools, or None."""
    if importlib.util.find_spec("grpc_tools") is not None:
        return sys.executable
    env = os.environ.get("POLLINATE_PROTOC_PYTHON")
    return env if env and Path(env).exists() else None


def _parse_proto(text: str) -> tuple[dict, dict]:
    """Messages ``{name: {field: (number, type, repeated)}}`` and rpcs."""
    text = re.sub(r"//[^\n]*", "", text)
    messages = {
        name: {
            f: (int(num), typ, bool(rep)) for rep, typ, f, num in _FIELD.findall(body)
        }
        for name, body in _MESSAGE.findall(text)
    }
    rpcs = {name: (req, rep) for name, req, rep in _RPC.findall(text)}
    return messages, rpcs


def _check_descriptor_matches_source() -> None:
    source = (generate.PROTO_DIR / generate.PROTO_FILE).read_text(encoding="utf-8")
    messages, rpcs = _parse_proto(source)
    desc = trunk_pb2.DESCRIPTOR
    assert desc.package == "pollinate.split.v1"
    assert messages, "no message parsed from trunk.proto"
    assert set(desc.message_types_by_name) == set(messages)
    for name, fields in messages.items():
        mdesc = desc.message_types_by_name[name]
        assert set(mdesc.fields_by_name) == set(fields), name
        for fname, (number, typ, repeated) in fields.items():
            fd = mdesc.fields_by_name[fname]
            where = f"{name}.{fname}"
            assert fd.number == number, where
            assert (fd.label == FieldDescriptor.LABEL_REPEATED) == repeated, where
            if typ in _SCALARS:
                assert fd.type == _SCALARS[typ], where
            else:
                assert fd.message_type is not None, where
                assert fd.message_type.name == typ, where
    service = desc.services_by_name["SplitTrunk"]
    got = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert got == rpcs
    assert all(hasattr(trunk_pb2_grpc.SplitTrunkServicer, name) for name in rpcs)


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    """A .proto edit without regeneration (or a hand edit of the output) fails."""
    python = _generator_python()
    if python is not None:
        written = generate.generate(tmp_path, python=python)
        assert [p.name for p in written] == list(generate.GENERATED_FILES)
        for name in generate.GENERATED_FILES:
            fresh = (tmp_path / name).read_bytes()
            committed = (generate.PROTO_DIR / name).read_bytes()
            assert fresh == committed, f"{name} is stale: run protocols.proto.generate"
    _check_descriptor_matches_source()


def test_generated_code_is_postprocessed() -> None:
    """The gRPC module must import its messages package-absolutely, unlinted."""
    for name in generate.GENERATED_FILES:
        text = (generate.PROTO_DIR / name).read_text(encoding="utf-8")
        assert text.startswith("# ruff: noqa\n"), name
    grpc_text = (generate.PROTO_DIR / "trunk_pb2_grpc.py").read_text(encoding="utf-8")
    assert "from protocols.proto import trunk_pb2 as trunk__pb2" in grpc_text
    assert "\nimport trunk_pb2" not in grpc_text
    assert f"GRPC_GENERATED_VERSION = '{generate.GRPC_TOOLS_VERSION}'" in grpc_text


def test_missing_generator_says_how_to_install(tmp_path: Path) -> None:
    """Without grpc_tools the script must print the pinned install command."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(generate.GenerationError) as info:
        generate.generate(tmp_path / "out", python=str(fake))
    assert (
        f"pip install grpcio-tools=={generate.GRPC_TOOLS_VERSION} "
        f"protobuf=={generate.PROTOBUF_VERSION}" in str(info.value)
    )
    assert not (tmp_path / "out").exists()
