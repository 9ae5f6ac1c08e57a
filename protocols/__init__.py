"""The wire contract between Pollinate servers and clients.

Everything both sides must agree on bit for bit lives here: the tensor codec,
method specs, message payloads and byte accounting. Nothing here trains,
reads files or opens sockets.
"""

from protocols.codecs import (
    CODEC_VERSION,
    DEFAULT_MAX_PAYLOAD_BYTES,
    SUPPORTED_DTYPES,
    TensorEntry,
    TensorLayout,
    decode_tensors,
    encode_tensors,
)
from protocols.errors import PayloadTooLargeError, ProtocolError, SpecMismatchError
from protocols.ledger import ByteLedger, LedgerEntry, payload_bytes
from protocols.messages import (
    MESSAGE_HELLO,
    MESSAGE_TRAIN_LORA,
    LocalTrainConfig,
    LoraTrainIns,
    LoraTrainRes,
    NodeHello,
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
    "LedgerEntry",
    "LocalTrainConfig",
    "LoraSpec",
    "LoraTrainIns",
    "LoraTrainRes",
    "NodeHello",
    "PayloadTooLargeError",
    "ProtocolError",
    "SpecMismatchError",
    "SplitSpec",
    "TensorEntry",
    "TensorLayout",
    "ZOSpec",
    "decode_hello",
    "decode_lora_train_ins",
    "decode_lora_train_res",
    "decode_tensors",
    "encode_hello",
    "encode_lora_train_ins",
    "encode_lora_train_res",
    "encode_tensors",
    "payload_bytes",
    "state_hash",
]
