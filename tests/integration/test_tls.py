"""HTTPS through a Twisted ``ssl:`` endpoint, as the README shows it: a real
agent serves its API over TLS with a certificate signed by the operator's
CA, and
``/agents/`` advertises the https URL."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.integration.agents import BIN, free_port, wait_until
from tests.integration.certs import make_ca, server_certificate


@pytest.fixture
def tls_agent(tmp_path: Path):
    ca_path, ca_cert, ca_key = make_ca(tmp_path)
    key, cert = server_certificate(tmp_path, ca_cert, ca_key)
    port = free_port()
    endpoint = f"ssl:{port}:privateKey={key}:certKey={cert}:interface=127.0.0.1"
    log = open(tmp_path / "agent.log", "wb")
    process = subprocess.Popen(
        [
            str(BIN / "scs-agent"),
            "--http",
            endpoint,
            "-i",
            "tls1",
            "-D",
            str(tmp_path / "tls1"),
            "--cluster",
            f"tls-{uuid.uuid4().hex[:8]}",
            "--interval",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    context = ssl.create_default_context(cafile=str(ca_path))
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
