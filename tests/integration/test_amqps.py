"""amqps:// brokers for the cluster protocol (SRS, txAMQP through Twisted's
TLS) and for workers (Celery/kombu), against a private RabbitMQ node with a
TLS listener whose certificate a throwaway CA signs; the agents trust that CA
through SSL_CERT_FILE, as an operator would do it."""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from scs.records import BrokerInfo
from tests.integration.agents import AgentProcess, kill_leftover_workers, wait_until
from tests.integration.rabbitmq_node import PrivateRabbitMQ, available, make_ca

pytestmark = pytest.mark.skipif(not available(), reason="needs rabbitmq-server installed and root (a private TLS node)")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbitMQ]:
    node = PrivateRabbitMQ(tmp_path_factory.mktemp("rabbitmq-tls"), tls=True)
    try:
        node.start()
    except RuntimeError as e:
        node.destroy()
        pytest.skip(f"RabbitMQ's TLS listener could not be started here: {e}")
    yield node
    node.destroy()


def alive(agent: AgentProcess) -> set[str]:
    return {m["id"] for m in agent.request("GET", "/agents/")[1] if m["alive"]}


def tls_client(node: PrivateRabbitMQ) -> Celery:
    """The test's own Celery client on the TLS listener, trusting the CA
    explicitly and checking the host name."""
    app = Celery(broker=node.tls_url, set_as_current=False)
    app.conf.broker_use_ssl = {
        "ca_certs": str(node.ca_path),
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": "127.0.0.1",
    }
    return app


def test_agents_and_workers_on_an_amqps_broker(broker: PrivateRabbitMQ, tmp_path: Path) -> None:
    cluster = f"amqps-{uuid.uuid4().hex[:8]}"
    env = {"SSL_CERT_FILE": str(broker.ca_path)}
    agents = [
        AgentProcess(
            tmp_path / f"agent{i}",
            f"agent{i}",
            "--cluster",
            cluster,
            "-b",
            broker.tls_url,
            "--interval",
            "1",
            env=env,
        )
        for i in (1, 2)
    ]
    client: Any = None
    try:
        for agent in agents:
            agent.start()
        # (a) both agents reach the cluster over TLS and see each other.
        for agent in agents:
            wait_until(lambda: alive(agent) == {"agent1", "agent2"}, 30, what="membership over amqps")
        for agent in agents:
            log = agent.log_text()
            assert f"AMQP connected to 127.0.0.1:{broker.tls_port}" in log
            assert f":{broker.port}" not in log  # never the plain listener

        # (b) a new instance's app defaults to the amqps broker; its worker
        # answers a ping over TLS before the 201.
        status, body, _ = agents[0].request("PUT", "/foo/instances/tlsw", timeout=60)
        assert status == 201, body
        assert body["state"] == "running", body
        app = agents[0].request("GET", "/foo/")[1]
        assert app["broker"]["port"] == broker.tls_port
        cmdline = Path(f"/proc/{body['pid']}/cmdline").read_bytes().split(b"\0")
        assert BrokerInfo.from_url(broker.tls_url).url.encode() in cmdline, cmdline
        assert b'broker_use_ssl=(json){"server_hostname": "127.0.0.1"}' in cmdline, cmdline
        assert not any(arg.startswith(b"amqp://") for arg in cmdline), cmdline
        client = tls_client(broker)
        node = body["node"]  # <instance>@<agent id>
        replies = client.control.ping(destination=[node], timeout=5) or []
        assert any(node in reply for reply in replies), replies
        # The agent's own Celery control reaches it over amqps too.
        listed = agents[1].request("GET", "/foo/instances/tlsw")[1]
        assert listed["state"] == "running", listed
    finally:
        if client is not None:
            client.close()
        for agent in agents:
            agent.stop()
            kill_leftover_workers(agent.directory)


def test_an_untrusted_broker_certificate_is_refused(broker: PrivateRabbitMQ, tmp_path: Path) -> None:
    # (c) a CA that did not sign the broker's certificate: no connection,
    # the TLS failure is logged, and no fallback to plain AMQP.
    other_ca, _, _ = make_ca(tmp_path / "other-ca", "not the broker's CA")
    agent = AgentProcess(
        tmp_path / "untrusting",
        "untrusting",
        "--cluster",
        f"amqps-{uuid.uuid4().hex[:8]}",
        "-b",
        broker.tls_url,
        "--interval",
        "1",
        env={"SSL_CERT_FILE": str(other_ca)},
    )
    try:
        agent.start()
        wait_until(
            lambda: "certificate verify failed" in agent.log_text(),
            30,
            what="the agent to log the TLS failure",
        )
        assert alive(agent) == set()  # not even itself: it is cut off from the cluster
        log = agent.log_text()
        assert "AMQP connected" not in log
        assert f":{broker.port}" not in log
    finally:
        agent.stop()
        kill_leftover_workers(agent.directory)
