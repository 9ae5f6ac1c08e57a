"""The development PKI behind ``pollinate certs``."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509

from cli.main import main
from server.certificates import make_dev_pki


def test_dev_pki_signs_a_server_certificate_for_the_hosts(tmp_path: Path) -> None:
    """The server certificate is signed by the CA and covers every host given;
    private keys are readable by the owner only.

    Breaks if TLS clients could not verify the server or keys leak.
    """
    pki = make_dev_pki(tmp_path, ["127.0.0.1", "trunk.example.org"])
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "trunk.example.org" in san.get_values_for_type(x509.DNSName)
    for key in (pki.ca_key, pki.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


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
    from server.deploy import DeployError, ServerInfo, start_server

    make_dev_pki(tmp_path / "certs", ["10.0.0.5", "server.example.org"])
    info = ServerInfo(
        -1, "0.0.0.0", 9092, "127.0.0.1:9092", str(tmp_path / "certs"), None
    )
    with pytest.raises(DeployError, match="--host 127.0.0.1"):
        start_server(tmp_path / "run", info, auth=False)
    assert not (tmp_path / "run").exists()
