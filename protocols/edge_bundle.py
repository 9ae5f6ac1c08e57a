"""The edge bundle: what an inference-only device needs to join a FedKSeed run.

A bundle is a folder of four files, written on the server side
(:mod:`models.edge_export`) and read on the device (:func:`read_bundle`):

``model.onnx``
    The model's mean causal-LM loss (Hugging Face semantics: shifted labels,
    tokens labelled ``-100`` ignored) as one scalar float32 output ``loss``.
    Graph inputs: ``input_ids``, ``attention_mask``, ``labels`` (int64, shape
    ``(batch, length)``, both dynamic), then one float32 input per perturbed
    parameter, named exactly as in the parameter walk
    (:class:`protocols.param_walk.ParamWalk`), in walk order. Every other
    parameter is an initializer of the graph.
``w0.safetensors``
    The perturbed parameters' initial values w0, float32, under walk names.
``tokenizer.json``
    The tokenizer (the ``tokenizers`` package reads it; no transformers).
``bundle.json``
    The format version; the run's :class:`protocols.specs.ZOSpec` as it
    travels (its config record, schema version and fingerprint included); the
    walk (fingerprint, names and shapes in order); the generator version
    (:data:`protocols.philox.GENERATOR_VERSION`); pad and eos token ids;
    ``max_length``; the export check (largest |ONNX Runtime - PyTorch| loss on
    real examples, and the tolerance it passed); and the SHA-256 of each of
    the three other files.

This module is the one owner of that format: it writes ``w0.safetensors``
and ``bundle.json`` and reads and validates a whole bundle. It imports
NumPy, ``safetensors.numpy`` and the torch-free parts of :mod:`protocols`
only, so a device without torch can use it. Every check fails with one
:class:`EdgeBundleError` line that names the bundle and what differs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from protocols.durable import atomic_write_text
from protocols.errors import ProtocolError
from protocols.manifest import file_sha256
from protocols.param_walk import ParamWalk
from protocols.philox import GENERATOR_VERSION
from protocols.specs import ZOSpec

__all__ = [
    "BUNDLE_FILE",
    "FORMAT_VERSION",
    "GRAPH_INPUTS",
    "LOSS_OUTPUT",
    "MODEL_FILE",
    "TOKENIZER_FILE",
    "W0_FILE",
    "EdgeBundle",
    "EdgeBundleError",
    "check_spec_fits",
    "read_bundle",
    "write_bundle_json",
    "write_w0",
]

FORMAT_VERSION = 1
FORMAT_NAME = "pollinate-edge-bundle"
BUNDLE_FILE = "bundle.json"
MAX_RECORD_BYTES = 16 * 1024 * 1024
"""Largest ``bundle.json`` read (a full walk of a 1B-parameter model lists
a few hundred names: ~100 KB)."""
MODEL_FILE = "model.onnx"
W0_FILE = "w0.safetensors"
TOKENIZER_FILE = "tokenizer.json"
GRAPH_INPUTS = ("input_ids", "attention_mask", "labels")
"""The graph inputs before the perturbed parameters, in this order."""
LOSS_OUTPUT = "loss"
_HASHED = (MODEL_FILE, W0_FILE, TOKENIZER_FILE)
_KEYS = {
    "format": str,
    "format_version": int,
    "spec": dict,
    "walk": dict,
    "generator": str,
    "pad_id": int,
    "eos_id": int,
    "max_length": int,
    "check": dict,
    "files": dict,
}

Float32Array = npt.NDArray[np.float32]


class EdgeBundleError(ProtocolError):
    """A bundle that is damaged, altered, or made for another run."""


def _check_array(where: Path, name: str, shape: tuple[int, ...], a: Any) -> None:
    """One w0 tensor: float32, of the walk's shape, finite."""
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        raise EdgeBundleError(
            f"{where}: parameter '{name}' has dtype "
            f"{getattr(a, 'dtype', type(a).__name__)}, not float32"
        )
    if tuple(a.shape) != shape:
        raise EdgeBundleError(
            f"{where}: parameter '{name}' has shape {tuple(a.shape)}, the walk "
            f"lists {shape}"
        )
    if not bool(np.isfinite(a).all()):
        raise EdgeBundleError(f"{where}: parameter '{name}' holds NaN or Inf")


def _check_names(where: Path, walk: ParamWalk, names: set[str]) -> None:
    """The names are exactly the walk's."""
    extra = sorted(names - set(walk.names))
    if extra:
        raise EdgeBundleError(f"{where}: '{extra[0]}' is not in the walk")
    for name in walk.names:
        if name not in names:
            raise EdgeBundleError(f"{where} lacks parameter '{name}' of the walk")


def _checked_w0(
    where: Path, walk: ParamWalk, arrays: Mapping[str, Any]
) -> list[tuple[str, Float32Array]]:
    """``arrays`` in walk order, checked: names, shapes, float32, finite.

    Raises
    ------
    EdgeBundleError
        Naming the first parameter that differs from the walk.
    """
    _check_names(where, walk, set(arrays))
    out: list[tuple[str, Float32Array]] = []
    for name, shape in zip(walk.names, walk.shapes, strict=True):
        _check_array(where, name, shape, arrays[name])
        out.append((name, np.ascontiguousarray(arrays[name])))
    return out


def write_w0(out: Path, walk: ParamWalk, params: Sequence[tuple[str, Any]]) -> Path:
    """Write ``out/w0.safetensors`` from ``(name, float32 array)`` in walk order.

    Raises
    ------
    EdgeBundleError
        If the arrays do not match the walk or one is not finite.
    """
    path = out / W0_FILE
    arrays = _checked_w0(path, walk, dict(params))
    save_file(dict(arrays), str(path))
    return path


def check_spec_fits(spec: ZOSpec, walk: ParamWalk) -> None:
    """Refuse a spec made for another walk or generator than ``walk`` and this side's.

    Raises
    ------
    EdgeBundleError
        Naming the field that differs.
    """
    if spec.walk_fingerprint != walk.fingerprint():
        raise EdgeBundleError(
            f"spec walk_fingerprint {spec.walk_fingerprint} differs from the "
            f"walk's {walk.fingerprint()}"
        )
    if spec.generator != GENERATOR_VERSION:
        raise EdgeBundleError(
            f"spec generator {spec.generator!r} is not this side's "
            f"{GENERATOR_VERSION!r}"
        )


def write_bundle_json(
    out: Path,
    *,
    spec: ZOSpec,
    walk: ParamWalk,
    pad_id: int,
    eos_id: int,
    max_abs_loss_diff: float,
    tolerance: float,
    examples: int,
) -> dict[str, Any]:
    """Write ``out/bundle.json`` over the other files already in ``out``.

    Call it last: it records the SHA-256 of ``model.onnx``,
    ``w0.safetensors`` and ``tokenizer.json``, and the bundle is complete only
    once it exists. Returns the record written.

    Raises
    ------
    EdgeBundleError
        If a file is missing, or the spec does not fit the walk or the
        generator.
    """
    check_spec_fits(spec, walk)
    files: dict[str, str] = {}
    for name in _HASHED:
        if not (out / name).is_file():
            raise EdgeBundleError(f"bundle {out} has no {name}")
        files[name] = file_sha256(out / name)
    record: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "spec": dict(spec.to_config_record()),
        "walk": {
            "fingerprint": walk.fingerprint(),
            "names": list(walk.names),
            "shapes": [list(s) for s in walk.shapes],
        },
        "generator": GENERATOR_VERSION,
        "pad_id": int(pad_id),
        "eos_id": int(eos_id),
        "max_length": spec.max_length,
        "check": {
            "max_abs_loss_diff": float(max_abs_loss_diff),
            "tolerance": float(tolerance),
            "examples": int(examples),
        },
        "files": files,
    }
    atomic_write_text(out / BUNDLE_FILE, json.dumps(record, indent=1))
    return record


@dataclass(frozen=True, slots=True)
class EdgeBundle:
    """A validated bundle (see the module docstring); build with :func:`read_bundle`.

    Attributes
    ----------
    path
        The bundle folder.
    spec
        The run's spec the bundle was made for.
    walk
        The perturbed parameters, in order.
    pad_id, eos_id
        Padding and end-of-sequence token ids.
    max_length
        Token budget of one example (the spec's).
    max_abs_loss_diff, tolerance
        The export check: ONNX Runtime's loss differed from PyTorch's by at
        most ``max_abs_loss_diff <= tolerance``.
    """

    path: Path
    spec: ZOSpec
    walk: ParamWalk
    pad_id: int
    eos_id: int
    max_length: int
    max_abs_loss_diff: float
    tolerance: float

    @property
    def model_file(self) -> Path:
        """The ONNX graph."""
        return self.path / MODEL_FILE

    @property
    def tokenizer_file(self) -> Path:
        """The ``tokenizers`` JSON file."""
        return self.path / TOKENIZER_FILE

    def load_w0(self) -> list[tuple[str, Float32Array]]:
        """Fresh writable float32 copies of w0, in walk order, checked again.

        Raises
        ------
        EdgeBundleError
            If the file is unreadable or differs from the walk.
        """
        path = self.path / W0_FILE
        try:
            arrays = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise EdgeBundleError(f"{path} is unreadable: {exc}") from None
        return _checked_w0(path, self.walk, arrays)

    def check_spec(self, spec: ZOSpec) -> None:
        """Refuse a spec (from a server instruction) other than the bundle's.

        Raises
        ------
        EdgeBundleError
            Naming the first field that differs, or the fingerprint.
        """
        for f in dataclasses.fields(ZOSpec):
            mine, theirs = getattr(self.spec, f.name), getattr(spec, f.name)
            if mine != theirs:
                raise EdgeBundleError(
                    f"bundle {self.path} was made for ZOSpec.{f.name}={mine!r}, "
                    f"the server's spec has {theirs!r}: export a new bundle"
                )
        if spec.fingerprint() != self.spec.fingerprint():  # pragma: no cover
            raise EdgeBundleError(
                f"bundle {self.path}: spec fingerprint {self.spec.fingerprint()} "
                f"differs from the server's {spec.fingerprint()}"
            )


def _record(path: Path) -> dict[str, Any]:
    """``bundle.json`` parsed, with its keys and their types checked."""
    file = path / BUNDLE_FILE
    try:
        with file.open("rb") as f:
            raw = f.read(MAX_RECORD_BYTES + 1)
        if len(raw) > MAX_RECORD_BYTES:
            raise EdgeBundleError(
                f"bundle {path}: {BUNDLE_FILE} is larger than {MAX_RECORD_BYTES} bytes"
            )
        data = json.loads(raw.decode("utf-8"))
    except OSError:
        raise EdgeBundleError(f"bundle {path} has no readable {BUNDLE_FILE}") from None
    except ValueError as exc:
        raise EdgeBundleError(
            f"bundle {path}: {BUNDLE_FILE} is not JSON: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise EdgeBundleError(f"bundle {path}: {BUNDLE_FILE} is not a JSON object")
    if data.get("format") != FORMAT_NAME:
        raise EdgeBundleError(
            f"bundle {path}: format {data.get('format')!r} is not {FORMAT_NAME!r}"
        )
    if data.get("format_version") != FORMAT_VERSION:
        raise EdgeBundleError(
            f"bundle {path}: format version {data.get('format_version')!r} is not "
            f"supported (this side reads {FORMAT_VERSION})"
        )
    if set(data) != set(_KEYS):
        raise EdgeBundleError(
            f"bundle {path}: {BUNDLE_FILE} keys {sorted(data)} are not {sorted(_KEYS)}"
        )
    for key, kind in _KEYS.items():
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise EdgeBundleError(
                f"bundle {path}: {BUNDLE_FILE} field '{key}' must be a "
                f"{kind.__name__}, got {value!r}"
            )
    return data


def _walk(path: Path, data: Mapping[str, Any]) -> ParamWalk:
    """The walk the record lists, its fingerprint recomputed and compared."""
    walk = data["walk"]
    names, shapes = walk.get("names"), walk.get("shapes")
    if not isinstance(names, list) or not isinstance(shapes, list):
        raise EdgeBundleError(f"bundle {path}: walk must list names and shapes")
    try:
        listed = ParamWalk(
            tuple(names), tuple(tuple(s) if isinstance(s, list) else s for s in shapes)
        )
    except ProtocolError as exc:
        raise EdgeBundleError(f"bundle {path}: {exc}") from None
    if walk.get("fingerprint") != listed.fingerprint():
        raise EdgeBundleError(
            f"bundle {path}: walk fingerprint {walk.get('fingerprint')!r} differs "
            f"from {listed.fingerprint()} of the names and shapes it lists"
        )
    return listed


def _check_files(path: Path, files: Mapping[str, Any]) -> None:
    """Every other file present, and its SHA-256 the recorded one."""
    if set(files) != set(_HASHED):
        raise EdgeBundleError(
            f"bundle {path}: {BUNDLE_FILE} hashes {sorted(files)}, not "
            f"{sorted(_HASHED)}"
        )
    for name in _HASHED:
        file = path / name
        if not file.is_file():
            raise EdgeBundleError(f"bundle {path} has no {name}")
        got = file_sha256(file)
        if got != files[name]:
            raise EdgeBundleError(
                f"bundle {path}: {name} sha256 {got[:16]}... differs from "
                f"{BUNDLE_FILE}'s {str(files[name])[:16]}..."
            )


def _check_w0_file(path: Path, walk: ParamWalk) -> None:
    """w0's names, shapes, dtype and finiteness, one tensor in memory at a time."""
    file = path / W0_FILE
    try:
        with safe_open(str(file), framework="np") as f:
            _check_names(file, walk, set(f.keys()))
            for name, shape in zip(walk.names, walk.shapes, strict=True):
                _check_array(file, name, shape, f.get_tensor(name))
    except (SafetensorError, OSError) as exc:
        raise EdgeBundleError(f"{file} is unreadable: {exc}") from None


def read_bundle(path: Path | str) -> EdgeBundle:
    """Read and validate the bundle in folder ``path`` before any use.

    Checks, in order: ``bundle.json``'s form and format version; the SHA-256
    of every other file; the walk's fingerprint recomputed from the names and
    shapes it lists; the spec (decoded and checked like one from the wire),
    its walk fingerprint, generator and ``max_length`` against the record and
    this side's :data:`GENERATOR_VERSION`; w0's names, shapes, dtype and
    finiteness against the walk.

    Raises
    ------
    EdgeBundleError
        One line naming the bundle and the first thing that differs.
    """
    path = Path(path)
    data = _record(path)
    _check_files(path, data["files"])
    walk = _walk(path, data)
    try:
        spec = ZOSpec.from_config_record(data["spec"])
    except ProtocolError as exc:
        raise EdgeBundleError(f"bundle {path}: {exc}") from None
    if data["generator"] != GENERATOR_VERSION:
        raise EdgeBundleError(
            f"bundle {path}: generator {data['generator']!r} differs from this "
            f"side's {GENERATOR_VERSION!r}"
        )
    for field, mine, theirs in (
        ("walk_fingerprint", spec.walk_fingerprint, walk.fingerprint()),
        ("generator", spec.generator, data["generator"]),
        ("max_length", spec.max_length, data["max_length"]),
    ):
        if mine != theirs:
            raise EdgeBundleError(
                f"bundle {path}: spec {field} {mine!r} differs from the bundle's "
                f"{theirs!r}"
            )
    check = data["check"]
    diff, tolerance = check.get("max_abs_loss_diff"), check.get("tolerance")
    if not (
        isinstance(diff, float | int)
        and isinstance(tolerance, float | int)
        and math.isfinite(diff)
        and 0 <= diff <= tolerance
    ):
        raise EdgeBundleError(
            f"bundle {path}: export check {diff!r} is not within tolerance "
            f"{tolerance!r}"
        )
    _check_w0_file(path, walk)
    return EdgeBundle(
        path=path,
        spec=spec,
        walk=walk,
        pad_id=data["pad_id"],
        eos_id=data["eos_id"],
        max_length=data["max_length"],
        max_abs_loss_diff=float(diff),
        tolerance=float(tolerance),
    )
