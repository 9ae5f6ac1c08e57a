"""TLS files for our services: a development PKI, and the check deployment needs.

``pollinate certs`` writes, into one folder, a self-signed CA (``ca.crt``,
``ca.key``) and a server certificate signed by it (``server.crt``,
``server.key``) whose subject alternative names cover the hosts given and,
always, 127.0.0.1 and localhost: ``pollinate server start`` runs the
SuperLink on 127.0.0.1 behind the fleet gateway and verifies it there. Keys
are ECDSA P-384, written with 0600 permissions. For production, use your
organisation's CA; these files are for development and tests.

:class:`TlsFiles` is the set of such a folder that a server uses;
:func:`check_loopback_certificate` refuses one whose certificate cannot
serve the SuperLink on 127.0.0.1.
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

from server.processes import DeployError

__all__ = [
    "LOOPBACK_HOSTS",
    "DevPki",
    "TlsFiles",
    "check_loopback_certificate",
    "make_dev_pki",
]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
"""Names every server certificate of :func:`make_dev_pki` covers."""

_CA_CERT, _CA_KEY = "ca.crt", "ca.key"
_SERVER_CERT, _SERVER_KEY = "server.crt", "server.key"


@dataclass(frozen=True, slots=True)
class DevPki:
    """What :func:`make_dev_pki` wrote: its files and the hosts covered."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for the SuperLink's TLS (see ``pollinate certs``)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> TlsFiles:
        """The files ``pollinate certs FOLDER`` writes.

        Raises
        ------
        DeployError
            If one is missing.
        """
        files = cls(folder / _CA_CERT, folder / _SERVER_CERT, folder / _SERVER_KEY)
        for path in (files.ca_cert, files.server_cert, files.server_key):
            if not path.is_file():
                raise DeployError(
                    f"TLS file missing: {path} (make them with pollinate certs)"
                )
        return files


def check_loopback_certificate(tls: TlsFiles) -> None:
    """Refuse a server certificate that does not name 127.0.0.1.

    The SuperLink listens on 127.0.0.1; the gateway, the SuperLink's own
    SuperExec and the operator's ``flwr`` verify it under that name.

    Raises
    ------
    DeployError
        If the certificate cannot be read or does not cover 127.0.0.1.
    """
    try:
        cert = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (OSError, ValueError, x509.ExtensionNotFound) as exc:
        raise DeployError(f"cannot read {tls.server_cert}: {exc}") from None
    if ipaddress.ip_address("127.0.0.1") not in san.value.get_values_for_type(
        x509.IPAddress
    ):
        raise DeployError(
            f"{tls.server_cert} does not cover 127.0.0.1, where the SuperLink "
            "listens: make certificates with pollinate certs DIR --host <public "
            "name or IP> (they cover 127.0.0.1 too)"
        )


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


def make_dev_pki(folder: Path, hosts: Sequence[str] = (), days: int = 365) -> DevPki:
    """Write a development CA and a server certificate for ``hosts``.

    Parameters
    ----------
    folder : Path
        Where to write ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key``.
    hosts : Sequence[str]
        Host names or IP addresses the server certificate covers besides
        :data:`LOOPBACK_HOSTS`, which it always covers. The first one is its
        common name (127.0.0.1 if none is given).
    days : int
        Validity of both certificates, in days.

    Raises
    ------
    FileExistsError
        If ``folder`` already holds a CA (nothing is overwritten).
    ValueError
        If ``days`` < 1.
    """
    if days < 1:
        raise ValueError(f"need days >= 1, got {days}")
    # Given hosts first (the first is the common name), duplicates dropped.
    covered = tuple(dict.fromkeys([*hosts, *LOOPBACK_HOSTS]))
    folder.mkdir(parents=True, exist_ok=True)
    pki = DevPki(
        folder / _CA_CERT,
        folder / _CA_KEY,
        folder / _SERVER_CERT,
        folder / _SERVER_KEY,
        covered,
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
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, covered[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(_san(covered), critical=False)
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
