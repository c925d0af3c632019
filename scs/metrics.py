"""Prometheus metrics of one agent, served at ``/metrics``.

Everything lives in a per-agent ``CollectorRegistry`` (never the process's
global one) so that two agents in one test process do not share counters.

Two kinds of source:

- read at scrape time by ``AgentCollector``: instances by state and their
  restart counts (``supervisor.status``), peers alive (``agent.members()``);
- counted as things happen: HTTP requests by route and status
  (``CountingResource`` around the site), and the supervisor's and workers'
  structured log events (``MetricsObserver`` on the global log publisher,
  added and removed by ``MetricsService``): worker starts and exits, wake-up
  durations, ping round trips, API operations by outcome.

Observing log events rather than calling into the supervisor keeps this
module a reader: nothing in the supervisor depends on metrics being on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.application.service import Service
from twisted.logger import ILogObserver, Logger, LogPublisher, globalLogPublisher
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from zope.interface import implementer

from scs.records import STATES
from scs.srs_trust import REASONS as REJECTION_REASONS
from scs.supervisor import COUNTED_EVENTS

log = Logger(namespace="scs.metrics")

# Wake-ups and pings are short; the buckets cover 1 ms to 30 s.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class AgentCollector:
    """Reads the agent's state at scrape time."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def describe(self) -> list[Metric]:
        # Described up front so that registering does not call collect()
        # (which would read the store before the agent has started).
        return [
            GaugeMetricFamily("scs_instances", "Instances of this agent by state.", labels=["state"]),
            CounterMetricFamily(
                "scs_instance_restarts", "Restarts of each instance's worker.", labels=["app", "instance"]
            ),
            GaugeMetricFamily("scs_peers", "Other agents of the cluster by liveness.", labels=["alive"]),
            GaugeMetricFamily("scs_srs_connected", "1 when this agent is connected to the cluster."),
            CounterMetricFamily("scs_srs_rejected", "Cluster messages dropped, by reason.", labels=["reason"]),
        ]

    def collect(self) -> Iterator[Metric]:
        by_state = GaugeMetricFamily("scs_instances", "Instances of this agent by state.", labels=["state"])
        restarts = CounterMetricFamily(
            "scs_instance_restarts", "Restarts of each instance's worker.", labels=["app", "instance"]
        )
        counts = dict.fromkeys(STATES, 0)
        try:
            for spec, status in self.agent.local.instances():
                counts[status.state] = counts.get(status.state, 0) + 1
                restarts.add_metric([spec.app, spec.name], status.restarts)
        except Exception:  # noqa: BLE001 - a scrape must not fail on a bad row
            log.failure("metrics: reading instances failed")
        for state, count in counts.items():
            by_state.add_metric([state], count)
        yield by_state
        yield restarts

        peers = GaugeMetricFamily("scs_peers", "Other agents of the cluster by liveness.", labels=["alive"])
        alive = dead = 0
        try:
            for member in self.agent.members():
                if member["id"] == self.agent.agent_id:
                    continue
                if member["alive"]:
                    alive += 1
                else:
                    dead += 1
        except Exception:  # noqa: BLE001
            log.failure("metrics: reading members failed")
        peers.add_metric(["true"], alive)
        peers.add_metric(["false"], dead)
        yield peers

        srs = getattr(self.agent, "srs", None)
        connected = GaugeMetricFamily("scs_srs_connected", "1 when this agent is connected to the cluster.")
        connected.add_metric([], 1 if srs is not None and srs.is_connected() else 0)
        yield connected

        rejected = CounterMetricFamily("scs_srs_rejected", "Cluster messages dropped, by reason.", labels=["reason"])
        counts = srs.rejected_counts() if srs is not None else {}
        for reason in REJECTION_REASONS:
            rejected.add_metric([reason], counts.get(reason, 0))
        yield rejected


class AgentMetrics:
    """The registry of one agent and the metrics counted as things happen."""

    def __init__(self, agent: Any = None, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=False)
        if agent is not None:
            self.registry.register(AgentCollector(agent))
        self.http_requests = Counter(
            "scs_http_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.worker_starts = Counter("scs_worker_starts", "Worker processes spawned.", registry=self.registry)
        self.worker_exits = Counter(
            "scs_worker_exits",
            "Worker processes that ended, by how: exit code or signal.",
            ["how"],
            registry=self.registry,
        )
        self.supervisor_events = Counter(
            "scs_supervisor_events",
            "Supervisor events: wake-ups, spawns (node.restart), starts, kills, failures.",
            ["event"],
            registry=self.registry,
        )
        self.operations = Counter(
            "scs_operations",
            "Agent operations (API, admin, peers) by operation and outcome status.",
            ["operation", "status"],
            registry=self.registry,
        )
        self.failovers = Counter(
            "scs_failovers",
            "Instances of dead agents this agent re-created elsewhere, as the coordinator.",
            registry=self.registry,
        )
        self.drained = Counter(
            "scs_drained",
            "Instances this agent moved to another agent while draining.",
            registry=self.registry,
        )
        self.autoscale_decisions = Counter(
            "scs_autoscale_decisions",
            "Autoscaling decisions this agent took, as the one that decides, by app and direction.",
            ["app", "direction"],
            registry=self.registry,
        )
        self.autoscale_target = Gauge(
            "scs_autoscale_target",
            "The instances each app's autoscaling policy calls for now (on the agent that decides).",
            ["app"],
            registry=self.registry,
        )
        self.wakeup_seconds = Histogram(
            "scs_supervisor_wakeup_seconds",
            "How long each supervisor wake-up took.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.ping_seconds = Histogram(
            "scs_worker_ping_seconds",
            "Round trip of the supervisor's batched worker pings.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.observer = MetricsObserver(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def resource(self) -> IResource:
        return MetricsResource(self)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if value < 0:
        return None
    return float(value)


@implementer(ILogObserver)
class MetricsObserver:
    """Counts the structured log events that carry metrics, by their
    ``event`` key and fields alone (never the message text):

    - the supervisor's countable events (``scs.supervisor.COUNTED_EVENTS``);
    - ``wake-up.done`` (``duration``) and ``ping.done`` (``rtt``), in seconds;
    - the worker protocol's ``worker.started`` and ``worker.exited`` (``how``:
      ``code`` or ``signal``);
    - the agent's ``operation`` (``operation``, ``status``), logged once
      each operation has ended;
    - ``failover.moved`` and ``drain.moved`` (scs.failover, scs.agent);
    - ``autoscale.decision`` (``app``, ``direction``), ``autoscale.target``
      (``app``, ``target``) and ``autoscale.forgotten`` (scs.autoscaling).
    """

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            self._observe(event)
        except Exception:  # noqa: BLE001 - an observer that raises is removed by twisted
            pass

    def _observe(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if not isinstance(kind, str):
            return
        if kind in COUNTED_EVENTS:
            self.metrics.supervisor_events.labels(kind).inc()
        elif kind == "wake-up.done":
            self._time(self.metrics.wakeup_seconds, event.get("duration"))
        elif kind == "ping.done":
            self._time(self.metrics.ping_seconds, event.get("rtt"))
        elif kind == "worker.started":
            self.metrics.worker_starts.inc()
        elif kind == "worker.exited":
            how = "signal" if event.get("how") == "signal" else "code"
            self.metrics.worker_exits.labels(how).inc()
        elif kind == "failover.moved":
            self.metrics.failovers.inc()
        elif kind == "drain.moved":
            self.metrics.drained.inc()
        elif kind == "autoscale.decision":
            app, direction = event.get("app"), event.get("direction")
            if isinstance(app, str) and direction in ("up", "down"):
                self.metrics.autoscale_decisions.labels(app, direction).inc()
        elif kind == "autoscale.target":
            app, target = event.get("app"), _number(event.get("target"))
            if isinstance(app, str) and target is not None:
                self.metrics.autoscale_target.labels(app).set(target)
        elif kind == "autoscale.forgotten":
            app = event.get("app")
            try:
                self.metrics.autoscale_target.remove(app)
            except KeyError:
                pass
        elif kind == "operation":
            operation, status = event.get("operation"), event.get("status")
            if isinstance(operation, str) and isinstance(status, int):
                self.metrics.operations.labels(operation, str(status)).inc()

    @staticmethod
    def _time(histogram: Histogram, value: Any) -> None:
        seconds = _number(value)
        if seconds is not None:
            histogram.observe(seconds)


class MetricsService(Service):
    """Observes the log while the agent runs."""

    def __init__(self, metrics: AgentMetrics, publisher: LogPublisher | None = None) -> None:
        self.metrics = metrics
        self.publisher = publisher if publisher is not None else globalLogPublisher

    def startService(self) -> None:
        super().startService()
        self.publisher.addObserver(self.metrics.observer)

    def stopService(self) -> None:
        self.publisher.removeObserver(self.metrics.observer)
        super().stopService()


class MetricsResource(Resource):
    """``GET /metrics`` in the Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics: AgentMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render(self, request: IRequest) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"Allow", b"GET, HEAD")
            request.setHeader(b"Content-Type", b"application/json")
            return b'{"error": "method not allowed here", "allowed": ["GET", "HEAD"]}'
        body = self.metrics.render()
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"Cache-Control", b"no-store")
        return b"" if request.method == b"HEAD" else body


def route_of(url_map: Any) -> Callable[[IRequest], str]:
    """A function naming the API route a request goes to (its Klein
    endpoint), so that request counts have one label per route rather than
    one per instance name."""

    def name(request: IRequest) -> str:
        try:
            path = unquote(request.path.decode("ascii"), errors="strict")
        except (UnicodeDecodeError, ValueError):
            return "invalid-path"
        try:
            adapter = url_map.bind("localhost", path_info=path, default_method=request.method.decode("ascii"))
            rule, _arguments = adapter.match(return_rule=True)
        except Exception:  # noqa: BLE001 - werkzeug's redirects and 404s are exceptions
            return "other"
        endpoint = str(rule.endpoint)
        if endpoint.endswith("_branch"):
            endpoint = endpoint[: -len("_branch")]
        if endpoint.startswith("405-"):
            endpoint = "method-not-allowed"
        return endpoint

    return name


class CountingResource(Resource):
    """Counts every request by route, method and final status, then hands
    it to ``wrapped`` (a leaf resource)."""

    isLeaf = True

    def __init__(self, wrapped: IResource, metrics: AgentMetrics, route: Callable[[IRequest], str]) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.metrics = metrics
        self.route = route

    def render(self, request: IRequest) -> Any:
        route = self.route(request)
        method = request.method.decode("latin-1")
        if method not in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            method = "other"  # keep the label set bounded

        def count(result: Any) -> None:
            self.metrics.http_requests.labels(route, method, str(request.code)).inc()

        request.notifyFinish().addBoth(count)
        return self.wrapped.render(request)
