"""HTTPS through a Twisted ``ssl:`` endpoint, as the README shows it: a real
agent serves its API over TLS with a certificate it is given, and
``/agents/`` advertises the https URL."""

from __future__ import annotations

import datetime
import ipaddress
import json
import signal
import ssl
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.agents import BIN, free_port, wait_until


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A key and a certificate for 127.0.0.1, as an operator would make them."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "agent.key", directory / "agent.crt"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture
def tls_agent(tmp_path: Path):
    key, cert = self_signed(tmp_path)
    port = free_port()
    endpoint = f"ssl:{port}:privateKey={key}:certKey={cert}:interface=127.0.0.1"
    log = open(tmp_path / "agent.log", "wb")
    process = subprocess.Popen(
        [str(BIN / "scs-agent"), "--http", endpoint, "-i", "tls1", "-D", str(tmp_path / "tls1"),
         "--cluster", f"tls-{uuid.uuid4().hex[:8]}", "--interval", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    context = ssl.create_default_context(cafile=str(cert))
    base = f"https://127.0.0.1:{port}"

    def get(path: str) -> tuple[int, object]:
        with urllib.request.urlopen(base + path, timeout=10, context=context) as response:
            return response.status, json.loads(response.read())

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError((tmp_path / "agent.log").read_text()[-3000:])
        try:
            return get("/ping/")[0] == 200
        except OSError:
            return False

    try:
        wait_until(ready, 30, what="the TLS agent to answer")
        yield base, get, port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


def test_api_over_tls_and_agents_advertise_https(tls_agent) -> None:
    base, get, port = tls_agent
    assert get("/ping/") == (200, {"ok": "pong"})
    status, members = get("/agents/")
    assert status == 200
    (me,) = [m for m in members if m["id"] == "tls1"]
    assert me["url"] == f"https://127.0.0.1:{port}/"


def test_plain_http_on_the_tls_port_gets_no_api(tls_agent) -> None:
    base, get, port = tls_agent
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/ping/", timeout=10).read()


def test_a_client_that_does_not_trust_the_certificate_is_refused(tls_agent) -> None:
    base, get, port = tls_agent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(base + "/ping/", timeout=10, context=ssl.create_default_context())
