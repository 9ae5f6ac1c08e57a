"""The edge model: an edge bundle's loss graph on ONNX Runtime over NumPy buffers.

The perturbed parameters live in float32 NumPy arrays (w0 from the bundle)
that ONNX Runtime reads directly: each is wrapped once in an ``OrtValue``,
which shares a CPU array's memory, and bound once with I/O binding. The seed
kernels of :mod:`protocols.seed_arrays` change those arrays in place, and the
next :meth:`EdgeModel.loss` sees the change: no copy and no rebinding per
step. Only the batch (three small int64 arrays) is bound per call.

Text becomes batches exactly as on a torch client: the prompt template and
masking rule of :mod:`models.text`, ids from the bundle's ``tokenizer.json``
(the ``tokenizers`` package), right-padded int64 arrays as
:func:`models.batching.collate_train` makes. Nothing here imports torch,
transformers or PEFT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # type: ignore[import-untyped]
from tokenizers import Tokenizer

from models.text import IGNORE_INDEX, TokenizedExample, format_prompt, tokenize_ids
from protocols.edge_bundle import (
    GRAPH_INPUTS,
    LOSS_OUTPUT,
    EdgeBundle,
    EdgeBundleError,
    read_bundle,
)

__all__ = ["EdgeBatch", "EdgeModel", "collate"]

Int64Array = npt.NDArray[np.int64]
Float32Array = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class EdgeBatch:
    """A right-padded batch: ids, attention mask and labels, each int64 (B, T)."""

    input_ids: Int64Array
    attention_mask: Int64Array
    labels: Int64Array


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> EdgeBatch:
    """Right-pad tokenized examples into one :class:`EdgeBatch`.

    The same arrays as :func:`models.batching.collate_train`'s tensors.

    Raises
    ------
    ValueError
        If there are no examples.
    """
    if not examples:
        raise ValueError("a batch needs at least one example")
    width = max(len(e.input_ids) for e in examples)
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(examples), width), dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = e.input_ids
        mask[row, :n] = 1
        labels[row, :n] = e.labels
    return EdgeBatch(ids, mask, labels)


class EdgeModel:
    """A bundle's model, ready to evaluate its loss; build with :meth:`open`.

    Attributes
    ----------
    bundle : EdgeBundle
        The validated bundle it was opened from.
    """

    def __init__(
        self,
        bundle: EdgeBundle,
        session: ort.InferenceSession,
        params: list[tuple[str, Float32Array]],
        tokenizer: Tokenizer,
    ) -> None:
        self.bundle = bundle
        self._session = session
        self._params = params
        self._tokenizer = tokenizer
        self._binding = session.io_binding()
        # The OrtValues share the arrays' memory; keep them alive with the binding.
        self._values = []
        for name, array in params:
            value = ort.OrtValue.ortvalue_from_numpy(array)
            self._binding.bind_ortvalue_input(name, value)
            self._values.append(value)
        self._binding.bind_output(LOSS_OUTPUT)

    @classmethod
    def open(
        cls, bundle: EdgeBundle | Path | str, *, threads: int | None = None
    ) -> EdgeModel:
        """Validate (a path is read with :func:`read_bundle`) and load a bundle.

        Parameters
        ----------
        bundle
            A bundle read already, or its folder.
        threads
            ONNX Runtime's intra-op threads; None lets it choose (all cores).

        Raises
        ------
        EdgeBundleError
            If the bundle is damaged or its graph's inputs differ from the walk.
        """
        if not isinstance(bundle, EdgeBundle):
            bundle = read_bundle(bundle)
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        if threads is not None:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(
            str(bundle.model_file), options, providers=["CPUExecutionProvider"]
        )
        inputs = [i.name for i in session.get_inputs()]
        expected = [*GRAPH_INPUTS, *bundle.walk.names]
        if inputs != expected:
            raise EdgeBundleError(
                f"bundle {bundle.path}: model.onnx takes inputs {inputs[:5]}..., "
                f"the walk needs {expected[:5]}..."
            )
        tokenizer = Tokenizer.from_file(str(bundle.tokenizer_file))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return cls(bundle, session, bundle.load_w0(), tokenizer)

    def params(self) -> list[tuple[str, Float32Array]]:
        """The perturbed parameters in walk order: the live, bound arrays.

        Change them in place only (``protocols.seed_arrays`` does); a new
        array would not be seen by the graph.
        """
        return list(self._params)

    @property
    def pad_id(self) -> int:
        """Padding token id."""
        return self.bundle.pad_id

    def loss(self, batch: EdgeBatch) -> float:
        """The mean causal-LM loss of ``batch`` under the current parameters."""
        binding = self._binding
        binding.bind_cpu_input(GRAPH_INPUTS[0], batch.input_ids)
        binding.bind_cpu_input(GRAPH_INPUTS[1], batch.attention_mask)
        binding.bind_cpu_input(GRAPH_INPUTS[2], batch.labels)
        self._session.run_with_iobinding(binding)
        out: Any = binding.get_outputs()[0].numpy()
        return float(out)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
        return ids

    def tokenize(self, prompt: str, response: str) -> TokenizedExample:
        """One example, exactly as :func:`models.batching.tokenize_example` does."""
        return tokenize_ids(
            self.encode(format_prompt(prompt)),
            self.encode(response.strip()),
            self.bundle.eos_id,
            self.bundle.max_length,
        )
