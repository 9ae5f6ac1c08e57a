"""A development PKI: a CA and server certificates for TLS on our services.

``pollinate certs`` writes, into one folder, a self-signed CA (``ca.crt``,
``ca.key``) and a server certificate signed by it (``server.crt``,
``server.key``) whose subject alternative names cover the hosts given
(127.0.0.1 and localhost by default). Keys are ECDSA P-384, written with
0600 permissions. For production, use your organisation's CA; these files
are for development and tests.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DevPki", "make_dev_pki"]


@dataclass(frozen=True, slots=True)
class DevPki:
    """Paths of the files :func:`make_dev_pki` writes."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _write(path: Path, data: bytes, private: bool) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_dev_pki(
    folder: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), days: int = 365
) -> DevPki:
    """Write a development CA and a server certificate for ``hosts``.

    Raises
    ------
    FileExistsError
        If ``folder`` already holds a CA (nothing is overwritten).
    ValueError
        If ``hosts`` is empty or ``days`` < 1.
    """
    if not hosts or days < 1:
        raise ValueError(f"need at least one host and days >= 1, got {hosts}, {days}")
    folder.mkdir(parents=True, exist_ok=True)
    pki = DevPki(
        folder / "ca.crt",
        folder / "ca.key",
        folder / "server.crt",
        folder / "server.key",
    )
    if pki.ca_cert.exists():
        raise FileExistsError(
            f"{pki.ca_cert} exists: remove the folder to make a new PKI"
        )
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Pollinate dev CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(pki.ca_cert, ca.public_bytes(serialization.Encoding.PEM), private=False)
    _write(pki.ca_key, _key_pem(ca_key), private=True)
    _write(
        pki.server_cert, cert.public_bytes(serialization.Encoding.PEM), private=False
    )
    _write(pki.server_key, _key_pem(key), private=True)
    return pki
