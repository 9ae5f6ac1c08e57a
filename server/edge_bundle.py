"""The edge bundle of a FedKSeed run: what ``pollinate export --format edge`` writes.

A bundle (:mod:`protocols.edge_bundle`) holds w0 of the run's spec, so an
operator prepares it before the run from the config file, or at any time
from the run folder: both give the same bundle. The spec is the one the
server's plug-in builds (:func:`server.methods.build_spec`, on a weightless
skeleton) and the model the one :func:`models.zo_model.zo_model_for` builds
for it, as every other party does. The export check runs on up to
:data:`CHECK_EXAMPLES` of the run's examples: the held-out set of a run
folder, or the first examples of the configured data source.
"""

from __future__ import annotations

from pathlib import Path

from corpora import Example, load_examples, read_jsonl
from models.batching import tokenize_example
from protocols import ProtocolError, ZOSpec
from protocols.methods import get_method
from protocols.run_folder import RunFolder
from server.config import RunConfig, load_config
from server.export import ExportError
from server.methods import build_spec

__all__ = ["CHECK_EXAMPLES", "export_edge"]

CHECK_EXAMPLES = 8
"""Examples of the run's data the export check evaluates (alone and padded)."""


def _source(source: Path) -> tuple[RunConfig, list[Example]]:
    """The config and a few examples of a run folder or a config file."""
    if source.is_dir():
        folder = RunFolder(source)
        config = load_config(folder.config)
        try:
            examples = read_jsonl(folder.eval_data)
        except (OSError, ValueError) as exc:
            raise ExportError(f"{folder.eval_data} is unreadable: {exc}") from None
    else:
        config = load_config(source)
        examples = load_examples(
            config.data.source, limit=config.data.limit, seed=config.run.seed
        )
    return config, examples[:CHECK_EXAMPLES]


def export_edge(source: Path, out: Path) -> Path:
    """Write the edge bundle of a FedKSeed run into the new folder ``out``.

    Parameters
    ----------
    source
        A run folder, or the run's config file (before the run).
    out
        A folder that does not exist or is empty.

    Raises
    ------
    ExportError
        If the run's method is not seed-based zeroth-order, there are no
        examples, ``out`` is not empty, or the bundle's check fails (one line).
    """
    from models.edge_export import EdgeExportError, export_edge_bundle
    from models.zo_model import zo_model_for

    config, examples = _source(source)
    method = get_method(config.run.method)
    if "edge" not in method.exports:
        raise ExportError(
            f"method {method.name} exports {list(method.exports)}, not 'edge': "
            "edge bundles are for seed-based zeroth-order runs"
        )
    if not examples:
        raise ExportError(f"{source} has no examples to check the bundle on")
    try:
        spec = build_spec(config)
        if not isinstance(spec, ZOSpec):  # pragma: no cover - registry says ZO
            raise ExportError(f"method {method.name} has no ZOSpec")
        zo = zo_model_for(spec)  # export_edge_bundle checks its walk vs the spec
        tokenized = [
            tokenize_example(e, zo.tokenizer, spec.max_length) for e in examples
        ]
        export_edge_bundle(zo.model, zo.tokenizer, zo.walk, spec, out, tokenized)
    except (EdgeExportError, ProtocolError) as exc:
        raise ExportError(f"edge export of {source}: {exc}") from None
    return out
