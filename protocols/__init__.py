"""The wire contract between Pollinate servers and clients.

Everything both sides must agree on bit for bit lives here: the tensor codec,
method specs, message payloads and byte accounting. Nothing here trains,
reads files or opens sockets.

Importing this package is cheap: each public name is imported from its module
(some of which need torch or Flower) on first use, so ``pollinate --help``
and :mod:`protocols.installation` stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocols.lazy import lazy_exports

if TYPE_CHECKING:
    from protocols.codecs import (
        CODEC_VERSION,
        DEFAULT_MAX_PAYLOAD_BYTES,
        SUPPORTED_DTYPES,
        TensorEntry,
        TensorLayout,
        decode_arrays,
        decode_tensors,
        encode_arrays,
        encode_tensors,
    )
    from protocols.errors import (
        OutOfSyncError,
        PayloadTooLargeError,
        ProtocolError,
        SpecMismatchError,
    )
    from protocols.installation import InstallationError, check_installation
    from protocols.ledger import ByteLedger, LedgerEntry, payload_bytes
    from protocols.messages import (
        MESSAGE_HELLO,
        MESSAGE_TRAIN_LORA,
        LocalTrainConfig,
        LoraTrainIns,
        LoraTrainRes,
        NodeHello,
        RoundSchedule,
        decode_hello,
        decode_lora_train_ins,
        decode_lora_train_res,
        encode_hello,
        encode_lora_train_ins,
        encode_lora_train_res,
    )
    from protocols.model_hash import state_hash
    from protocols.specs import LoraSpec, SplitSpec, ZOSpec

__all__ = [
    "CODEC_VERSION",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "MESSAGE_HELLO",
    "MESSAGE_TRAIN_LORA",
    "SUPPORTED_DTYPES",
    "ByteLedger",
    "InstallationError",
    "LedgerEntry",
    "LocalTrainConfig",
    "LoraSpec",
    "LoraTrainIns",
    "LoraTrainRes",
    "NodeHello",
    "OutOfSyncError",
    "RoundSchedule",
    "PayloadTooLargeError",
    "ProtocolError",
    "SpecMismatchError",
    "SplitSpec",
    "TensorEntry",
    "TensorLayout",
    "ZOSpec",
    "check_installation",
    "decode_arrays",
    "decode_hello",
    "decode_lora_train_ins",
    "decode_lora_train_res",
    "decode_tensors",
    "encode_arrays",
    "encode_hello",
    "encode_lora_train_ins",
    "encode_lora_train_res",
    "encode_tensors",
    "payload_bytes",
    "state_hash",
]

_LAZY = {
    "CODEC_VERSION": "protocols.codecs",
    "DEFAULT_MAX_PAYLOAD_BYTES": "protocols.codecs",
    "MESSAGE_HELLO": "protocols.messages",
    "MESSAGE_TRAIN_LORA": "protocols.messages",
    "SUPPORTED_DTYPES": "protocols.codecs",
    "ByteLedger": "protocols.ledger",
    "InstallationError": "protocols.installation",
    "LedgerEntry": "protocols.ledger",
    "LocalTrainConfig": "protocols.messages",
    "LoraSpec": "protocols.specs",
    "LoraTrainIns": "protocols.messages",
    "LoraTrainRes": "protocols.messages",
    "NodeHello": "protocols.messages",
    "OutOfSyncError": "protocols.errors",
    "RoundSchedule": "protocols.messages",
    "PayloadTooLargeError": "protocols.errors",
    "ProtocolError": "protocols.errors",
    "SpecMismatchError": "protocols.errors",
    "SplitSpec": "protocols.specs",
    "TensorEntry": "protocols.codecs",
    "TensorLayout": "protocols.codecs",
    "ZOSpec": "protocols.specs",
    "check_installation": "protocols.installation",
    "decode_arrays": "protocols.codecs",
    "decode_hello": "protocols.messages",
    "decode_lora_train_ins": "protocols.messages",
    "decode_lora_train_res": "protocols.messages",
    "decode_tensors": "protocols.codecs",
    "encode_arrays": "protocols.codecs",
    "encode_hello": "protocols.messages",
    "encode_lora_train_ins": "protocols.messages",
    "encode_lora_train_res": "protocols.messages",
    "encode_tensors": "protocols.codecs",
    "payload_bytes": "protocols.ledger",
    "state_hash": "protocols.model_hash",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
