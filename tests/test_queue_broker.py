"""The broker side of queues (issue 10, item 5), without a broker.

``CeleryControl``'s queue calls against a stand-in Celery app and AMQP
channel run inline; the agent's queue figures, purge and the deletion of an
instance's ``dq.<name>`` go through the HTTP API (StubTreq) to an agent whose
broker is ``scs.testing.FakeControl``.  Waits are bounded on a
``task.Clock``; nothing sleeps or touches the global reactor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from amqp.exceptions import AccessRefused, NotFound as AMQPNotFound
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher

from scs.agent import Agent, ClusterQueues, LocalAgent
from scs.control import BrokerUnavailable, CeleryControl, CommandFailed
from scs.errors import BadParameter, NotFound, Unavailable
from scs.http.api import API
from scs.operation_args import check_operation
from scs.records import BrokerInfo, QueueBinding, WorkerStatus
from scs.store import Store
from scs.testing import FakeControl

BROKER = "amqp://guest:guest@127.0.0.1:5672//"
OTHER_BROKER = "amqp://user:secret@127.0.0.1:5673/other"


# -- CeleryControl's queue calls -----------------------------------------------


class InlinePool:
    def callInThreadWithCallback(self, onResult: Any, f: Any, *a: Any, **kw: Any) -> None:
        try:
            result = f(*a, **kw)
        except BaseException:  # noqa: BLE001 - as Twisted's thread pool: every error goes to onResult
            from twisted.python.failure import Failure

            onResult(False, Failure())
        else:
            onResult(True, result)


class InlineReactor:
    def callFromThread(self, f: Any, *a: Any, **kw: Any) -> None:
        f(*a, **kw)


class StubChannel:
    """An AMQP channel over ``queues`` (name -> messages)."""

    def __init__(self, queues: dict[str, int], calls: list[tuple]) -> None:
        self.queues = queues
        self.calls = calls

    def _exists(self, queue: str) -> None:
        if queue not in self.queues:
            raise AMQPNotFound(f"NOT_FOUND - no queue '{queue}' in vhost '/'")

    def queue_declare(self, queue: str, passive: bool = False) -> tuple[str, int, int]:
        self.calls.append(("queue_declare", queue, passive))
        self._exists(queue)
        return queue, self.queues[queue], 2

    def queue_purge(self, queue: str) -> int:
        self.calls.append(("queue_purge", queue))
        self._exists(queue)
        purged, self.queues[queue] = self.queues[queue], 0
        return purged

    def queue_delete(self, queue: str) -> int:
        # RabbitMQ deletes a queue that is not there without a word.
        self.calls.append(("queue_delete", queue))
        return self.queues.pop(queue, 0)


class StubConnection:
    def __init__(self, owner: StubApp, **kwargs: Any) -> None:
        self.owner = owner
        owner.calls.append(("connect", kwargs))

    def ensure_connection(self, **kwargs: Any) -> StubConnection:
        if self.owner.raise_ is not None:
            raise self.owner.raise_
        return self

    def channel(self) -> StubChannel:
        if self.owner.channel_error is not None:
            raise self.owner.channel_error
        return StubChannel(self.owner.queues, self.owner.calls)

    def release(self) -> None:
        self.owner.calls.append(("release",))


class StubApp:
    def __init__(self) -> None:
        self.queues: dict[str, int] = {"q1": 3}
        self.calls: list[tuple] = []
        self.raise_: BaseException | None = None
        self.channel_error: BaseException | None = None

    def connection_for_write(self, **kwargs: Any) -> StubConnection:
        return StubConnection(self, **kwargs)


@pytest.fixture
def stub() -> StubApp:
    return StubApp()


@pytest.fixture
def control(stub: StubApp) -> CeleryControl:
    control = CeleryControl(reactor=InlineReactor(), threadpool=InlinePool())
    control._apps[BROKER] = stub
    return control


def result_of(d: Deferred) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def test_control_queue_stats_is_a_passive_declare_bounded_by_the_timeout(control: CeleryControl, stub: StubApp) -> None:
    assert result_of(control.queue_stats(BROKER, "q1", 1.5)) == {"messages": 3, "consumers": 2}
    assert ("queue_declare", "q1", True) in stub.calls
    (_, connect), *_ = stub.calls
    assert connect == {
        "connect_timeout": 1.5,
        "transport_options": {"read_timeout": 1.5, "write_timeout": 1.5},
    }
    assert stub.calls[-1] == ("release",)  # the connection is given back, every time


def test_control_missing_queue_is_none(control: CeleryControl, stub: StubApp) -> None:
    assert result_of(control.queue_stats(BROKER, "nope", 1.0)) is None
    assert result_of(control.queue_purge(BROKER, "nope", 1.0)) is None
    assert result_of(control.queue_delete(BROKER, "nope", 1.0)) is None
    # a 404 closes its channel: each call had a connection of its own
    assert sum(1 for c in stub.calls if c[0] == "connect") == 3
    assert sum(1 for c in stub.calls if c[0] == "release") == 3
    assert ("queue_delete", "nope") not in stub.calls


def test_control_purge_and_delete_count_messages(control: CeleryControl, stub: StubApp) -> None:
    assert result_of(control.queue_purge(BROKER, "q1", 1.0)) == 3
    assert stub.queues == {"q1": 0}
    stub.queues["q1"] = 5
    assert result_of(control.queue_delete(BROKER, "q1", 1.0)) == 5
    assert stub.queues == {}


def test_control_broker_errors(control: CeleryControl, stub: StubApp) -> None:
    stub.raise_ = ConnectionRefusedError(111, "Connection refused")
    with pytest.raises(BrokerUnavailable):
        result_of(control.queue_stats(BROKER, "q1", 1.0))
    stub.raise_ = None
    stub.channel_error = AccessRefused("ACCESS_REFUSED - queue 'q1' is exclusive")
    with pytest.raises(CommandFailed, match="refused"):
        result_of(control.queue_purge(BROKER, "q1", 1.0))
    assert stub.calls[-1] == ("release",)


def test_control_queue_calls_have_their_own_lane(control: CeleryControl) -> None:
    """Queue calls never wait behind (or hold up) the supervisor's control calls."""
    result_of(control.queue_stats(BROKER, "q1", 1.0))
    assert set(control._semaphores) == {("queues", BROKER)}


# -- the agent: figures, purge, deletion of dq.<name> -------------------------------


class Supervisor:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def wake(self) -> Deferred:
        return succeed(None)

    def status(self, name: str) -> WorkerStatus:
        return WorkerStatus(state="stopped")

    def wait_ready(self, name: str, timeout: float) -> Deferred:
        return succeed(True)


class Harness:
    def __init__(self, control: FakeControl | None = None, with_control: bool = True) -> None:
        self.clock = Clock()
        self.store = Store.in_memory()
        self.control = control if control is not None else FakeControl()
        self.local = LocalAgent(
            self.store,
            "agent1",
            BROKER,
            Supervisor(self.clock),
            control=self.control if with_control else None,
        )
        self.agent = Agent(self.local)
        self.treq = StubTreq(API(self.agent).resource())

    def start(self, method: str, path: str, **kwargs: Any) -> list[Any]:
        outcome: list[Any] = []
        d = self.treq.request(method, "http://127.0.0.1:8001" + path, **kwargs)
        d.addCallback(lambda r: self.treq.content(r).addCallback(lambda body: outcome.append((r, body))))
        d.addErrback(outcome.append)
        self.treq.flush()
        return outcome

    def finish(self, outcome: list[Any]) -> tuple[int, Any]:
        self.treq.flush()
        assert outcome, "no response"
        if not isinstance(outcome[0], tuple):
            outcome[0].raiseException()
        response, body = outcome[0]
        assert response.headers.getRawHeaders("content-type") == ["application/json"]
        return response.code, json.loads(body)

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        return self.finish(self.start(method, path, **kwargs))


@pytest.fixture
def h() -> Harness:
    h = Harness()
    assert h.request("PUT", "/app1/", json={"broker": OTHER_BROKER})[0] == 201
    assert h.request("PUT", "/app1/queues/q1/")[0] == 201
    return h


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    seen: list[LogEvent] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(seen.append)


def named(events: list[LogEvent], event: str) -> list[LogEvent]:
    return [e for e in events if e.get("event") == event]


def test_queue_shows_the_brokers_figures(h: Harness) -> None:
    h.control.broker_queues["q1"] = {"messages": 7, "consumers": 2}
    status, body = h.request("GET", "/app1/queues/q1/")
    assert status == 200
    assert (body["name"], body["messages"], body["consumers"]) == ("q1", 7, 2)
    # asked on the app's broker, bounded
    ((_, url, queue, timeout),) = [c for c in h.control.calls if c[0] == "queue_stats"]
    assert (url, queue) == (BrokerInfo.from_url(OTHER_BROKER).url, "q1")
    assert timeout <= 2.0


def test_queue_not_on_the_broker_yet_has_null_figures(h: Harness) -> None:
    status, body = h.request("GET", "/app1/queues/q1")
    assert status == 200
    assert (body["messages"], body["consumers"]) == (None, None)


def test_broker_unavailable_gives_null_figures_not_an_error(h: Harness, events: list[LogEvent]) -> None:
    h.control.broker_queues["q1"] = {"messages": 7, "consumers": 2}
    h.control.broker_up = False
    status, body = h.request("GET", "/app1/queues/q1/")
    assert status == 200
    assert (body["name"], body["messages"], body["consumers"]) == ("q1", None, None)
    (event,) = named(events, "queue.figures.unavailable")
    assert (event["app"], event["queue"]) == ("app1", "q1")
    assert "secret" not in repr(event)


def test_control_failing_otherwise_gives_null_figures(h: Harness) -> None:
    def broken(*a: Any, **kw: Any) -> Deferred:
        raise RuntimeError("a bug in the control layer")

    h.control.queue_stats = broken  # type: ignore[method-assign]
    status, body = h.request("GET", "/app1/queues/q1/")
    assert (status, body["messages"], body["consumers"]) == (200, None, None)


def test_broker_that_does_not_answer_gives_null_figures_in_bounded_time(h: Harness) -> None:
    h.control.paused = True  # holds every call: a broker that never answers
    outcome = h.start("GET", "/app1/queues/q1/")
    assert not outcome
    h.clock.advance(h.local.queue_timeout)
    status, body = h.finish(outcome)
    assert (status, body["messages"], body["consumers"]) == (200, None, None)


def test_no_control_gives_null_figures_and_purge_is_503() -> None:
    h = Harness(with_control=False)
    assert h.request("PUT", "/app1/queues/q1/")[0] == 201
    status, body = h.request("GET", "/app1/queues/q1/")
    assert (status, body["messages"], body["consumers"]) == (200, None, None)
    assert h.request("POST", "/app1/queues/q1/purge")[0] == 503


def test_purge_answers_how_many_and_empties_the_queue(h: Harness, events: list[LogEvent]) -> None:
    h.control.broker_queues["q1"] = {"messages": 3, "consumers": 0}
    for method in ("POST", "PUT"):
        status, body = h.request(method, "/app1/queues/q1/purge/")
        assert (status, body) == (200, {"purged": 3 if method == "POST" else 0})
    assert h.request("GET", "/app1/queues/q1/")[1]["messages"] == 0
    assert [e["purged"] for e in named(events, "queue.purged")] == [3, 0]
    assert h.control.count("queue_purge") == 2


def test_purge_of_a_queue_not_on_the_broker_purges_nothing(h: Harness) -> None:
    assert h.request("POST", "/app1/queues/q1/purge") == (200, {"purged": 0})


def test_purge_of_an_unknown_queue_or_app_is_404(h: Harness) -> None:
    before = h.store.dump()
    status, body = h.request("POST", "/app1/queues/nope/purge")
    assert status == 404 and body["queue"] == "nope"
    assert h.request("POST", "/nope/queues/q1/purge")[0] == 404
    assert h.control.count("queue_purge") == 0
    assert h.store.dump() == before


def test_purge_with_the_broker_unavailable_is_503(h: Harness) -> None:
    h.control.broker_up = False
    status, body = h.request("POST", "/app1/queues/q1/purge")
    assert status == 503
    assert body["queue"] == "q1" and "purge" in body["error"]
    assert "secret" not in json.dumps(body)


def test_purge_of_a_broker_that_does_not_answer_is_503_in_bounded_time(h: Harness) -> None:
    h.control.paused = True
    outcome = h.start("POST", "/app1/queues/q1/purge")
    assert not outcome
    h.clock.advance(h.local.queue_timeout)
    assert h.finish(outcome)[0] == 503


@pytest.mark.parametrize(
    ("path", "params", "parameter"),
    [
        ("/app1/queues/q1/purge", {"x": "1"}, "x"),
        ("/app1/queues/q1/purge", {"nowait": "maybe"}, "nowait"),
        ("/app%20x/queues/q1/purge", {}, "app"),
        ("/app1/queues/" + "q" * 300 + "/purge", {}, "queue"),
    ],
)
def test_purge_bad_input_is_400_naming_the_parameter(h: Harness, path: str, params: dict, parameter: str) -> None:
    h.control.broker_queues["q1"] = {"messages": 3, "consumers": 0}
    before = h.store.dump()
    status, body = h.request("POST", path, params=params)
    assert 400 <= status < 500, body
    assert parameter in json.dumps(body), body
    assert h.store.dump() == before
    assert h.control.broker_queues["q1"]["messages"] == 3


def test_purge_route_refuses_other_methods(h: Harness) -> None:
    for method in ("GET", "DELETE", "PATCH"):
        status, body = h.request(method, "/app1/queues/q1/purge/")
        assert status == 405, (method, body)
        assert sorted(body["allowed"]) == ["POST", "PUT"]


def test_deleting_an_instance_deletes_its_private_queue(h: Harness, events: list[LogEvent]) -> None:
    status, instance = h.request("PUT", "/app1/instances/w1/", params={"broker": BROKER})
    assert status == 201
    h.control.broker_queues["dq.w1"] = {"messages": 4, "consumers": 0}
    h.control.broker_queues["q1"] = {"messages": 1, "consumers": 0}
    status, body = h.request("DELETE", "/app1/instances/w1/")
    assert status == 200 and body["name"] == "w1"
    assert h.control.broker_queues == {"q1": {"messages": 1, "consumers": 0}}
    ((_, url, queue, _timeout),) = [c for c in h.control.calls if c[0] == "queue_delete"]
    assert (url, queue) == (BrokerInfo.from_url(BROKER).url, "dq.w1")  # the instance's broker
    (event,) = named(events, "instance.queue.deleted")
    assert (event["instance"], event["queue"], event["messages"], event["existed"]) == ("w1", "dq.w1", 4, True)


def test_deleting_an_instance_whose_queue_is_gone_logs_none_dropped(h: Harness, events: list[LogEvent]) -> None:
    assert h.request("PUT", "/app1/instances/w1/")[0] == 201
    assert h.request("DELETE", "/instances/w1/")[0] == 200
    (event,) = named(events, "instance.queue.deleted")
    assert (event["messages"], event["existed"]) == (0, False)


def test_deleting_an_instance_with_the_broker_down_still_deletes_it(h: Harness, events: list[LogEvent]) -> None:
    assert h.request("PUT", "/app1/instances/w1/")[0] == 201
    h.control.broker_queues["dq.w1"] = {"messages": 4, "consumers": 0}
    h.control.broker_up = False
    status, body = h.request("DELETE", "/app1/instances/w1/")
    assert status == 200 and body["name"] == "w1"
    assert not h.store.has_node("w1")
    (event,) = named(events, "instance.queue.delete_failed")
    assert (event["instance"], event["queue"]) == ("w1", "dq.w1")
    assert not named(events, "instance.queue.deleted")


def test_deleting_an_instance_with_a_silent_broker_is_bounded(h: Harness, events: list[LogEvent]) -> None:
    assert h.request("PUT", "/app1/instances/w1/")[0] == 201
    h.control.paused = True
    outcome = h.start("DELETE", "/app1/instances/w1/")
    assert not outcome
    h.clock.advance(h.local.queue_timeout)
    assert h.finish(outcome)[0] == 200
    assert named(events, "instance.queue.delete_failed")


# -- peers ----------------------------------------------------------------------


def test_peers_may_ask_for_a_purge_with_checked_arguments() -> None:
    assert check_operation("queue_purge", {"app": "app1", "name": "q1"}) == {"app": "app1", "name": "q1"}
    with pytest.raises(BadParameter) as bad:
        check_operation("queue_purge", {"app": "app1", "name": "q" * 300})
    assert bad.value.details.get("parameter") == "queue"
    with pytest.raises(BadParameter):
        check_operation("queue_purge", {"app": "app1", "name": "q1", "broker": BROKER})
    with pytest.raises(BadParameter):
        check_operation("queue_purge", {"app": "app1"})


def test_a_peers_purge_runs_here(h: Harness) -> None:
    h.control.broker_queues["q1"] = {"messages": 2, "consumers": 0}
    assert result_of(h.agent.handle_remote("queue_purge", {"app": "app1", "name": "q1"})) == {"purged": 2}
    with pytest.raises(NotFound):
        result_of(h.agent.handle_remote("queue_purge", {"app": "app1", "name": "nope"}))
    h.control.broker_up = False
    with pytest.raises(Unavailable):
        result_of(h.agent.handle_remote("queue_purge", {"app": "app1", "name": "q1"}))


class ScatterSRS:
    """SRS connected to one peer that owns every queue asked about."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.asked: list[tuple[str, dict]] = []

    def is_connected(self) -> bool:
        return True

    def scatter(self, operation: str, arguments: dict, timeout: float | None = None) -> Deferred:
        self.asked.append((operation, arguments))
        return succeed(({"agent2": self.answer}, []))


def test_purge_of_a_queue_declared_on_a_peer_goes_to_the_peer() -> None:
    store = Store.in_memory()
    srs = ScatterSRS({"purged": 5})
    agent = Agent(LocalAgent(store, "agent1", BROKER, control=FakeControl()), srs)
    reply = result_of(Deferred.fromCoroutine(agent.queue_operation("queue_purge", "app1", "q1")))
    assert reply.body == {"purged": 5}
    assert srs.asked == [("queue_purge", {"app": "app1", "name": "q1"})]


def test_finding_a_peers_queue_keeps_the_declaration_alone() -> None:
    """A peer's queue object now carries figures: the binding leaves them out."""
    answer = {**QueueBinding("q1", "ex", "rk").to_json(), "messages": 3, "consumers": 1}
    found = result_of(ClusterQueues(Store.in_memory(), ScatterSRS(answer))("app1", "q1"))
    assert found == QueueBinding("q1", "ex", "rk")


def test_deleting_an_app_deletes_its_instances_private_queues(h: Harness, events: list[LogEvent]) -> None:
    for name in ("w1", "w2"):
        assert h.request("PUT", f"/app1/instances/{name}/")[0] == 201
        h.control.broker_queues[f"dq.{name}"] = {"messages": 1, "consumers": 0}
    h.control.broker_queues["q1"] = {"messages": 1, "consumers": 0}
    assert h.request("DELETE", "/app1/")[0] == 200
    assert h.control.broker_queues == {"q1": {"messages": 1, "consumers": 0}}
    assert sorted(e["queue"] for e in named(events, "instance.queue.deleted")) == ["dq.w1", "dq.w2"]
