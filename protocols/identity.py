"""Binding a node's label to its key: the signed hello.

A node's label orders the federation and names the node in the ledger, the
metrics and every per-node strategy state, so two nodes must never hold one
label. When the server authenticates nodes (``pollinate server start
--auth-keys DIR``), a label is a key name: the node that says "I am
``hospital-3``" must hold the private key whose public half the server keeps
as ``DIR/hospital-3.pub``. Flower gives the ServerApp no map from node id to
key, so the proof is one of possession:

1. the hello instruction carries a fresh random nonce (:data:`NONCE_BYTES`);
2. the node signs :func:`hello_payload` ``(nonce, label, node id)`` with its
   OpenSSH EC private key (ECDSA, the hash sized to the curve as OpenSSH
   does: P-256/SHA-256, P-384/SHA-384, P-521/SHA-512);
3. the server verifies it with the public key registered under that label.

The nonce makes a signature useless for any other hello, and the node id (the
one the SuperLink authenticated and stamps on the reply) makes it useless
from any other node. The functions here are pure: key bytes in, bytes out;
reading key files is the caller's.
"""

from __future__ import annotations

import re
import struct

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocols.errors import ProtocolError

__all__ = [
    "NONCE_BYTES",
    "IdentityError",
    "check_key_name",
    "hello_payload",
    "sign_hello",
    "verify_hello",
]

NONCE_BYTES = 32
"""Length of the server's hello nonce (random bytes, fresh per node and hello)."""

_DOMAIN = b"pollinate/hello-signature/v1\x00"
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}


class IdentityError(ProtocolError):
    """A hello's proof of identity is missing, malformed or does not verify."""


def check_key_name(label: str) -> str:
    """Return ``label`` if it can name a key file (``<label>.pub``).

    A key name starts with a letter or digit and holds at most 128 letters,
    digits, ``.``, ``_`` or ``-``: no path separator, no hidden file.

    Raises
    ------
    IdentityError
        If it cannot.
    """
    if not _KEY_NAME.fullmatch(label):
        raise IdentityError(
            f"label {label!r} cannot name a key: use 1-128 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return label


def hello_payload(nonce: bytes, label: str, node_id: int) -> bytes:
    """The bytes a node signs: domain tag, then length-prefixed nonce and label, then node id.

    Parameters
    ----------
    nonce : bytes
        The server's nonce for this hello.
    label : str
        The label the node claims (UTF-8 on the wire).
    node_id : int
        The node's Flower node id (unsigned 64-bit).

    Raises
    ------
    IdentityError
        If ``node_id`` is not an unsigned 64-bit integer.
    """
    if not 0 <= node_id < 2**64:
        raise IdentityError(f"node id {node_id} is not an unsigned 64-bit integer")
    text = label.encode("utf-8")
    return b"".join(
        (
            _DOMAIN,
            struct.pack(">I", len(nonce)),
            nonce,
            struct.pack(">I", len(text)),
            text,
            struct.pack(">Q", node_id),
        )
    )


def _hash_for(curve: ec.EllipticCurve) -> hashes.HashAlgorithm:
    try:
        return _HASHES[curve.name]()
    except KeyError:
        raise IdentityError(
            f"EC curve {curve.name} is not one of {sorted(_HASHES)}"
        ) from None


def sign_hello(private_key: bytes, nonce: bytes, label: str, node_id: int) -> bytes:
    """Sign a hello with an OpenSSH EC private key (unencrypted).

    Returns the DER-encoded ECDSA signature of :func:`hello_payload`.

    Raises
    ------
    IdentityError
        If the key is not an unencrypted OpenSSH EC private key on a NIST
        curve (the kind Flower's SuperNode authenticates with).
    """
    try:
        key = serialization.load_ssh_private_key(private_key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise IdentityError(f"not an OpenSSH private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(
            f"the node key is a {type(key).__name__}, not an EC key (Flower "
            "authenticates nodes with EC keys)"
        )
    payload = hello_payload(nonce, label, node_id)
    return key.sign(payload, ec.ECDSA(_hash_for(key.curve)))


def verify_hello(
    public_key: bytes, nonce: bytes, label: str, node_id: int, signature: bytes
) -> None:
    """Check that ``signature`` signs this hello under an OpenSSH EC public key.

    Raises
    ------
    IdentityError
        If the hello is unsigned, the key is not an OpenSSH EC public key, or
        the signature does not verify (another key, nonce, label or node id).
    """
    if not signature:
        raise IdentityError("the hello is not signed (start the node with its key)")
    try:
        key = serialization.load_ssh_public_key(public_key)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise IdentityError(f"registered key is not an OpenSSH key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise IdentityError(f"registered key is a {type(key).__name__}, not EC")
    payload = hello_payload(nonce, label, node_id)
    try:
        key.verify(signature, payload, ec.ECDSA(_hash_for(key.curve)))
    except InvalidSignature:
        raise IdentityError(
            "the signature does not verify with the key registered for this label"
        ) from None
