"""The edge bundle: export, the ORT-vs-torch check, and refusal of tampering."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.numpy import load_file, save_file

from models.edge_export import LOSS_TOLERANCE, EdgeExportError, export_edge_bundle
from protocols.edge_bundle import (
    BUNDLE_FILE,
    GRAPH_INPUTS,
    MODEL_FILE,
    W0_FILE,
    EdgeBundleError,
    read_bundle,
)
from protocols.errors import ProtocolError
from tests.edge.conftest import TinyZo, tiny_zo, tokenized

MakeBundle = Callable[[TinyZo], Path]


def _graph_io(path: Path) -> tuple[list[str], set[str]]:
    graph = onnx.load(str(path / MODEL_FILE)).graph
    return [i.name for i in graph.input], {i.name for i in graph.initializer}


def test_export_writes_a_bundle_that_read_bundle_accepts(
    zo: TinyZo, make_bundle: MakeBundle
) -> None:
    """Four files; the record names the spec, walk and generator; the graph's
    inputs are the batch then every walk parameter, and none of them is baked
    in as an initializer."""
    path = make_bundle(zo)
    bundle = read_bundle(path)
    assert bundle.spec == zo.spec
    assert bundle.walk == zo.walk
    assert (bundle.pad_id, bundle.eos_id) == (256, 257)
    assert 0 <= bundle.max_abs_loss_diff <= bundle.tolerance == LOSS_TOLERANCE
    inputs, initializers = _graph_io(path)
    assert inputs == [*GRAPH_INPUTS, *zo.walk.names]
    assert not initializers & set(zo.walk.names)
    w0 = dict(bundle.load_w0())
    for name, p in zo.walk.params(zo.model):
        assert np.array_equal(w0[name], p.detach().numpy())


def test_subset_walk_makes_only_those_parameters_graph_inputs(
    make_bundle: MakeBundle,
) -> None:
    """With ``include`` globs only the selected tensors are inputs; the rest
    stay in the graph, and the loss still equals PyTorch's."""
    from client.edge.engine import EdgeModel, collate

    zo = tiny_zo(["model.layers.1.*"])
    path = make_bundle(zo)
    inputs, initializers = _graph_io(path)
    assert inputs[3:] == list(zo.walk.names)
    assert all(n.startswith("model.layers.1.") for n in inputs[3:])
    assert len(inputs[3:]) == 9  # 7 linear weights and 2 norms of one layer
    assert initializers  # the other weights live in the graph
    examples = tokenized(zo, 5)
    model = EdgeModel.open(path, threads=1)
    got = model.loss(collate(examples, model.pad_id))
    assert abs(got - zo.batch_loss(examples)) <= LOSS_TOLERANCE


def test_non_finite_weight_is_refused_at_export(tmp_path: Path) -> None:
    """A NaN anywhere in the model (here outside the walk) stops the export,
    naming the parameter, and leaves no folder behind."""
    zo = tiny_zo(["model.layers.1.*"])
    with torch.no_grad():
        zo.model.model.layers[0].mlp.up_proj.weight[3, 4] = float("nan")
    out = tmp_path / "bundle"
    with pytest.raises(EdgeExportError, match="model.layers.0.mlp.up_proj.weight"):
        export_edge_bundle(
            zo.model, zo.tokenizer, zo.walk, zo.spec, out, tokenized(zo, 2)
        )
    assert not out.exists()


def test_export_refuses_a_non_empty_folder(zo: TinyZo, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(EdgeExportError, match="not empty"):
        export_edge_bundle(
            zo.model, zo.tokenizer, zo.walk, zo.spec, out, tokenized(zo, 2)
        )
    assert (out / "keep.txt").read_text() == "mine"


def test_export_refuses_a_spec_of_another_walk(zo: TinyZo, tmp_path: Path) -> None:
    spec = dataclasses.replace(zo.spec, walk_fingerprint="0" * 16)
    with pytest.raises(EdgeBundleError, match="walk_fingerprint"):
        export_edge_bundle(
            zo.model, zo.tokenizer, zo.walk, spec, tmp_path / "b", tokenized(zo, 2)
        )
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------ tampering
def _flip_byte(file: Path, offset_from_end: int = 100) -> None:
    data = bytearray(file.read_bytes())
    data[-offset_from_end] ^= 0x01
    file.write_bytes(bytes(data))


def _edit_record(path: Path, edit: Callable[[dict], None]) -> None:
    record = json.loads((path / BUNDLE_FILE).read_text())
    edit(record)
    (path / BUNDLE_FILE).write_text(json.dumps(record))


def _nan_w0(path: Path) -> None:
    """w0 with one NaN, its hash updated so only the value check can see it."""
    import hashlib

    arrays = load_file(str(path / W0_FILE))
    name = next(iter(arrays))
    arrays[name].reshape(-1)[0] = np.nan
    save_file(arrays, str(path / W0_FILE))
    digest = hashlib.sha256((path / W0_FILE).read_bytes()).hexdigest()
    _edit_record(path, lambda r: r["files"].__setitem__(W0_FILE, digest))


def _set(*keys: str, value: object) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        def change(record: dict) -> None:
            node = record
            for k in keys[:-1]:
                node = node[k]
            node[keys[-1]] = value

        _edit_record(path, change)

    return edit


TAMPERING = {
    "model-byte": (lambda p: _flip_byte(p / MODEL_FILE), "model.onnx sha256"),
    "w0-byte": (lambda p: _flip_byte(p / W0_FILE), "w0.safetensors sha256"),
    "w0-nan": (_nan_w0, "holds NaN or Inf"),
    "spec-eps": (_set("spec", "eps", value=0.5), "altered"),
    "walk-name": (
        _set("walk", "names", value=["model.norm.weight"] * 1),
        "ParamWalk has 1 names",
    ),
    "walk-fingerprint": (
        _set("walk", "fingerprint", value="f" * 16),
        "walk fingerprint",
    ),
    "generator": (_set("generator", value="other/9"), "generator"),
    "format-version": (_set("format_version", value=2), "format version 2"),
    "max-length": (_set("max_length", value=99), "max_length"),
    "missing-key": (lambda p: _edit_record(p, lambda r: r.pop("eos_id")), "keys"),
    "bad-type": (_set("pad_id", value="256"), "'pad_id' must be a int"),
    "bad-check": (_set("check", "max_abs_loss_diff", value=1.0), "tolerance"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampered_bundle_is_refused_naming_what_differs(
    bundle_copy: Path, case: str
) -> None:
    path = bundle_copy
    read_bundle(path)  # intact first
    tamper, expected = TAMPERING[case]
    tamper(path)
    with pytest.raises(EdgeBundleError, match=expected) as info:
        read_bundle(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_removed_file_is_refused(bundle_copy: Path) -> None:
    path = bundle_copy
    (path / "tokenizer.json").unlink()
    with pytest.raises(EdgeBundleError, match="has no tokenizer.json"):
        read_bundle(path)
    shutil.rmtree(path)
    with pytest.raises(EdgeBundleError, match="no readable bundle.json"):
        read_bundle(path)


def test_spec_of_another_run_is_refused_naming_the_field(
    zo: TinyZo, pristine_bundle: Path
) -> None:
    bundle = read_bundle(pristine_bundle)
    bundle.check_spec(zo.spec)  # its own spec passes
    for field, value in (
        ("eps", 0.5),
        ("walk_fingerprint", "0" * 16),
        ("generator", "philox/0"),
        ("num_seeds", 17),
    ):
        other = dataclasses.replace(zo.spec, **{field: value})
        with pytest.raises(EdgeBundleError, match=f"ZOSpec.{field}="):
            bundle.check_spec(other)
    assert issubclass(EdgeBundleError, ProtocolError)


def test_adapter_mode_bundle_perturbs_only_the_adapter(tmp_path: Path) -> None:
    """ZO over LoRA adapters: the graph's walk inputs are the A and B matrices;
    the loss follows a perturbation of them as torch's does."""
    from client.edge.engine import EdgeModel, collate
    from models.zo_model import zo_model_for
    from protocols.seed_arrays import perturb_arrays
    from protocols.seeds import perturb_

    base = tiny_zo()
    spec = dataclasses.replace(
        base.spec, adapter_rank=2, adapter_targets=("q_proj", "v_proj")
    )
    zm = zo_model_for(spec)
    spec = dataclasses.replace(spec, walk_fingerprint=zm.walk.fingerprint())
    zo = TinyZo(zm.model, zm.tokenizer, zm.walk, spec)
    out = tmp_path / "bundle"
    export_edge_bundle(zo.model, zo.tokenizer, zo.walk, spec, out, tokenized(zo, 4))
    inputs, _ = _graph_io(out)
    assert inputs[3:] == list(zo.walk.names)
    assert len(inputs[3:]) == 8  # A and B of q_proj and v_proj in 2 layers
    assert all("lora_A" in n or "lora_B" in n for n in inputs[3:])
    model = EdgeModel.open(out, threads=1)
    examples = tokenized(zo, 3)
    perturb_arrays(model.params(), 11, 0.1)
    perturb_(zo.walk.params(zo.model), 11, 0.1)
    got = model.loss(collate(examples, model.pad_id))
    assert abs(got - zo.batch_loss(examples)) <= LOSS_TOLERANCE
    assert read_bundle(out).spec.adapter_rank == 2


def test_oversized_bundle_json_is_refused_before_parsing(
    bundle_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import protocols.edge_bundle as edge_bundle

    record = bundle_copy / "bundle.json"
    size = record.stat().st_size
    read_bundle(bundle_copy)  # within the limit: accepted
    monkeypatch.setattr(edge_bundle, "MAX_RECORD_BYTES", size - 1)
    with pytest.raises(EdgeBundleError, match="larger than"):
        read_bundle(bundle_copy)
