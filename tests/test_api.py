"""The HTTP API contract (README "The HTTP API") on one agent, through StubTreq."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.logger import LogEvent, globalLogPublisher

from scs.agent import Agent, LocalAgent
from scs.http.api import API
from scs.records import WorkerStatus
from scs.store import Store

BROKER = "amqp://guest:guest@127.0.0.1:5672//"


class RecordingSupervisor:
    """Stands in for the supervisor: records what the agent asks of it."""

    def __init__(self) -> None:
        self.wakes = 0
        self.ready_asked: list[tuple[str, float]] = []
        self.resets: list[str] = []
        self.restarts: list[str] = []

    def wake(self) -> Deferred:
        self.wakes += 1
        return succeed(None)

    def status(self, name: str) -> WorkerStatus:
        return WorkerStatus(state="running", pid=4242, restarts=len(self.restarts))

    def wait_ready(self, name: str, timeout: float) -> Deferred:
        self.ready_asked.append((name, timeout))
        return succeed(True)

    def hold_reconfigure(self, app: str, seconds: float) -> None:
        self.held = getattr(self, "held", []) + [(app, seconds)]

    def reset(self, name: str) -> None:
        self.resets.append(name)

    def restart(self, name: str) -> Deferred:
        self.restarts.append(name)
        return succeed(None)

    def active_queues(self, name: str) -> Deferred:
        return succeed([f"dq.{name}"])

    def stats(self, name: str) -> Deferred:
        return succeed({"pid": 4242, "autoscaler": {"max": 1, "min": 1}})


class Client:
    """Synchronous requests against the API through StubTreq."""

    def __init__(self, supervisor: Any = None) -> None:
        self.store = Store.in_memory()
        self.supervisor = supervisor
        self.agent = Agent(LocalAgent(self.store, "agent1", BROKER, supervisor))
        self.treq = StubTreq(API(self.agent).resource())

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
        outcome: list[Any] = []
        d = self.treq.request(method, "http://127.0.0.1:8001" + path, **kwargs)

        def read(response: Any) -> Deferred:
            return self.treq.content(response).addCallback(lambda body: outcome.append((response, body)))

        d.addCallback(read)
        d.addErrback(outcome.append)
        self.treq.flush()
        assert outcome, f"no response to {method} {path}"
        if not isinstance(outcome[0], tuple):
            outcome[0].raiseException()
        response, body = outcome[0]
        assert response.headers.getRawHeaders("content-type") == ["application/json"]
        return response.code, json.loads(body), response.headers


@pytest.fixture
def client() -> Client:
    return Client()


def test_ping(client: Client) -> None:
    assert client.request("GET", "/ping/")[:2] == (200, {"ok": "pong"})


def test_agents_lists_this_agent_alone_without_srs(client: Client) -> None:
    status, body, _ = client.request("GET", "/agents")
    assert status == 200
    assert [a["id"] for a in body] == ["agent1"]
    assert body[0]["alive"] is True


def test_introduction_session(client: Client) -> None:
    """The curl session of the introduction, redone against the real API."""
    status, instance, _ = client.request("PUT", "/foo/instances/")
    assert status == 201
    name = instance["name"]
    assert instance["is_enabled"] is True
    assert instance["queues"] == []
    assert instance["max_concurrency"] == instance["min_concurrency"] == 1
    assert instance["broker"] == {
        "hostname": "127.0.0.1",
        "port": 5672,
        "userid": "guest",
        "password": "********",
        "virtual_host": "/",
    }
    assert (instance["app"], instance["agent"]) == ("foo", "agent1")

    assert client.request("GET", "/foo/instances/")[:2] == (200, [name])

    status, queue, _ = client.request("POST", "/foo/queues/tasks/", data={"exchange": "tasks", "routing_key": "tasks"})
    assert status == 201
    assert queue == {
        "name": "tasks",
        "exchange": "tasks",
        "routing_key": "tasks",
        "options": None,
        "exchange_type": None,
    }
    assert client.request("GET", "/foo/queues/")[:2] == (200, ["tasks"])

    assert client.request("PUT", f"/foo/instances/{name}/queues/tasks")[:2] == (
        201,
        {"ok": "ok"},
    )
    assert client.request("GET", f"/foo/instances/{name}/")[1]["queues"] == ["tasks"]
    assert client.request("DELETE", f"/foo/instances/{name}/queues/tasks")[:2] == (
        200,
        {"ok": "ok"},
    )
    assert client.request("DELETE", "/foo/queues/tasks/")[0] == 200
    assert client.request("GET", "/foo/queues/")[1] == []
    status, deleted, _ = client.request("DELETE", f"/instances/{name}/")
    assert status == 200 and deleted["name"] == name
    assert client.request("GET", "/foo/instances/")[1] == []
    assert client.store.dump()["node"] == []


@pytest.mark.parametrize(
    "path",
    [
        "/ping",
        "/agents",
        "/foo",
        "/foo/instances",
        "/foo/queues",
        "/foo/instances/w1",
        "/foo/instances/w1/autoscale",
        "/foo/instances/w1/queues",
        "/foo/queues/q",
    ],
)
def test_every_route_answers_with_and_without_trailing_slash(client: Client, path: str) -> None:
    client.request("PUT", "/foo/instances/w1")
    client.request("PUT", "/foo/queues/q")
    without = client.request("GET", path)
    with_slash = client.request("GET", path + "/")
    assert without[0] == with_slash[0] == 200
    assert without[1] == with_slash[1]


def test_parameters_as_query_form_or_json(client: Client) -> None:
    by_query = client.request("PUT", "/foo/instances/a?max_concurrency=4&min_concurrency=2")
    by_form = client.request("POST", "/foo/instances/b", data={"max_concurrency": "4", "min_concurrency": "2"})
    by_json = client.request(
        "PUT",
        "/foo/instances/c",
        data=json.dumps({"max_concurrency": 4, "min_concurrency": 2}).encode(),
        headers={"Content-Type": "application/json"},
    )
    # curl -d '{...}' sends JSON labelled as a form: still read as JSON.
    by_curl_json = client.request("PUT", "/foo/instances/d", data=b'{"max_concurrency": 4, "min_concurrency": 2}')
    for status, body, _ in (by_query, by_form, by_json, by_curl_json):
        assert status == 201
        assert (body["max_concurrency"], body["min_concurrency"]) == (4, 2)


def test_named_instance_is_idempotent_and_conflicts_on_other_settings(client: Client) -> None:
    assert client.request("PUT", "/foo/instances/w1?max_concurrency=2")[0] == 201
    assert client.request("PUT", "/foo/instances/w1?max_concurrency=2")[0] == 200
    status, body, _ = client.request("PUT", "/foo/instances/w1?max_concurrency=3")
    assert status == 409 and "other settings" in body["error"]


def test_instance_with_queues_broker_and_arguments(client: Client) -> None:
    client.request("PUT", "/foo/queues/images", data={"exchange": "media", "routing_key": "img"})
    status, body, _ = client.request(
        "PUT",
        "/foo/instances/w1",
        data={
            "queues": "images,video",
            "broker": "amqp://u:secret@127.0.0.1:5672/prod",
            "arguments": "--prefetch-multiplier=1 -O fair",
        },
    )
    assert status == 201
    assert body["queues"] == ["images", "video"]
    assert body["broker"]["userid"] == "u" and body["broker"]["password"] == "********"
    assert body["broker"]["virtual_host"] == "prod"
    assert body["arguments"] == ["--prefetch-multiplier=1", "-O", "fair"]
    spec = client.store.get_node("w1")
    images = spec.queues[0]
    assert (images.exchange, images.routing_key) == ("media", "img")
    assert (spec.queues[1].exchange, spec.queues[1].routing_key) == ("video", "video")


def test_app_put_get_delete(client: Client) -> None:
    status, body, _ = client.request(
        "PUT", "/foo/", data={"celery_app": "proj.celery:app", "broker": "amqp://a:b@127.0.0.1//"}
    )
    assert status == 201
    assert body["celery_app"] == "proj.celery:app"
    assert body["broker"]["userid"] == "a" and body["broker"]["password"] == "********"
    assert client.request("POST", "/foo/", data={"arguments": "-O fair"})[0] == 200
    assert client.request("GET", "/foo/")[1]["arguments"] == ["-O", "fair"]
    client.request("PUT", "/foo/instances/w1")
    status, body, _ = client.request("DELETE", "/foo/")
    assert status == 200 and body["instances"] == ["w1"]
    assert client.request("GET", "/foo/")[0] == 404
    assert client.request("DELETE", "/foo/")[0] == 404


def test_app_is_created_on_first_use_with_default_broker(client: Client) -> None:
    client.request("PUT", "/bar/queues/q")
    status, body, _ = client.request("GET", "/bar/")
    assert status == 200
    assert body["broker"]["hostname"] == "127.0.0.1" and body["celery_app"] is None


def test_enable_disable_autoscale(client: Client) -> None:
    client.request("PUT", "/foo/instances/w1?max_concurrency=4&min_concurrency=1")
    status, body, _ = client.request("POST", "/foo/instances/w1/disable")
    assert status == 200 and body["is_enabled"] is False
    assert client.request("POST", "/foo/instances/w1/enable/")[1]["is_enabled"] is True
    assert client.request("GET", "/foo/instances/w1/autoscale/")[1] == {"max": 4, "min": 1}
    assert client.request("POST", "/foo/instances/w1/autoscale/", data={"max": "8", "min": "2"})[:2] == (
        200,
        {"max": 8, "min": 2},
    )
    status, body, _ = client.request("POST", "/foo/instances/w1/autoscale/", data={"min": "9"})
    assert status == 400 and "greater" in body["error"]
    assert client.request("GET", "/foo/instances/w1/autoscale")[1] == {"max": 8, "min": 2}


def test_not_found_answers(client: Client) -> None:
    assert client.request("GET", "/foo/instances/nope/")[0] == 404
    assert client.request("DELETE", "/instances/nope/")[0] == 404
    assert client.request("GET", "/foo/queues/nope/")[0] == 404
    client.request("PUT", "/foo/instances/w1")
    assert client.request("GET", "/bar/instances/w1/")[0] == 404
    assert client.request("DELETE", "/foo/instances/w1/queues/never")[0] == 404
    status, body, _ = client.request("GET", "/a/b/c/d/e/f")
    assert status == 404 and body["error"]


def test_wrong_method_is_405_with_allow_header(client: Client) -> None:
    status, body, headers = client.request("DELETE", "/foo/instances/")
    assert status == 405
    assert set(body["allowed"]) == {"GET", "POST", "PUT"}
    assert headers.getRawHeaders("allow") == ["GET, POST, PUT"]
    assert client.request("PATCH", "/foo/instances/w1/stats/")[0] == 405


def test_unicode_instance_name_round_trips(client: Client) -> None:
    name = "wörker-ü1"
    status, body, _ = client.request("PUT", f"/foo/instances/{quote(name)}/")
    assert status == 201 and body["name"] == name
    assert client.request("GET", "/foo/instances/")[1] == [name]
    assert client.request("DELETE", f"/foo/instances/{quote(name)}")[0] == 200


def test_stats_without_supervisor_is_503(client: Client) -> None:
    client.request("PUT", "/foo/instances/w1")
    assert client.request("GET", "/foo/instances/w1/stats/")[0] == 503


def test_supervisor_is_told_and_awaited() -> None:
    supervisor = RecordingSupervisor()
    client = Client(supervisor)
    status, body, _ = client.request("PUT", "/foo/instances/w1")
    assert status == 201
    assert (body["state"], body["pid"]) == ("running", 4242)
    assert [name for name, _ in supervisor.ready_asked] == ["w1"]
    assert client.request("PUT", "/foo/instances/w2?nowait=1")[0] == 202
    assert [name for name, _ in supervisor.ready_asked] == ["w1"]  # nowait did not wait
    wakes = supervisor.wakes
    client.request("PUT", "/foo/instances/w1/queues/tasks")
    assert supervisor.wakes > wakes
    client.request("POST", "/foo/instances/w1/enable")
    assert supervisor.resets == ["w1"]
    assert client.request("POST", "/foo/instances/w1/restart")[1]["restarts"] == 1
    assert client.request("GET", "/foo/instances/w1/stats")[1]["pid"] == 4242
    assert client.request("GET", "/foo/instances/w1/queues")[1]["active"] == ["dq.w1"]


def test_operations_are_logged_as_structured_events(client: Client) -> None:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        client.request("PUT", "/foo/instances/w1")
        client.request("GET", "/foo/instances/nope")
    finally:
        globalLogPublisher.removeObserver(events.append)
    operations = [e for e in events if e.get("log_namespace") == "scs.agent"]
    calls = [e for e in operations if "operation" in e]
    assert calls[0]["operation"] == "Node.add"
    assert calls[0]["arguments"]["name"] == "w1"
    replies = [e for e in operations if "status" in e]
    assert replies[0]["status"] == 201 and replies[0]["body"]["name"] == "w1"
    assert replies[-1]["status"] == 404


def test_missing_agents_header_is_bounded(client: Client) -> None:
    from scs.agent import Reply

    phantoms = tuple(f"phantom-{i:04d}" for i in range(5000))

    async def listing(app: str) -> Reply:
        return Reply(["w1"], missing=phantoms)

    client.agent.instance_list = listing  # type: ignore[method-assign]
    status, body, headers = client.request("GET", "/foo/instances/")
    assert (status, body) == (200, ["w1"])
    listed = headers.getRawHeaders("x-scs-missing-agents")[0].split(",")
    assert listed == list(phantoms[:20])
    assert headers.getRawHeaders("x-scs-missing-agents-count") == ["5000"]


class FailingSupervisor(RecordingSupervisor):
    """Its workers keep dying before they answer."""

    def wait_ready(self, name: str, timeout: float) -> Deferred:
        return succeed(False)

    def status(self, name: str) -> WorkerStatus:
        return WorkerStatus(state="restarting", pid=None, restarts=2)


def test_create_whose_worker_cannot_start_is_an_error_not_201() -> None:
    client = Client(FailingSupervisor())
    status, body, _ = client.request("PUT", "/foo/instances/w1/")
    assert status == 502
    assert "cannot start" in body["error"]
    assert body["instance"]["name"] == "w1" and body["instance"]["state"] == "restarting"
    # kept, to be fixed and restarted; asking again says the same
    assert client.store.has_node("w1")
    assert client.request("PUT", "/foo/instances/w1/")[0] == 502
    assert client.request("PUT", "/foo/instances/w2/?nowait=1")[0] == 202


def test_slow_worker_is_still_201_starting() -> None:
    class Slow(RecordingSupervisor):
        def wait_ready(self, name: str, timeout: float) -> Deferred:
            return succeed(False)

        def status(self, name: str) -> WorkerStatus:
            return WorkerStatus(state="starting", pid=4242, restarts=0)

    client = Client(Slow())
    status, body, _ = client.request("PUT", "/foo/instances/w1/")
    assert (status, body["state"]) == (201, "starting")


def test_root_lists_the_apps(client: Client) -> None:
    client.request("PUT", "/foo/")
    client.request("PUT", "/bar/instances/w1/")
    assert client.request("GET", "/")[:2] == (200, ["bar", "foo"])


def test_instance_listing_with_details_and_node(client: Client) -> None:
    client.request("PUT", "/foo/instances/w1/")
    client.request("PUT", "/foo/instances/w2/", params={"max_concurrency": "2"})
    client.request("PUT", "/bar/instances/other/")
    status, body, _ = client.request("GET", "/foo/instances/", params={"details": "1"})
    assert status == 200
    assert [i["name"] for i in body] == ["w1", "w2"]
    assert body[1]["max_concurrency"] == 2
    assert body[0]["node"] == "w1@agent1"  # <instance>@<agent id>
    assert client.request("GET", "/foo/instances/")[1] == ["w1", "w2"]
    assert client.request("GET", "/foo/instances/", params={"details": "maybe"})[0] == 400
