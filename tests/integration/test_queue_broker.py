"""The broker side of queues (issue 10, item 5) on a real agent and broker.

A queue object shows ``messages`` and ``consumers`` from RabbitMQ, ``purge``
empties it, deleting an instance deletes its ``dq.<name>`` queue, and an app
whose broker cannot be reached answers null figures, not a 500.  Names carry
a random suffix so that runs never meet on the shared broker; everything a
test declares on the broker it deletes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from amqp.exceptions import NotFound as QueueNotFound
from kombu import Connection, Exchange, Producer, Queue

from tests.integration.agents import (
    BROKER,
    AgentProcess,
    free_port,
    kill_leftover_workers,
    pid_alive,
    wait_until,
)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    agent = AgentProcess(tmp_path / "agent1", "agent1", "--without-srs", "--interval", "1")
    agent.start()
    yield agent
    agent.stop()
    kill_leftover_workers(agent.directory)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def broker_figures(queue: str) -> tuple[int, int] | None:
    """(messages, consumers) of ``queue`` by a passive declare, None if it is gone."""
    with Connection(BROKER, connect_timeout=5) as conn:
        try:
            _name, messages, consumers = conn.channel().queue_declare(queue=queue, passive=True)
        except QueueNotFound:
            return None
        return messages, consumers


def publish(queue: str, count: int, exchange: Exchange | None = None) -> None:
    """``count`` messages to ``queue``, each confirmed by the broker."""
    with Connection(BROKER, connect_timeout=5, transport_options={"confirm_publish": True}) as conn:
        producer = Producer(conn.channel(), exchange=exchange or Exchange(""))
        for i in range(count):
            producer.publish({"n": i}, routing_key=queue, retry=False)


def delete_from_broker(queue: str, exchange: str | None = None) -> None:
    with Connection(BROKER, connect_timeout=5) as conn:
        channel = conn.channel()
        channel.queue_delete(queue=queue)
        if exchange is not None:
            channel.exchange_delete(exchange=exchange)


def test_figures_then_purge(agent: AgentProcess) -> None:
    app, queue = unique("qb-app"), unique("qb-q")
    assert agent.request("PUT", f"/{app}/queues/{queue}/")[0] == 201
    try:
        # Declared in the app, not yet on the broker: null figures.
        status, body, _ = agent.request("GET", f"/{app}/queues/{queue}/")
        assert status == 200, body
        assert (body["messages"], body["consumers"]) == (None, None)

        exchange = Exchange(queue, "direct", durable=True)
        with Connection(BROKER, connect_timeout=5) as conn:
            Queue(queue, exchange, routing_key=queue).bind(conn.channel()).declare()
        publish(queue, 3, exchange)
        wait_until(lambda: broker_figures(queue) == (3, 0), 10, what="3 messages on the broker")

        status, body, _ = agent.request("GET", f"/{app}/queues/{queue}")
        assert status == 200, body
        assert (body["name"], body["messages"], body["consumers"]) == (queue, 3, 0)

        status, body, _ = agent.request("POST", f"/{app}/queues/{queue}/purge")
        assert (status, body) == (200, {"purged": 3})
        assert agent.request("GET", f"/{app}/queues/{queue}/")[1]["messages"] == 0
        assert broker_figures(queue) == (0, 0)

        assert agent.request("POST", f"/{app}/queues/{unique('nope')}/purge")[0] == 404
    finally:
        delete_from_broker(queue, exchange=queue)


def test_deleting_an_instance_deletes_its_private_queue(agent: AgentProcess) -> None:
    app, name = unique("qb-app"), unique("qb-w")
    private = f"dq.{name}"
    try:
        status, body, _ = agent.request("PUT", f"/{app}/instances/{name}/")
        assert status == 201 and body["state"] == "running", body
        pid = body["pid"]
        figures = broker_figures(private)
        assert figures is not None and figures[1] == 1  # the worker consumes it

        # Stopped, with messages left behind that nobody will take.
        assert agent.request("POST", f"/{app}/instances/{name}/disable")[0] == 200
        wait_until(lambda: not pid_alive(pid), 30, what="disable to stop the worker")
        wait_until(lambda: (broker_figures(private) or (0, -1))[1] == 0, 10, what="no consumer on the queue")
        publish(private, 2)
        wait_until(lambda: broker_figures(private) == (2, 0), 10, what="2 messages on the queue")

        status, body, _ = agent.request("DELETE", f"/{app}/instances/{name}/")
        assert status == 200, body
        assert broker_figures(private) is None
    finally:
        delete_from_broker(private, exchange=private)


def test_deleting_a_running_instance_deletes_its_private_queue(agent: AgentProcess) -> None:
    app, name = unique("qb-app"), unique("qb-w")
    private = f"dq.{name}"
    try:
        status, body, _ = agent.request("PUT", f"/{app}/instances/{name}/", {"nowait": True})
        assert status == 202, body
        wait_until(lambda: broker_figures(private) is not None, 30, what="the worker to declare its queue")
        status, body, _ = agent.request("DELETE", f"/{app}/instances/{name}/")
        assert status == 200, body
        assert broker_figures(private) is None
    finally:
        delete_from_broker(private, exchange=private)


def test_unreachable_broker_gives_null_figures_in_bounded_time(agent: AgentProcess) -> None:
    app, queue = unique("qb-app"), unique("qb-q")
    closed = f"amqp://guest:guest@127.0.0.1:{free_port()}//"  # nothing listens there
    assert agent.request("PUT", f"/{app}/", {"broker": closed})[0] == 201
    assert agent.request("PUT", f"/{app}/queues/{queue}/")[0] == 201

    started = time.monotonic()
    status, body, _ = agent.request("GET", f"/{app}/queues/{queue}/", timeout=10)
    assert status == 200, body
    assert (body["name"], body["messages"], body["consumers"]) == (queue, None, None)
    assert time.monotonic() - started < 5

    started = time.monotonic()
    status, body, _ = agent.request("POST", f"/{app}/queues/{queue}/purge", timeout=10)
    assert status == 503, body
    assert body["queue"] == queue
    assert time.monotonic() - started < 5
    assert agent.request("GET", "/ping/")[0] == 200
