"""A red-team pass over the doors this round added, as an attacker would
knock on them: the worker-log route, the app settings ``env``/``workdir``/
``python``, ``nowait``, empty form fields, purge, drain, the OpenAPI
document, the peer operations of failover and drain, the replicated
documents, the fence, the failover decision, and the log lines.

Tests that pass document properties that hold.  A finding is first
written as ``xfail(strict=True)``, the scenario that breaks the property,
and loses the marker when the product is fixed: the first pass's ten
findings (code run through ``env``, an instance lost by a fence acting on a
stale copy, secrets in two log lines, unbounded ``nowait`` work, a costly
copy refresh, ``PYTHONPATH`` naming a world-writable directory, ``""`` in
JSON read as a reset) are fixed and their tests pass.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from scs import srs
from scs.agent import Agent, LocalAgent
from scs.errors import BadParameter, NotFound, SCSError
from scs.failover import Fence
from scs.operation_args import check_operation
from scs.replica import MAX_DOCUMENTS, MIN_FETCH_INTERVAL, PeerView, Replicas, check_documents
from scs.srs_trust import MAX_MESSAGE_BYTES, MessageCodec
from scs.store import Store
from scs.worker import worker_directory
from scs.worker_log import MAX_ANSWER_JSON_BYTES
from tests.surfaces_support import FakeSupervisor
from tests.test_api import Client, RecordingSupervisor
from tests.test_failover import FAILOVER_AFTER, Cluster, good_document
from tests.test_srs_hostile import INTERVAL, SECRET, Bus, forged

BROKER = "amqp://guest:guest@127.0.0.1:5672//"


# -- helpers -----------------------------------------------------------------


class LogCapture:
    """Every event of the global log publisher while it is installed."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)

    def close(self) -> None:
        globalLogPublisher.removeObserver(self.events.append)

    def leaking(self, secret: str) -> list[dict[str, Any]]:
        """Events whose text or fields carry ``secret``."""
        found = []
        for event in self.events:
            fields = {k: v for k, v in event.items() if not k.startswith("log_")}
            text = formatEvent(event) + " " + repr(fields)
            if secret in text:
                found.append(event)
        return found


@pytest.fixture
def logs() -> Any:
    capture = LogCapture()
    yield capture
    capture.close()


def outcome_of(d: Deferred) -> Any:
    """The result of an already fired Deferred, or its exception."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    result = box[0]
    return result.value if hasattr(result, "value") and hasattr(result, "raiseException") else result


@pytest.fixture
def log_client(tmp_path: Path) -> Client:
    client = Client()
    client.agent.local.instance_dir = str(tmp_path / "instances")
    assert client.request("PUT", "/foo/instances/w1/")[0] == 201
    (tmp_path / "instances" / "w1").mkdir(parents=True)
    return client


# -- the worker log route -------------------------------------------------------


def test_log_route_does_not_block_on_a_fifo(log_client: Client, tmp_path: Path) -> None:
    """A FIFO planted as worker.log would block an open() forever (no
    writer): it is refused at once, as JSON."""
    os.mkfifo(tmp_path / "instances" / "w1" / "worker.log")
    status, body, _ = log_client.request("GET", "/foo/instances/w1/log/")
    assert status == 503 and "not a regular file" in body["error"]


def test_log_route_refuses_a_symlinked_instance_directory(log_client: Client, tmp_path: Path) -> None:
    """Not only the file: a directory component that is a link elsewhere
    is refused too, and the target's lines never reach the answer."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "worker.log").write_bytes(b"secret-line-from-elsewhere\n")
    (tmp_path / "instances" / "w1").rmdir()
    (tmp_path / "instances" / "w1").symlink_to(elsewhere)
    status, body, _ = log_client.request("GET", "/foo/instances/w1/log/?lines=10000")
    assert status == 400 and body["parameter"] == "instance"
    assert "secret-line-from-elsewhere" not in json.dumps(body)


def test_log_route_bounds_a_huge_sparse_binary_file(log_client: Client, tmp_path: Path) -> None:
    """A 4 GiB file of NULs without a newline, ending in bytes that are not
    UTF-8: the answer is quick, valid JSON and within its budget."""
    path = tmp_path / "instances" / "w1" / "worker.log"
    with open(path, "wb") as f:
        f.truncate(4 * 1024**3)  # sparse: costs no disk
        f.seek(0, os.SEEK_END)
        f.write(b"\n\xff\xfe\x00\x1b[31m binary tail")
    started = time.perf_counter()
    status, body, _ = log_client.request("GET", "/foo/instances/w1/log/?lines=10000")
    assert time.perf_counter() - started < 5.0
    assert status == 200
    assert len(json.dumps(body["lines"])) <= MAX_ANSWER_JSON_BYTES
    assert body["lines"][-1].endswith("binary tail")


def test_log_route_many_short_lines_stay_within_the_budget(log_client: Client, tmp_path: Path) -> None:
    path = tmp_path / "instances" / "w1" / "worker.log"
    path.write_bytes(b"\x01" * 7 + b"\n" * 1 + (b"\x00" * 200 + b"\n") * 20000)
    status, body, _ = log_client.request("GET", "/foo/instances/w1/log/?lines=10000")
    assert status == 200
    # Control characters cost 6 bytes each as JSON: the answer is cut so
    # that it fits an SRS message (whose envelope may double it).
    assert len(json.dumps(body, ensure_ascii=True)) <= MAX_MESSAGE_BYTES // 2


@pytest.mark.parametrize(
    "path",
    [
        "/foo/instances/..%2Fetc/log/",
        "/foo/instances/.hidden/log/",
        "/foo/instances/w1%00/log/",
        "/foo/instances/-x/log/",
    ],
)
def test_log_route_refuses_names_that_are_not_one_safe_component(log_client: Client, path: str) -> None:
    status, body, _ = log_client.request("GET", path)
    assert status == 400, body


# -- app settings: env, workdir, python ---------------------------------------------


def test_loader_and_celery_variables_are_refused_at_both_doors(logs: LogCapture) -> None:
    client = Client()
    for env in ({"LD_PRELOAD": "/tmp/x.so"}, {"ld_audit": "x"}, {"CELERY_LOADER": "x"}, {"PYTHONSTARTUP": "/x"}):
        status, body, _ = client.request("PUT", "/foo/", json={"env": env})
        assert (status, body["parameter"]) == (400, "env"), env
        with pytest.raises(BadParameter):
            check_operation("app_put", {"app": "foo", "env": env})
    assert client.store.list_apps() == []


def test_a_peers_world_writable_workdir_is_refused_where_the_worker_would_run(tmp_path: Path) -> None:
    """A peer's paths are checked for their form only; the agent that would
    spawn the worker checks them on its machine, world-writable refused."""
    store = Store.in_memory()
    local = LocalAgent(store, "agent1", BROKER)
    local.app_put(**check_operation("app_put", {"app": "foo", "workdir": "/tmp"}))
    store.add_node("foo", "w1", BROKER)
    with pytest.raises(SCSError) as caught:
        worker_directory(store.get_node("w1"))
    assert "writable by every user" in caught.value.message


@pytest.mark.parametrize(
    "name, value",
    [
        ("PYTHONWARNINGS", "ignore::antigravity.x"),
        ("BROWSER", "perlthanks"),
        ("PERL5OPT", "-Mbase"),
        ("PYTHONBREAKPOINT", "os.system"),
        ("BASH_ENV", "/tmp/x"),
        ("NODE_OPTIONS", "--require /tmp/x"),
        ("pythonstartup", "/tmp/x"),
    ],
)
def test_env_from_a_peer_cannot_name_code_to_run(name: str, value: str) -> None:
    """Fixed finding: PYTHONWARNINGS (imports a module), BROWSER (run by
    webbrowser) and PERL5OPT (run by perl) together ran any code when the
    worker's interpreter started.  PYTHON* is now an allow-list and other
    programs' start-up hooks are refused, at the peer door as at the API."""
    store = Store.in_memory()
    before = store.dump()
    with pytest.raises(BadParameter) as refused:
        check_operation("app_put", {"app": "foo", "env": {name: value}})
    assert refused.value.to_json()["parameter"] == "env"
    assert value not in refused.value.message
    assert store.dump() == before


def test_pythonpath_naming_a_world_writable_directory_is_refused_like_workdir() -> None:
    client = Client()
    assert client.request("PUT", "/foo/", json={"workdir": "/tmp"})[0] == 400
    status, body, _ = client.request("PUT", "/foo/", json={"env": {"PYTHONPATH": "/srv/ok:/tmp"}})
    assert (status, body.get("parameter")) == (400, "env")


@pytest.mark.parametrize("setting", ["workdir", "python", "env"])
def test_json_empty_string_is_a_value_not_a_reset(setting: str, tmp_path: Path) -> None:
    client = Client()
    tmp_path.chmod(0o755)
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    settings = {"workdir": str(tmp_path), "python": str(python), "env": {"A": "1"}}
    assert client.request("PUT", "/foo/", json=settings)[0] == 201
    before = client.store.dump()
    status, body, _ = client.request("PUT", "/foo/", json={setting: ""})
    assert (status, body.get("parameter")) == (400, setting)
    assert client.store.dump() == before


def test_empty_form_fields_change_no_setting(tmp_path: Path) -> None:
    client = Client()
    tmp_path.chmod(0o755)
    assert client.request("PUT", "/foo/", json={"workdir": str(tmp_path), "env": {"A": "1"}})[0] == 201
    before = client.store.dump()
    status, _, _ = client.request("PUT", "/foo/?env=&workdir=&python=&task_events=&broker=&arguments=&celery_app=")
    assert status == 200
    assert client.store.dump() == before
    # An unknown parameter is still named, empty or not.
    status, body, _ = client.request("PUT", "/foo/?evil=")
    assert (status, body["parameter"]) == (400, "evil")


# -- nowait ------------------------------------------------------------------------


class StuckSupervisor(RecordingSupervisor):
    """Restarts that never end (a worker that hangs in its shutdown)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Deferred] = []

    def restart(self, name: str) -> Deferred:
        d: Deferred = Deferred()
        self.pending.append(d)
        return d


def test_nowait_answers_202_without_the_outcome_and_bad_input_first(logs: LogCapture) -> None:
    supervisor = StuckSupervisor()
    client = Client(supervisor)
    assert client.request("PUT", "/foo/instances/w1/")[0] == 201
    # Checked before the 202: an unknown instance name that is not a name.
    assert client.request("POST", "/foo/instances/..%2Fx/restart/?nowait=1")[0] == 400
    assert client.request("POST", "/foo/instances/w1/restart/?nowait=maybe")[1]["parameter"] == "nowait"
    status, body, _ = client.request("POST", "/foo/instances/w1/restart/?nowait=1")
    assert (status, body) == (202, {"accepted": True})
    supervisor.pending[0].errback(RuntimeError("secret detail of a background failure"))
    # The failure is logged, never answered (there is nobody to answer).
    failures = [e["log_failure"].getErrorMessage() for e in logs.events if "log_failure" in e]
    assert "secret detail of a background failure" in failures


def test_nowait_background_work_is_bounded() -> None:
    supervisor = StuckSupervisor()
    client = Client(supervisor)
    assert client.request("PUT", "/foo/instances/w1/")[0] == 201
    refused = 0
    for _ in range(300):
        status, _, _ = client.request("POST", "/foo/instances/w1/restart/?nowait=1")
        refused += status != 202
    # Some cap (a few hundred operations at most) must turn the rest away.
    assert len(supervisor.pending) <= 256 and refused > 0


# -- purge, drain, openapi -------------------------------------------------------------


def test_purge_cannot_reach_private_or_broker_queues_or_undeclared_ones() -> None:
    client = Client()
    assert client.request("PUT", "/foo/instances/w1/")[0] == 201
    before = client.store.dump()
    for queue in ("dq.w1", "DQ.w1", "amq.rabbitmq.trace"):
        status, body, _ = client.request("POST", f"/foo/queues/{queue}/purge")
        assert (status, body["parameter"]) == (400, "queue"), queue
        with pytest.raises(BadParameter):
            check_operation("queue_purge", {"app": "foo", "name": queue})
    # A queue the app never declared is not purged on the broker.
    assert client.request("POST", "/foo/queues/celery/purge")[0] == 404
    assert client.store.dump() == before


def test_drain_route_checks_the_agent_id() -> None:
    client = Client()
    for path, expected in (
        ("/agents/a%20b/drain", 400),
        ("/agents/..%2F/drain", 400),
        ("/agents/.x/undrain", 400),
        ("/agents/nobody/drain", 404),
        ("/agents/agent1/drain?evil=1", 400),
    ):
        assert client.request("POST", path)[0] == expected, path
    assert client.request("GET", "/agents/agent1/drain")[0] == 405
    assert client.agent.local.draining is False


def test_openapi_carries_no_secret_and_is_read_only() -> None:
    client = Client()
    assert client.request("PUT", "/foo/", json={"broker": "amqp://u:openapi-pw-77@127.0.0.1:5672//"})[0] == 201
    status, body, _ = client.request("GET", "/openapi.json")
    assert status == 200 and "openapi-pw-77" not in json.dumps(body)
    assert client.request("POST", "/openapi.json")[0] == 405
    assert client.request("PUT", "/openapi.json/")[0] in (404, 405)


# -- peer operations --------------------------------------------------------------------


HOSTILE_PEER_REQUESTS = [
    ("instance_adopt", {"document": good_document(name="../x"), "moved_from": "agent2"}),
    ("instance_adopt", {"document": good_document(arguments=["--pidfile=/tmp/x"]), "moved_from": "agent2"}),
    ("instance_adopt", {"document": good_document(arguments=["-P", "solo", "-A", "evil"]), "moved_from": "agent2"}),
    ("instance_adopt", {"document": good_document(queues=[{"name": "dq.victim"}]), "moved_from": "agent2"}),
    ("instance_adopt", {"document": good_document(broker="amqp://u:p@ho st/"), "moved_from": "agent2"}),
    ("instance_adopt", {"document": good_document(pid=2**40), "moved_from": "agent2"}),
    ("instance_adopt", {"document": good_document(), "moved_from": "a/b"}),
    ("instance_adopt", {"document": good_document(), "moved_from": "agent2", "wait": "maybe"}),
    ("instance_adopt", {"document": [good_document()], "moved_from": "agent2"}),
    ("instance_adopt_once", {"target": "../x", "document": good_document(), "moved_from": "agent2"}),
    ("instances_owned", {"names": ["w1"] * 10_001}),
    ("instances_owned", {"names": "w1"}),
    ("instance_log", {"name": "w1", "lines": 10**9}),
    ("instance_log", {"name": "../../etc/passwd"}),
    ("queue_purge", {"app": "foo", "name": "dq.w1"}),
    ("agent_drain", {"agent": "agent2"}),
    ("agent_undrain", {"now": True}),
    ("app_enable", {"app": "admin"}),
    ("app_restart", {"app": "foo", "rolling": True}),
    ("instance_restart_ready", {"name": "w1", "app": "foo", "timeout": 9999}),
    ("app_put", {"app": "foo", "roll": "sometimes"}),
    ("app_put", {"app": "foo", "env": {"LD_PRELOAD": "/tmp/x.so"}}),
    ("app_put", {"app": "foo", "env": {"A": "line\nbreak"}}),
    ("app_put", {"app": "foo", "workdir": "relative/dir"}),
    ("app_put", {"app": "foo", "python": "/usr/bin/../bin/python"}),
    ("app_put", {"app": "foo", "task_events": "perhaps"}),
    ("instance_export", {"all": True}),
]


def test_hostile_peer_requests_are_refused_and_change_nothing() -> None:
    store = Store.in_memory()
    agent = Agent(LocalAgent(store, "agent1", BROKER, FakeSupervisor()))
    outcome_of(Deferred.fromCoroutine(agent.local.instance_create("foo", "w1")))
    before = store.dump()
    for operation, arguments in HOSTILE_PEER_REQUESTS:
        error = outcome_of(agent.handle_remote(operation, json.loads(json.dumps(arguments))))
        assert isinstance(error, (BadParameter, NotFound)), (operation, error)
        assert store.dump() == before, operation
    assert agent.local.draining is False


# -- replicated data, the fence and the failover decision ----------------------------------


class UnsignedCluster(Cluster):
    def add(self, agent_id: str, secret: bytes | None = None, **srs_options: Any) -> Agent:
        return super().add(agent_id, secret=None, **srs_options)


class ReplicaTests(SynchronousTestCase):
    def test_forged_heartbeats_cannot_feed_a_signed_agents_fence(self) -> None:
        """Without the secret, an intruder's heartbeat (with a digest that
        would make the victim fetch its 'copy') makes no member: nothing
        is fetched and nothing dropped."""
        c = Cluster(self, "agent1", "agent2")
        c.run(c.agents["agent1"].app_put("foo"))
        c.create("agent2", "foo", "w1")
        summary = {"instances": 1, "digest": "f" * 32, "draining": False}
        for _ in range(10):
            c.network.route(
                "scs.scs.fanout",
                "",
                forged("heartbeat", "aaa-evil", {"url": "", "interval": 2, "summary": summary}, clock=c.clock),
                {},
            )
            c.advance(0.5)
        self.assertEqual(c.agents["agent2"].srs.live_agents(), ["agent1", "agent2"])
        self.assertEqual(c.where("w1"), ["agent2"])

    def test_forged_gone_notices_and_byes_never_move_a_live_agents_instances(self) -> None:
        """Unsigned cluster: the intruder reads agent2's incarnation on the
        fanout and, for longer than --failover-after, sends a bye in its
        name and gone notices about it in agent3's name.  agent2's workers
        do not answer pings (the worst case: nothing else stops a move),
        yet nothing moves: a bye counts until the next heartbeat, and a gone
        notice is checked with the receiver's own probe."""
        c = UnsignedCluster(self, "agent1", "agent2", "agent3")
        c.run(c.agents["agent1"].app_put("foo"))
        for name in ("v1", "v2"):
            c.create("agent2", "foo", name)
        c.advance(INTERVAL + 1)
        incarnation = c.agents["agent2"].srs._incarnation
        fanout = "scs.scs.fanout"
        for _ in range(int((FAILOVER_AFTER + 5) / 0.2)):
            c.network.route(fanout, "", forged("bye", "agent2", {}, clock=c.clock, incarnation=incarnation), {})
            c.network.route(fanout, "", forged("gone", "agent3", {"agent": "agent2"}, clock=c.clock), {})
            c.advance(0.2)
        # The forgeries were taken (agent2 was believed gone, again and again)...
        dead = [e for e in c.events if e.get("event") == "srs.member.dead" and e.get("agent") == "agent2"]
        self.assertGreater(len(dead), 3)
        # ... and still nothing moved.
        for name in ("v1", "v2"):
            self.assertEqual(c.where(name), ["agent2"], name)
        self.assertEqual(c.stores["agent2"].get_node("v1").moved_from, None)

    def test_on_an_unsigned_cluster_a_broker_user_can_make_an_agent_drop_an_instance(self) -> None:
        """What the README accepts for clusters without a secret ("anyone
        with broker credentials is a member and can ask what the API
        allows"): an intruder that runs its own SRS node and claims to hold
        agent2's v1 "moved from agent2" makes agent2's fence drop it and
        stop its worker, as it could have deleted it.  It is then nowhere.
        A signed cluster is immune (previous test)."""
        c = UnsignedCluster(self, "agent1", "agent2")
        c.run(c.agents["agent1"].app_put("foo"))
        c.create("agent2", "foo", "v1")
        claim = good_document(name="v1", moved_from="agent2")
        intruder = srs.SRS(
            "aaa-intruder",
            c.network.transport(),
            reactor=c.clock,
            heartbeat_interval=INTERVAL,
            rng=random.Random(7),
            handler=lambda op, args: succeed([claim] if op == "instance_export" else []),
            summary=lambda: {"instances": 1, "digest": "e" * 32, "draining": False},
            codec=MessageCodec("scs", None, clock=c.clock.seconds),
        )
        intruder.startService()
        self.addCleanup(intruder.stopService)
        c.advance(2 * INTERVAL)
        self.assertEqual(c.where("v1"), [])

    def test_drain_undrain_drain_keeps_every_instance(self) -> None:
        """A maintenance round: drain agent1 (its instances go to agent2),
        undrain it, add agent3, drain agent2.  Every instance must still be
        somewhere, once."""
        c = Cluster(self, "agent1", "agent2")
        c.run(c.agents["agent1"].app_put("foo"))
        for name in ("x1", "x2"):
            c.create("agent1", "foo", name)
        c.advance(INTERVAL + 1)
        self.assertEqual(c.run(c.agents["agent1"].drain("agent1")).body["instances"], ["x1", "x2"])
        c.run(c.agents["agent1"].drain("agent1", undrain=True))
        c.advance(INTERVAL + 1)
        c.add("agent3")
        c.advance(3 * INTERVAL)
        self.assertEqual(c.run(c.agents["agent2"].drain("agent2")).body["instances"], ["x1", "x2"])
        c.advance(3 * INTERVAL)
        for name in ("x1", "x2"):
            self.assertEqual(len(c.where(name)), 1, (name, {a: n.names for a, n in c.nodes.items()}))


def test_a_peer_flipping_its_digest_is_fetched_at_most_once_per_interval() -> None:
    """Fixed finding: an intruder (any broker user on an unsigned cluster;
    any peer on a signed one) flipping one document at each heartbeat made
    the victim check, store and fence a full copy every time.  A copy is
    now at most MAX_DOCUMENTS documents (a bigger export is refused) and is
    fetched at most once per MIN_FETCH_INTERVAL.  (How long one refresh
    takes is bench material, not a unit test's.)"""
    documents = [good_document(name=f"w{i}", moved_from="agentx") for i in range(MAX_DOCUMENTS)]
    store = Store.in_memory()
    agent = Agent(LocalAgent(store, "agent1", BROKER))
    agent.peers.peer_alive = lambda agent_id: True  # type: ignore[method-assign]
    clock = Clock()
    digest = ["d0"]
    fetches = []

    def fetch(peer: str) -> Any:
        fetches.append(clock.seconds())
        return succeed(documents)

    replicas = Replicas(
        store, "agent1", lambda: [PeerView("evil", True, digest[0])], fetch, clock, on_synced=Fence(agent.custody)
    )
    for step in range(40):  # 20 s, a new digest every 0.5 s
        digest[0] = f"d{step}"
        outcome_of(replicas.sync())
        clock.advance(0.5)
    assert len(store.replicas.instances("evil")["evil"]) == MAX_DOCUMENTS
    assert len(fetches) <= 20 / MIN_FETCH_INTERVAL + 1, fetches
    with pytest.raises(BadParameter):
        check_documents([*documents, good_document(name="one-too-many")])


# -- secrets in log lines -----------------------------------------------------------------


class LogSecretTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logs = LogCapture()
        self.addCleanup(self.logs.close)

    def test_the_asked_agent_logs_env_names_not_values(self) -> None:
        bus = Bus(self, "agent1", secret=SECRET)
        self.successResultOf(bus.run(bus.agents["agent1"].app_put("foo", env={"DB_PASSWORD": "env-value-4242"})))
        reply = self.successResultOf(bus.run(bus.agents["agent1"].app_get("foo")))
        self.assertEqual(reply.body["env"], {"DB_PASSWORD": "env-value-4242"})  # the API shows it, by design
        self.assertEqual(self.logs.leaking("env-value-4242"), [])

    def test_peers_applying_an_app_update_do_not_log_env_values(self) -> None:
        bus = Bus(self, "agent1", "agent2", secret=SECRET)
        self.successResultOf(bus.run(bus.agents["agent1"].app_put("foo")))
        bus.run(bus.agents["agent1"].app_put("foo", env={"DB_PASSWORD": "env-value-4242"}))
        self.assertEqual(dict(bus.agents["agent2"].store.get_app("foo").env), {"DB_PASSWORD": "env-value-4242"})
        leaks = self.logs.leaking("env-value-4242")
        self.assertEqual([(e.get("event"), e.get("request")) for e in leaks], [])

    def test_an_adopted_instance_with_its_own_broker_is_logged_masked(self) -> None:
        c = Cluster(self, "agent1", "agent2")
        c.run(c.agents["agent1"].app_put("foo"))
        c.create("agent2", "foo", "b1", broker="amqp://worker:adopt-pw-5150@127.0.0.1:5672//")
        c.advance(INTERVAL + 1)
        self.assertEqual(c.run(c.agents["agent1"].drain("agent2")).body["instances"], ["b1"])
        self.assertEqual(c.where("b1"), ["agent1"])
        leaks = self.logs.leaking("adopt-pw-5150")
        self.assertEqual([(e.get("event"), e.get("operation")) for e in leaks], [])
