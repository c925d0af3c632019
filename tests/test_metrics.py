"""Prometheus metrics (issue 5): /metrics parses with prometheus_client's
own parser; its numbers follow instances created, killed and restarted, on
the real Supervisor driven by fakes and a MemoryReactorClock."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from surfaces_support import BROKER, Surfaces
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogPublisher

from scs.agent import Agent, LocalAgent
from scs.metrics import AgentMetrics, MetricsService
from scs.store import Store
from scs.supervisor import COUNTED_EVENTS, SupervisionPolicy, Supervisor
from scs.testing import FakeControl, FakeProcessTable, FakeSpawner


def scrape(site: Surfaces) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed by prometheus_client's parser."""
    response = site.request("GET", "/metrics")
    assert response.code == 200
    assert response.header("content-type").startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class Machine:
    """An agent whose real Supervisor spawns fake processes, with the
    metrics observing a private log publisher."""

    def __init__(self, tmp_path: Path) -> None:
        self.clock = MemoryReactorClock()
        self.spawner = FakeSpawner()
        self.control = FakeControl()
        self.store = Store.in_memory()
        self.publisher = LogPublisher()
        self.supervisor = Supervisor(
            self.store.list_nodes,
            os.fspath(tmp_path),
            reactor=self.clock,
            control=self.control,
            spawner=self.spawner,
            process_table=FakeProcessTable(),
            hostname="h",
            policy=SupervisionPolicy(interval=5.0, min_uptime=10.0),
        )
        # The supervisor logs to our publisher; the agent's operation lines
        # and the worker protocol's lines go to the global one, observed
        # only while this test runs.
        self.supervisor.log = Logger(observer=self.publisher)
        self.agent = Agent(LocalAgent(self.store, "agent1", BROKER, self.supervisor))
        self.agent.local.ready_timeout = 5.0
        self.site = Surfaces(agent=self.agent)
        self.metrics = self.site.metrics
        self.services = [MetricsService(self.metrics, self.publisher), MetricsService(self.metrics)]
        for service in self.services:
            service.startService()
        self.supervisor.startService()

    def stop(self) -> None:
        self.supervisor.stopService()
        for service in self.services:
            service.stopService()

    def worker(self, name: str) -> Any:
        (process,) = [p for p in self.spawner.alive if p.proto.name == name]
        return process

    def answer(self, name: str) -> None:
        self.control.up(f"{name}@h", queues=[f"dq.{name}"])
        self.clock.advance(self.supervisor.policy.probe_interval)


@pytest.fixture
def machine(tmp_path: Path) -> Any:
    m = Machine(tmp_path)
    yield m
    m.stop()


def test_metrics_parse_and_have_every_family() -> None:
    site = Surfaces()
    site.request("PUT", "/foo/instances/w1/")
    samples = scrape(site)
    names = {name for name, _ in samples}
    for family in [
        "scs_instances",
        "scs_peers",
        "scs_srs_connected",
        "scs_http_requests_total",
        "scs_worker_starts_total",
        "scs_supervisor_wakeup_seconds_count",
        "scs_worker_ping_seconds_count",
        "scs_instance_restarts_total",
    ]:
        assert family in names, family
    assert value(samples, "scs_instances", state="running") == 1
    assert value(samples, "scs_instances", state="failed") == 0
    assert value(samples, "scs_instance_restarts_total", app="foo", instance="w1") == 0
    assert value(samples, "scs_http_requests_total", route="instance_create_named", method="PUT", status="201") == 1


def test_http_requests_by_route_and_status() -> None:
    site = Surfaces()
    site.request("GET", "/ping/")
    site.request("GET", "/ping")
    site.request("GET", "/foo/instances/nope/")
    site.request("GET", "/foo/instances/other/")
    site.request("DELETE", "/ping/")
    site.request("GET", "/no/such/thing/here/")
    site.request("GET", "/admin/")
    samples = scrape(site)
    assert value(samples, "scs_http_requests_total", route="ping", method="GET", status="200") == 2
    # One label per route, not per instance name.
    assert value(samples, "scs_http_requests_total", route="instance_get", method="GET", status="404") == 2
    assert value(samples, "scs_http_requests_total", route="method-not-allowed", method="DELETE", status="405") == 1
    assert value(samples, "scs_http_requests_total", route="not-found", method="GET", status="404") == 1
    assert value(samples, "scs_http_requests_total", route="admin", method="GET", status="200") == 1


def test_counters_follow_instances_created_killed_and_restarted(machine: Machine) -> None:
    before = scrape(machine.site)
    assert value(before, "scs_supervisor_events_total", event="wake-up") == 1
    assert machine.site.request("PUT", "/foo/instances/w1/?nowait=1").code == 202
    first = machine.worker("w1")
    machine.answer("w1")

    created = scrape(machine.site)
    assert value(created, "scs_instances", state="running") == 1
    assert value(created, "scs_supervisor_events_total", event="node.restart") == 1
    assert value(created, "scs_supervisor_events_total", event="successfully started") == 1
    assert value(created, "scs_operations_total", operation="Node.add", status="202") == 1
    assert value(created, "scs_worker_starts_total") == 1
    assert value(created, "scs_instance_restarts_total", app="foo", instance="w1") == 0

    # Killed: the supervisor restarts it at once (from processEnded).
    machine.clock.advance(60)
    first.exit(code=None, signal=9)
    machine.worker("w1")
    killed = scrape(machine.site)
    assert value(killed, "scs_worker_exits_total", how="signal") == 1
    assert value(killed, "scs_worker_starts_total") == 2
    assert value(killed, "scs_instance_restarts_total", app="foo", instance="w1") == 1
    assert value(killed, "scs_supervisor_events_total", event="node.restart") == 2
    assert value(killed, "scs_instances", state="starting") == 1
    machine.answer("w1")
    restarted = scrape(machine.site)
    assert value(restarted, "scs_supervisor_events_total", event="successfully restarted") == 1
    assert value(restarted, "scs_instances", state="running") == 1

    # Restarted through the API.
    assert machine.site.request("POST", "/foo/instances/w1/restart").code == 200
    machine.worker("w1")
    after = scrape(machine.site)
    assert value(after, "scs_instance_restarts_total", app="foo", instance="w1") == 2
    assert value(after, "scs_supervisor_events_total", event="node.restart") == 3


def test_wakeup_durations_and_ping_round_trips(machine: Machine) -> None:
    machine.site.request("PUT", "/foo/instances/w1/?nowait=1")
    machine.answer("w1")
    machine.clock.advance(5.0)  # a periodic wake-up pings every worker
    samples = scrape(machine.site)
    assert value(samples, "scs_supervisor_wakeup_seconds_count") >= 2
    assert value(samples, "scs_worker_ping_seconds_count") >= 1


def test_supervisor_timing_events_feed_the_histograms() -> None:
    metrics = AgentMetrics()
    metrics.observer({"event": "wake-up.done", "duration": 0.5, "log_format": ""})
    metrics.observer({"event": "wake-up.done", "duration": 0.25, "log_format": ""})
    metrics.observer({"event": "ping.done", "rtt": 0.002, "log_format": ""})
    metrics.observer({"event": "ping.done", "log_format": ""})  # no figure: ignored
    registry = metrics.registry
    assert registry.get_sample_value("scs_supervisor_wakeup_seconds_count") == 2
    assert registry.get_sample_value("scs_supervisor_wakeup_seconds_sum") == 0.75
    assert registry.get_sample_value("scs_worker_ping_seconds_count") == 1


def test_events_are_counted_by_their_event_key_and_fields_only() -> None:
    metrics = AgentMetrics()
    metrics.observer({"event": "worker.started", "pid": 1})
    metrics.observer({"event": "worker.exited", "how": "signal", "signal": 9})
    metrics.observer({"event": "worker.exited", "how": "code", "code": 1})
    metrics.observer({"event": "operation.start", "operation": "Node.add"})
    metrics.observer({"event": "operation", "operation": "Node.add", "status": 201})
    metrics.observer({"event": "operation", "operation": "Node.add", "status": 404})
    metrics.observer({"event": "node.restart"})
    metrics.observer({"event": "worker.state"})  # not a counted supervisor event
    # The message text alone counts for nothing.
    metrics.observer({"log_format": "{name} worker started pid={pid}", "name": "w1", "pid": 2})
    metrics.observer({"log_format": "{{{request}}} <-- ok={body}", "operation": "Node.add", "status": 201})
    registry = metrics.registry
    assert registry.get_sample_value("scs_worker_starts_total") == 1
    assert registry.get_sample_value("scs_worker_exits_total", {"how": "signal"}) == 1
    assert registry.get_sample_value("scs_worker_exits_total", {"how": "code"}) == 1
    assert registry.get_sample_value("scs_operations_total", {"operation": "Node.add", "status": "201"}) == 1
    assert registry.get_sample_value("scs_operations_total", {"operation": "Node.add", "status": "404"}) == 1
    assert registry.get_sample_value("scs_supervisor_events_total", {"event": "node.restart"}) == 1
    assert registry.get_sample_value("scs_supervisor_events_total", {"event": "worker.state"}) is None


def test_counted_supervisor_events_come_from_the_supervisor() -> None:
    assert COUNTED_EVENTS == {
        "wake-up",
        "node.restart",
        "successfully started",
        "successfully restarted",
        "unresponsive",
        "unresponsive.kill",
        "failed",
        "backoff",
        "reconfigure",
        "broker.down",
        "broker.up",
        "node.consume_from",
        "node.cancel_consume_from",
        "node.autoscale",
        "control.error",
        "ping.error",
    }


def test_peers_alive_from_the_membership_table() -> None:
    class Cluster(Agent):
        def members(self) -> list[dict[str, Any]]:
            return [
                {"id": "agent1", "alive": True},
                {"id": "agent2", "alive": True},
                {"id": "agent3", "alive": True},
                {"id": "agent4", "alive": False},
            ]

    site = Surfaces(agent=Cluster(LocalAgent(Store.in_memory(), "agent1", BROKER)))
    samples = scrape(site)
    assert value(samples, "scs_peers", alive="true") == 2
    assert value(samples, "scs_peers", alive="false") == 1


def test_registries_are_per_agent() -> None:
    one, two = Surfaces(), Surfaces()
    one.request("GET", "/ping/")
    assert value(scrape(two), "scs_http_requests_total", route="ping", method="GET", status="200") == 0


def test_a_failing_read_does_not_break_the_scrape() -> None:
    site = Surfaces()
    site.request("PUT", "/foo/instances/w1/")

    def broken(name: str) -> Any:
        raise RuntimeError("boom")

    site.supervisor.status = broken
    samples = scrape(site)
    assert value(samples, "scs_instances", state="running") == 0


def test_metrics_answer_get_only() -> None:
    site = Surfaces()
    response = site.request("POST", "/metrics")
    assert response.code == 405
    assert response.header("allow") == "GET, HEAD"


def test_failovers_and_drains_are_counted() -> None:
    metrics = AgentMetrics()
    for _ in range(3):
        metrics.observer({"event": "failover.moved", "instance": "w1", "dead": "agent3", "target": "agent1"})
    metrics.observer({"event": "drain.moved", "instance": "w2", "target": "agent2"})
    metrics.observer({"event": "failover.orphaned", "instance": "w3"})  # not a move
    text = metrics.render().decode()
    assert "scs_failovers_total 3.0" in text
    assert "scs_drained_total 1.0" in text
