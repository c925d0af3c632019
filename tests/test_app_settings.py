"""App settings for their workers (issue 10): ``env``, ``workdir``,
``python`` and ``task_events``.

Validation at both doors (the API checks paths on this machine, a peer's
copy is checked for its form), the store and its migration, the worker's
command line, environment and directory on the fake spawner, a change seen
as a restart, and bad input refused with nothing stored.  Nothing sleeps or
touches the global reactor."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import attrs
import pytest
from sqlalchemy import create_engine
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, Logger, globalLogPublisher

from scs import validation as v
from scs.agent import Agent, LocalAgent
from scs.errors import BadParameter
from scs.http.api import API
from scs.lifecycle import WorkerLifecycle
from scs.operation_args import check_operation
from scs.policy import SupervisionPolicy
from scs.records import UNSET, BrokerInfo, InstanceSpec
from scs.store import STORE_FILENAME, Store, known_revisions, migrate, schema_revision
from scs.supervisor import Supervisor
from scs.testing import FakeControl, FakeProcessTable, FakeSpawner
from scs.worker import TASK_EVENTS, SettingUnavailable, UnsafeSpec, build_argv, worker_env

BROKER = "amqp://guest:guest@127.0.0.1:5672//"
BROKER_INFO = BrokerInfo.from_url(BROKER)
JSON = {"Content-Type": ["application/json"]}
FORM = {"Content-Type": ["application/x-www-form-urlencoded"]}


@pytest.fixture
def workdir(tmp_path: Path) -> str:
    d = tmp_path / "work"
    d.mkdir(mode=0o755)
    return str(d)


@pytest.fixture
def not_executable(tmp_path: Path) -> str:
    f = tmp_path / "python"
    f.write_text("#!/bin/sh\n")
    f.chmod(0o644)
    return str(f)


# -- validation ------------------------------------------------------------------


def test_env_accepts_an_object_or_its_json_text() -> None:
    assert v.check_env({"A": "1", "_b2": ""}) == {"A": "1", "_b2": ""}
    assert v.check_env('{"PYTHONPATH": "/srv/app", "X": "ö é"}') == {"PYTHONPATH": "/srv/app", "X": "ö é"}
    assert v.check_env({}) == {}  # clears
    assert v.check_env("{}") == {}
    assert v.check_env(None) is None  # not given
    with pytest.raises(BadParameter):
        v.check_env("")  # in JSON, "" is a value (an empty form field never gets here)


BAD_ENV: list[Any] = [
    [],
    "[]",
    '"x"',
    "{",
    '{"A": NaN}',
    3,
    {"1A": "x"},
    {"A-B": "x"},
    {"A B": "x"},
    {"": "x"},
    {"Ä": "x"},
    {"A" * 129: "x"},
    {"A": 1},
    {"A": None},
    {"A": ["x"]},
    {"A": "two\nlines"},
    {"A": "nul\x00"},
    {"A": "tab\t"},
    {"A": "\x1b[31m"},
    {"A": "x" * 4097},
    {f"V{i}": "x" for i in range(101)},
    {"LD_PRELOAD": "/tmp/evil.so"},
    {"ld_preload": "/tmp/evil.so"},
    {"LD_LIBRARY_PATH": "/tmp"},
    {"DYLD_INSERT_LIBRARIES": "/tmp/x"},
    {"CELERY_LOADER": "evil:Loader"},
    {"CELERY_CUSTOM_WORKER_POOL": "evil:Pool"},
    {"CELERY_RDB_HOST": "0.0.0.0"},
    {"C_FORCE_ROOT": "1"},
    {"PYTHONHOME": "/tmp"},
    {"PYTHONSTARTUP": "/tmp/x.py"},
    {"PYTHONINSPECT": "1"},
    "x" * 40000,
]


@pytest.mark.parametrize("value", BAD_ENV, ids=[repr(b)[:30] for b in BAD_ENV])
def test_bad_env_is_refused_naming_the_parameter(value: Any) -> None:
    with pytest.raises(BadParameter) as e:
        v.check_env(value)
    assert e.value.details["parameter"] == "env"


def test_env_refusals_never_quote_a_value() -> None:
    """Values may be credentials: a message names the variable only."""
    for value in ("s3cret\npassword", "s3cret\x00password", "s3cret" * 1000):
        with pytest.raises(BadParameter) as e:
            v.check_env({"DB_PASSWORD": value})
        assert "s3cret" not in json.dumps(e.value.to_json())
        assert e.value.details["variable"] == "DB_PASSWORD"


def test_workdir_at_the_api_door(workdir: str, tmp_path: Path) -> None:
    assert v.check_workdir(workdir) == workdir
    assert v.check_workdir("default") is None
    assert v.check_workdir(None) is None
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o1777)  # like /tmp
    a_file = tmp_path / "file"
    a_file.write_text("")
    for bad in (
        "relative/dir",
        "./x",
        workdir + "/",
        workdir + "/../work",
        workdir + "/./",
        "//" + workdir.lstrip("/"),
        workdir + "\n",
        workdir + "\x00",
        "/" + "x" * 5000,
        str(tmp_path / "missing"),
        str(a_file),
        str(open_dir),
        5,
        ["/"],
    ):
        with pytest.raises(BadParameter) as e:
            v.check_workdir(bad)
        assert e.value.details["parameter"] == "workdir", bad


def test_python_at_the_api_door(not_executable: str, tmp_path: Path) -> None:
    assert v.check_python(sys.executable) == sys.executable  # a venv's symlink is followed
    assert v.check_python("default") is None
    writable = tmp_path / "writable-python"
    shutil.copy(not_executable, writable)
    writable.chmod(0o777)
    for bad in (
        not_executable,
        str(tmp_path),
        str(tmp_path / "missing"),
        str(writable),
        "python3",
        "/usr/bin/../bin/python3",
        {"path": "/usr/bin/python3"},
    ):
        with pytest.raises(BadParameter) as e:
            v.check_python(bad)
        assert e.value.details["parameter"] == "python", bad


def test_a_peer_door_checks_paths_for_their_form_only(tmp_path: Path) -> None:
    """A peer's app may name a directory this machine lacks: kept, and its
    workers here fail at their spawn (below)."""
    missing = str(tmp_path / "only-on-the-other-machine")
    clean = check_operation(
        "app_put",
        {
            "app": "foo",
            "env": {"A": "1"},
            "workdir": missing,
            "python": missing + "/bin/python",
            "task_events": True,
        },
    )
    assert clean == {
        "app": "foo",
        "env": {"A": "1"},
        "workdir": missing,
        "python": missing + "/bin/python",
        "task_events": True,
    }
    assert check_operation("app_put", {"app": "foo", "workdir": None, "python": "default"}) == {
        "app": "foo",
        "workdir": None,
        "python": None,
    }
    for parameter, value in (
        ("env", {"LD_PRELOAD": "/x.so"}),
        ("env", {"A": "a\nb"}),
        ("env", ["A"]),
        ("workdir", "relative"),
        ("workdir", "/a/../b"),
        ("python", "/usr/bin/python3\n"),
        ("python", 7),
        ("task_events", "maybe"),
    ):
        with pytest.raises(BadParameter) as e:
            check_operation("app_put", {"app": "foo", parameter: value})
        assert e.value.details["parameter"] == parameter


# -- store ------------------------------------------------------------------------


def test_store_keeps_settings_and_updates_only_what_is_given(workdir: str) -> None:
    store = Store.in_memory()
    record, created = store.put_app(
        "foo", BROKER, env={"B": "2", "A": "1"}, workdir=workdir, python=sys.executable, task_events=True
    )
    assert created
    assert record.to_json()["env"] == {"A": "1", "B": "2"}
    assert (record.workdir, record.python, record.task_events) == (workdir, sys.executable, True)
    store.add_node("foo", "w1", BROKER)
    spec = store.get_node("w1")
    assert (spec.env, spec.workdir, spec.python, spec.task_events) == (
        (("A", "1"), ("B", "2")),
        workdir,
        sys.executable,
        True,
    )
    # Left out: unchanged.
    record, created = store.put_app("foo", BROKER, celery_app="proj:app")
    assert not created
    assert (record.env, record.workdir, record.python, record.task_events) == (
        (("A", "1"), ("B", "2")),
        workdir,
        sys.executable,
        True,
    )
    # Cleared: env {} and None for the paths; task_events off.
    record, _ = store.put_app("foo", BROKER, env={}, workdir=None, python=None, task_events=False)
    assert record.to_json() | {"broker": None} == {
        "name": "foo",
        "broker": None,
        "celery_app": "proj:app",
        "arguments": [],
        "env": {},
        "workdir": None,
        "python": None,
        "task_events": False,
    }
    assert store.get_node("w1").env == ()


def test_new_app_has_the_agents_defaults() -> None:
    store = Store.in_memory()
    record = store.ensure_app("foo", BROKER)
    assert (record.env, record.workdir, record.python, record.task_events) == ((), None, None, False)


def test_settings_survive_reopen(tmp_path: Path, workdir: str) -> None:
    store = Store.in_directory(tmp_path)
    store.put_app("foo", BROKER, env={"A": "x y"}, workdir=workdir, task_events=True)
    store.close()
    store = Store.in_directory(tmp_path)
    record = store.get_app("foo")
    assert (dict(record.env), record.workdir, record.python, record.task_events) == ({"A": "x y"}, workdir, None, True)
    store.close()


def test_store_at_the_previous_revision_upgrades_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILENAME
    engine = create_engine(f"sqlite:///{path}")
    migrate(engine, "0002")
    with engine.begin() as connection:
        connection.exec_driver_sql("INSERT INTO broker (id, url) VALUES (1, 'amqp://guest:guest@127.0.0.1:5672/%2F')")
        connection.exec_driver_sql(
            "INSERT INTO app (id, name, broker_id, celery_app, arguments)"
            " VALUES (1, 'foo', 1, 'proj:app', '[\"-Ofair\"]')"
        )
        connection.exec_driver_sql(
            "INSERT INTO node (id, name, app_id, broker_id, max_concurrency, min_concurrency,"
            " is_enabled, created_at, arguments) VALUES (1, 'w1', 1, NULL, 4, 2, 1, 0.0, '[]')"
        )
        connection.exec_driver_sql(
            "INSERT INTO queue (id, app_id, name, exchange, routing_key) VALUES (1, 1, 'tasks', 'tasks', 'tasks')"
        )
        connection.exec_driver_sql(
            "INSERT INTO consumption (id, node_id, queue_name, exchange, routing_key) "
            "VALUES (1, 1, 'tasks', 'tasks', 'tasks')"
        )
    engine.dispose()

    store = Store.in_directory(tmp_path)  # foreign keys on, as the agent opens it
    assert schema_revision(store.engine) == max(known_revisions())  # the newest
    spec = store.get_node("w1")
    assert (spec.app, spec.max_concurrency, spec.min_concurrency, spec.celery_app) == ("foo", 4, 2, "proj:app")
    assert spec.queue_names == ("tasks",)
    assert spec.arguments == ("-Ofair",)
    assert (spec.env, spec.workdir, spec.python, spec.task_events) == ((), None, None, False)
    record = store.get_app("foo")
    assert (record.env, record.workdir, record.python, record.task_events) == ((), None, None, False)
    assert store.list_queues("foo")[0].name == "tasks"
    store.close()


# -- the worker's command line, environment and directory ---------------------------


def spec(name: str = "w1", **kw: Any) -> InstanceSpec:
    kw.setdefault("app", "foo")
    kw.setdefault("broker", BROKER_INFO)
    return InstanceSpec(name=name, **kw)


def test_argv_uses_the_apps_python_and_task_events(tmp_path: Path) -> None:
    d = str(tmp_path)
    argv = build_argv(spec(), d, "h")
    assert argv[0] == sys.executable
    assert TASK_EVENTS not in argv and "-E" not in argv
    argv = build_argv(spec(python=sys.executable, task_events=True), d, "h")
    assert argv[:3] == [sys.executable, "-m", "celery"]
    assert argv.count(TASK_EVENTS) == 1
    # Already asked for through the arguments: not twice.
    argv = build_argv(spec(task_events=True, arguments=("-E",)), d, "h")
    assert TASK_EVENTS not in argv and argv.count("-E") == 1


def test_argv_refuses_a_python_this_machine_lacks(tmp_path: Path, not_executable: str) -> None:
    for python in (str(tmp_path / "venv" / "bin" / "python"), not_executable):
        with pytest.raises(SettingUnavailable) as e:
            build_argv(spec(python=python), str(tmp_path), "h")
        assert e.value.details["parameter"] == "python"
        assert e.value.event == "setting-unavailable"


def test_worker_env_merges_the_apps_over_the_agents() -> None:
    env = worker_env(spec(env=(("A", "app"), ("C", "3"))), base={"A": "agent", "B": "2"})
    assert env == {"A": "app", "B": "2", "C": "3"}
    assert worker_env(spec()) == dict(os.environ)
    # The store is a door too: a refused name stored by other means.
    with pytest.raises(UnsafeSpec) as e:
        worker_env(spec(env=(("LD_PRELOAD", "/x.so"),)))
    assert e.value.details["parameter"] == "env"


class Rig:
    """A Supervisor on a MemoryReactorClock with the fake spawner and control."""

    def __init__(self, specs: list[InstanceSpec]) -> None:
        self.clock = MemoryReactorClock()
        self.spawner = FakeSpawner()
        self.control = FakeControl()
        self.specs = specs
        self.dir = tempfile.mkdtemp(prefix="scs-test-")
        self.events: list[dict[str, Any]] = []
        self.sup = Supervisor(
            lambda: self.specs,
            self.dir,
            reactor=self.clock,
            control=self.control,
            spawner=self.spawner,
            process_table=FakeProcessTable(),
            policy=SupervisionPolicy(interval=5.0, min_uptime=10.0),
            hostname="h",
            random=lambda: 0.0,
        )
        self.sup.log = Logger(observer=self.events.append)

    def close(self) -> None:
        shutil.rmtree(self.dir, True)

    def wake(self) -> None:
        d = self.sup.wake()
        done: list[Any] = []
        d.addBoth(done.append)
        assert done and done[0] is None, done

    def up(self, *names: str) -> None:
        for name in names:
            self.control.up(f"{name}@h", queues=[f"dq.{name}"])
        self.clock.advance(self.sup.policy.probe_interval)

    def process(self, name: str) -> Any:
        (p,) = [p for p in self.spawner.alive if f"{name}@h" in p.args]
        return p

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]


@pytest.fixture
def rig() -> Any:
    made: list[Rig] = []

    def make(specs: list[InstanceSpec]) -> Rig:
        made.append(Rig(specs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_spawn_gets_the_apps_env_and_workdir(rig: Any, workdir: str) -> None:
    r = rig([spec(env=(("SCS_TEST_VAR", "hello"),), workdir=workdir, python=sys.executable, task_events=True)])
    r.wake()
    p = r.process("w1")
    assert p.path == workdir
    assert p.env["SCS_TEST_VAR"] == "hello"
    assert p.env.get("PATH") == os.environ.get("PATH")  # the agent's, under the app's
    # The session launcher exec()s the worker's argv: python, -m celery, ..., -E.
    worker_argv = p.args[p.args.index("-c") + 2 :]
    assert worker_argv[:3] == [sys.executable, "-m", "celery"]
    assert TASK_EVENTS in worker_argv


def test_spawn_without_settings_is_as_before(rig: Any) -> None:
    r = rig([spec()])
    r.wake()
    p = r.process("w1")
    assert p.path is None
    assert p.env == dict(os.environ)


def test_a_workdir_or_python_this_machine_lacks_fails_that_instance_alone(
    rig: Any, tmp_path: Path, not_executable: str
) -> None:
    missing = str(tmp_path / "elsewhere")
    r = rig(
        [
            spec("w1", app="far", workdir=missing),
            spec("w2", app="far2", python=not_executable),
            spec("w3"),
        ]
    )
    r.wake()
    assert r.sup.status("w1").state == "failed"
    assert r.sup.status("w2").state == "failed"
    assert r.sup.status("w3").state == "starting"
    assert [p.args for p in r.spawner.processes if "w3@h" in p.args]
    assert len(r.spawner.processes) == 1
    refused = {e["name"]: e for e in r.named("setting-unavailable")}
    assert set(refused) == {"w1", "w2"}
    assert (refused["w1"]["parameter"], refused["w1"]["app"]) == ("workdir", "far")
    assert refused["w1"]["log_level"].name == "error"
    assert missing in refused["w1"]["error"]
    assert refused["w2"]["parameter"] == "python"
    # No retry loop: later wake-ups leave it failed.
    r.clock.advance(30)
    r.wake()
    assert r.sup.status("w1").state == "failed"
    assert len(r.spawner.processes) == 1


def test_a_failed_instance_restarts_once_the_machine_has_its_directory(rig: Any, tmp_path: Path) -> None:
    later = tmp_path / "later"
    r = rig([spec(workdir=str(later))])
    r.wake()
    assert r.sup.status("w1").state == "failed"
    later.mkdir()
    r.sup.restart("w1")
    assert r.process("w1").path == str(later)


def test_a_failed_instance_starts_again_once_its_app_is_mended(rig: Any, tmp_path: Path, workdir: str) -> None:
    """A workdir missing here fails the instance; setting the app's workdir
    to one that exists starts it at the next wake-up, once, without a
    manual restart.  Unchanged settings still never loop."""
    r = rig([spec(workdir=str(tmp_path / "missing"))])
    r.wake()
    assert r.sup.status("w1").state == "failed"
    r.wake()
    assert not r.named("reconfigure.failed")
    r.specs = [attrs.evolve(r.specs[0], workdir=workdir)]
    r.wake()
    assert len(r.named("reconfigure.failed")) == 1
    assert r.sup.status("w1").state == "starting"
    assert r.process("w1").path == workdir
    r.up("w1")
    r.wake()
    assert r.sup.status("w1").state == "running"
    assert len(r.named("reconfigure.failed")) == 1


def test_a_worker_failed_by_rapid_exits_is_tried_again_after_a_change(rig: Any) -> None:
    """A worker that keeps dying young (a wrong celery_app) ends failed;
    the operator's fix of the app starts it again; no change, no retry."""
    r = rig([spec()])
    r.wake()
    for _ in range(r.sup.policy.max_rapid_failures + 5):
        if r.sup.status("w1").state == "failed":
            break
        alive = [p for p in r.spawner.alive if "w1@h" in p.args]
        if alive:
            alive[0].exit(1)
        r.clock.advance(r.sup.policy.backoff_cap + 1)
        r.wake()
    assert r.sup.status("w1").state == "failed"
    spawned = len(r.spawner.processes)
    r.clock.advance(60)
    r.wake()
    assert len(r.spawner.processes) == spawned
    r.specs = [attrs.evolve(r.specs[0], celery_app="proj.fixed:app")]
    r.wake()
    assert len(r.spawner.processes) == spawned + 1
    assert "proj.fixed:app" in r.process("w1").args


@pytest.mark.parametrize(
    "change",
    [
        {"env": (("A", "2"),)},
        {"env": ()},
        {"workdir": "WORKDIR"},
        {"python": sys.executable},
        {"task_events": True},
    ],
    ids=["env", "env cleared", "workdir", "python", "task_events"],
)
def test_a_change_of_setting_replaces_the_running_worker(rig: Any, workdir: str, change: dict[str, Any]) -> None:
    change = {k: (workdir if v == "WORKDIR" else v) for k, v in change.items()}
    r = rig([spec(env=(("A", "1"),))])
    r.wake()
    r.up("w1")
    assert r.sup.status("w1").state == "running"
    old = r.process("w1")
    r.specs = [attrs.evolve(r.specs[0], **change)]
    r.wake()
    assert r.named("reconfigure"), "the change was not seen"
    old.exit(0)  # the fake ended it on TERM already, or ends now
    new = r.process("w1")
    assert new is not old
    if "env" in change:
        assert {k: new.env.get(k) for k in ("A",)} == {"A": dict(change["env"]).get("A", os.environ.get("A"))}
    if "workdir" in change:
        assert new.path == workdir


def test_an_unchanged_setting_does_not_restart(rig: Any) -> None:
    r = rig([spec(env=(("A", "1"),), task_events=True)])
    r.wake()
    r.up("w1")
    r.specs = [attrs.evolve(r.specs[0])]
    r.wake()
    assert not r.named("reconfigure")
    assert len(r.spawner.processes) == 1


def test_lifecycle_refusal_event_names_the_parameter(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    lc = WorkerLifecycle(
        spec(python=str(tmp_path / "nope")),
        "w1@h",
        clock=MemoryReactorClock(),
        spawner=FakeSpawner(),
        policy=SupervisionPolicy(),
        instance_dir=str(tmp_path),
        hostname="h",
        log=Logger(observer=events.append),
        random=lambda: 0.0,
    )
    lc.start()
    assert lc.state.value == "failed"
    (event,) = [e for e in events if e.get("event") == "setting-unavailable"]
    assert event["parameter"] == "python"


# -- the API and the façade ---------------------------------------------------------------


class Client:
    def __init__(self) -> None:
        self.store = Store.in_memory()
        self.local = LocalAgent(self.store, "agent1", BROKER)
        self.agent = Agent(self.local)
        self.treq = StubTreq(API(self.agent).resource())

    def request(self, method: str, path: str, body: Any = None, form: dict[str, str] | None = None) -> tuple[int, Any]:
        outcome: list[Any] = []
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs = {"data": json.dumps(body).encode(), "headers": JSON}
        elif form is not None:
            kwargs = {"data": urlencode(form).encode(), "headers": FORM}
        d: Deferred[Any] = self.treq.request(method, "http://127.0.0.1:8001" + path, **kwargs)
        d.addCallback(lambda response: self.treq.content(response).addCallback(lambda c: (response.code, c)))
        d.addBoth(outcome.append)
        self.treq.flush()
        code, content = outcome[0]
        return code, json.loads(content)


@pytest.fixture
def client() -> Client:
    return Client()


def test_api_sets_shows_keeps_and_clears_the_settings(client: Client, workdir: str) -> None:
    status, body = client.request(
        "PUT",
        "/foo/",
        {"env": {"SCS_TEST_VAR": "hello"}, "workdir": workdir, "python": sys.executable, "task_events": True},
    )
    assert status == 201, body
    assert (body["env"], body["workdir"], body["python"], body["task_events"]) == (
        {"SCS_TEST_VAR": "hello"},
        workdir,
        sys.executable,
        True,
    )
    # An update that leaves them out keeps them.
    status, body = client.request("PUT", "/foo/", {"celery_app": "proj:app"})
    assert status == 200
    assert (body["env"], body["workdir"], body["task_events"]) == ({"SCS_TEST_VAR": "hello"}, workdir, True)
    assert client.request("GET", "/foo/")[1] == body
    # A form sends JSON text for env, "default" to go back to the agent's own.
    status, body = client.request(
        "POST", "/foo/", form={"env": '{"B": "x"}', "workdir": "default", "python": "default", "task_events": "false"}
    )
    assert status == 200, body
    assert (body["env"], body["workdir"], body["python"], body["task_events"]) == ({"B": "x"}, None, None, False)
    status, body = client.request("PUT", "/foo/", {"env": {}})
    assert body["env"] == {}


@pytest.mark.parametrize(
    "parameter, value",
    [
        ("env", {"LD_PRELOAD": "/x.so"}),
        ("env", '{"A": "two\\nlines"}'),
        ("env", "not json"),
        ("env", ["A=1"]),
        ("workdir", "relative"),
        ("workdir", "/no/such/dir/for/scs"),
        ("workdir", "/usr/../tmp"),
        ("python", "/no/such/python"),
        ("python", "NOT_EXECUTABLE"),
        ("python", "/"),
        ("task_events", "maybe"),
        ("task_events", 2),
    ],
)
@pytest.mark.parametrize("app", ["foo", "bar"], ids=["existing", "new"])
def test_api_bad_settings_are_refused_and_nothing_is_stored(
    client: Client, parameter: str, value: Any, app: str, not_executable: str, workdir: str
) -> None:
    if value == "NOT_EXECUTABLE":
        value = not_executable
    assert client.request("PUT", "/foo/", {"env": {"A": "1"}, "workdir": workdir})[0] == 201
    before = client.store.dump()
    # Good settings alongside a bad one: none of them is stored.
    document = {"celery_app": "other:app", "task_events": True, parameter: value}
    status, body = client.request("PUT", f"/{app}/", document)
    assert status == 400, body
    assert body["parameter"] == parameter
    if isinstance(value, str):
        status, body = client.request("POST", f"/{app}/", form={parameter: value})
        assert status == 400, body
        assert body["parameter"] == parameter
    assert client.store.dump() == before


def test_env_values_stay_out_of_the_log(client: Client) -> None:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert client.request("PUT", "/foo/", {"env": {"DB_PASSWORD": "s3cret-value"}})[0] == 201
        assert client.request("GET", "/foo/")[1]["env"] == {"DB_PASSWORD": "s3cret-value"}
    finally:
        globalLogPublisher.removeObserver(events.append)
    ours = [e for e in events if e.get("log_namespace") == "scs.agent"]
    assert ours
    start = next(e for e in ours if e.get("event") == "operation.start" and e["operation"] == "App.put")
    assert start["arguments"]["env"] == ["DB_PASSWORD"]
    assert "s3cret-value" not in repr(ours)


def test_apps_copied_to_a_joining_peer_keep_their_settings(client: Client, workdir: str) -> None:
    """What ``app_export`` gives a peer passes the peer door and stores the same."""
    client.request(
        "PUT", "/foo/", {"env": {"A": "1"}, "workdir": workdir, "python": sys.executable, "task_events": True}
    )
    (exported,) = client.local.app_export()
    peer = LocalAgent(Store.in_memory(), "agent2", BROKER)
    peer.app_put(**check_operation("app_put", exported))
    assert peer.app_get("foo") == client.local.app_get("foo")


def test_local_app_put_left_out_is_unchanged(workdir: str) -> None:
    local = LocalAgent(Store.in_memory(), "agent1", BROKER)
    local.app_put("foo", env={"A": "1"}, workdir=workdir, task_events=True)
    app = local.app_put("foo", python=UNSET)["app"]
    assert (app["env"], app["workdir"], app["task_events"]) == ({"A": "1"}, workdir, True)


def test_world_writable_workdir_mode_bit_is_what_refuses(tmp_path: Path) -> None:
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(BadParameter):
        v.check_workdir(str(d))
    d.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IWGRP)  # group-writable is the owner's call
    assert v.check_workdir(str(d)) == str(d)
