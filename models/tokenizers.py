"""An offline byte-level tokenizer for tiny test models.

Tiny models built from a config need a tokenizer that downloads nothing and
covers any text. This one maps each UTF-8 byte to one token (256 tokens) plus
``<pad>`` and ``<eos>``; it is a ``PreTrainedTokenizerFast`` so the rest of
the code treats it like any Hugging Face tokenizer.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerFast

__all__ = ["BYTE_VOCAB_SIZE", "byte_tokenizer"]

BYTE_VOCAB_SIZE = 258  # 256 bytes + <pad> + <eos>


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Return a byte-level tokenizer with ids 0..255 for bytes, 256 pad, 257 eos."""
    alphabet = ByteLevel.alphabet()
    # ByteLevel's alphabet maps bytes to printable characters; order it by byte.
    chars = sorted(alphabet, key=_byte_of)
    vocab = {ch: i for i, ch in enumerate(chars)}
    vocab["<pad>"] = 256
    vocab["<eos>"] = 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>"
    )
    fast.add_special_tokens({"pad_token": "<pad>", "eos_token": "<eos>"})
    return fast


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character."""
    code = ord(ch)
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
