"""The development PKI behind ``pollinate certs``."""

from __future__ import annotations

import datetime
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cli.main import main
from server.certificates import make_dev_pki


def _san(cert_file: Path) -> x509.SubjectAlternativeName:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _self_signed_without_loopback(folder: Path, host: str) -> None:
    """``ca.crt``, ``server.crt``, ``server.key`` for ``host`` only, as another
    CA (an organisation's) might issue them."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (folder / "ca.crt").write_bytes(pem)
    (folder / "server.crt").write_bytes(pem)
    (folder / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def test_dev_pki_signs_a_server_certificate_for_the_hosts(tmp_path: Path) -> None:
    """The server certificate is signed by the CA and covers every host given;
    private keys are readable by the owner only.

    Breaks if TLS clients could not verify the server or keys leak.
    """
    pki = make_dev_pki(tmp_path, ["127.0.0.1", "trunk.example.org"])
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = _san(pki.server_cert)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "trunk.example.org" in san.get_values_for_type(x509.DNSName)
    assert pki.hosts == ("127.0.0.1", "trunk.example.org", "localhost")
    for key in (pki.ca_key, pki.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_certs_command_always_covers_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pollinate certs DIR --host 10.0.0.5`` covers 10.0.0.5 and also
    127.0.0.1 and localhost, where ``pollinate server start`` runs and
    verifies the SuperLink; the public host stays the common name.

    Breaks if the README's deployment recipe made certificates that
    ``server start`` refuses.
    """
    assert main(["certs", str(tmp_path), "--host", "10.0.0.5"]) == 0
    san = _san(tmp_path / "server.crt")
    ips = san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("10.0.0.5") in ips
    assert ipaddress.ip_address("127.0.0.1") in ips
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    cert = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in common] == ["10.0.0.5"]
    said = " ".join(capsys.readouterr().err.split())  # as wrapped to the terminal
    assert "(hosts: 10.0.0.5, 127.0.0.1, localhost)" in said


def test_certs_command_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second ``pollinate certs`` into the same folder changes nothing."""
    assert main(["certs", str(tmp_path)]) == 0
    before = (tmp_path / "ca.crt").read_bytes()
    assert main(["certs", str(tmp_path)]) == 2
    assert (tmp_path / "ca.crt").read_bytes() == before
    assert "exists" in capsys.readouterr().err


def test_a_server_certificate_without_loopback_is_refused_before_starting(
    tmp_path: Path,
) -> None:
    """The SuperLink listens on 127.0.0.1 behind the fleet gateway, and the
    gateway, its SuperExec and the operator's ``flwr`` verify it there: a
    certificate for the public name only is refused with a message saying
    how to remake it, and nothing is started.

    Breaks if such a server came up and every loopback call then failed TLS.
    """
    from server.deploy import ServerInfo, start_server
    from server.processes import DeployError

    _self_signed_without_loopback(tmp_path / "certs", "10.0.0.5")
    info = ServerInfo(
        -1, "0.0.0.0", 9092, "127.0.0.1:9092", str(tmp_path / "certs"), None
    )
    with pytest.raises(DeployError, match="does not cover 127.0.0.1.*pollinate certs"):
        start_server(tmp_path / "run", info, auth=False)
    assert not (tmp_path / "run").exists()
