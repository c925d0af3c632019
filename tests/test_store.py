"""The store: schema migrations, persistence across reopen, integrity."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from scs.errors import BadParameter, Conflict, NotFound
from scs.records import QueueBinding
from scs.store import (
    STORE_FILENAME,
    Store,
    StoreError,
    check_store_file,
    known_revisions,
    migrate,
    move_store_aside,
    schema_revision,
)

BROKER = "amqp://guest:guest@127.0.0.1:5672//"


def test_in_memory_store_is_at_head() -> None:
    store = Store.in_memory()
    assert schema_revision(store.engine) == max(known_revisions())  # the newest


def test_upgrade_from_first_revision_keeps_data(tmp_path: Path) -> None:
    """A store made by the first schema revision is upgraded in place at open."""
    path = tmp_path / STORE_FILENAME
    engine = create_engine(f"sqlite:///{path}")
    migrate(engine, "0001")
    assert schema_revision(engine) == "0001"
    with engine.begin() as connection:
        connection.exec_driver_sql("INSERT INTO broker (id, url) VALUES (1, 'amqp://guest:guest@127.0.0.1:5672/%2F')")
        connection.exec_driver_sql("INSERT INTO app (id, name, broker_id, celery_app) VALUES (1, 'foo', 1, 'proj:app')")
        connection.exec_driver_sql(
            "INSERT INTO node (id, name, app_id, broker_id, max_concurrency, min_concurrency,"
            " is_enabled, created_at) VALUES (1, 'w1', 1, NULL, 4, 2, 1, 0.0)"
        )
        connection.exec_driver_sql(
            "INSERT INTO queue (id, app_id, name, exchange, routing_key) VALUES (1, 1, 'tasks', 'tasks', 'tasks')"
        )
        connection.exec_driver_sql(
            "INSERT INTO consumption (id, node_id, queue_name, exchange, routing_key) "
            "VALUES (1, 1, 'tasks', 'tasks', 'tasks')"
        )
    engine.dispose()

    store = Store.in_directory(tmp_path)
    assert schema_revision(store.engine) == max(known_revisions())  # the newest
    spec = store.get_node("w1")
    assert (spec.app, spec.max_concurrency, spec.min_concurrency) == ("foo", 4, 2)
    assert spec.queue_names == ("tasks",)
    assert spec.celery_app == "proj:app"
    assert spec.arguments == ()  # the new column got its default
    assert store.get_app("foo").arguments == ()
    assert store.list_queues("foo")[0].name == "tasks"
    store.close()


def test_upgrade_from_revision_0005_keeps_data_and_starts_apps_at_revision_0(tmp_path: Path) -> None:
    """0006 adds app revisions (existing apps: 0) and the tombstones of
    deleted apps; everything stored before is kept."""
    path = tmp_path / STORE_FILENAME
    engine = create_engine(f"sqlite:///{path}")
    migrate(engine, "0005")
    with engine.begin() as connection:
        connection.exec_driver_sql("INSERT INTO broker (id, url) VALUES (1, 'amqp://guest:guest@127.0.0.1:5672/%2F')")
        connection.exec_driver_sql(
            "INSERT INTO app (id, name, broker_id, celery_app, arguments, env, workdir, python, task_events)"
            " VALUES (1, 'foo', 1, 'proj:app', '[\"-Ofair\"]', '{\"A\": \"1\"}', '/srv/foo', NULL, 1)"
        )
        connection.exec_driver_sql(
            "INSERT INTO node (id, name, app_id, broker_id, max_concurrency, min_concurrency,"
            " is_enabled, created_at, arguments, moved_from) VALUES (1, 'w1', 1, NULL, 4, 2, 1, 0.0, '[]', 'agent9')"
        )
        connection.exec_driver_sql(
            "INSERT INTO autoscaling_policy (app_id, queue, min_instances, max_instances,"
            " messages_per_instance, scale_down_after) VALUES (1, 'tasks', 1, 3, 10, 60.0)"
        )
        connection.exec_driver_sql("INSERT INTO agent_setting (key, value) VALUES ('draining', '1')")
    engine.dispose()

    store = Store.in_directory(tmp_path)
    assert schema_revision(store.engine) == max(known_revisions())  # through 0006 to the newest
    app = store.get_app("foo")
    assert (app.celery_app, app.arguments, app.env, app.workdir, app.task_events) == (
        "proj:app",
        ("-Ofair",),
        (("A", "1"),),
        "/srv/foo",
        True,
    )
    assert app.revision == 0
    assert store.revisions.tombstones() == {}
    spec = store.get_node("w1")
    assert (spec.max_concurrency, spec.min_concurrency, spec.moved_from) == (4, 2, "agent9")
    assert store.policies.get("foo").max_instances == 3
    assert store.settings.get("draining") == "1"
    # The new table works: a deletion leaves a tombstone, a later put removes it.
    store.delete_app("foo", revision=10)
    assert store.revisions.tombstones() == {"foo": 10}
    store.put_app("foo", BROKER, revision=11)
    assert (store.revisions.tombstones(), store.get_app("foo").revision) == ({}, 11)
    store.close()


def test_upgrade_from_revision_0006_keeps_policies_and_starts_them_at_revision_0(tmp_path: Path) -> None:
    """0007 adds policy revisions (existing policies: 0) and the tombstones
    of deleted policies; everything stored before is kept."""
    path = tmp_path / STORE_FILENAME
    engine = create_engine(f"sqlite:///{path}")
    migrate(engine, "0006")
    with engine.begin() as connection:
        connection.exec_driver_sql("INSERT INTO broker (id, url) VALUES (1, 'amqp://guest:guest@127.0.0.1:5672/%2F')")
        connection.exec_driver_sql(
            "INSERT INTO app (id, name, broker_id, celery_app, arguments, env, workdir, python, task_events, revision)"
            " VALUES (1, 'foo', 1, 'proj:app', '[]', '{}', NULL, NULL, 0, 1234)"
        )
        connection.exec_driver_sql(
            "INSERT INTO autoscaling_policy (app_id, queue, min_instances, max_instances,"
            " messages_per_instance, scale_down_after) VALUES (1, 'tasks', 2, 5, 7, 30.0)"
        )
        connection.exec_driver_sql("INSERT INTO app_tombstone (name, revision, deleted_at) VALUES ('gone', 99, 1.0)")
    engine.dispose()

    store = Store.in_directory(tmp_path)
    assert schema_revision(store.engine) == "0007"
    assert store.get_app("foo").revision == 1234
    assert store.revisions.tombstones() == {"gone": 99}
    policy = store.policies.get("foo")
    assert (policy.queue, policy.min_instances, policy.max_instances) == ("tasks", 2, 5)
    assert (policy.messages_per_instance, policy.scale_down_after) == (7, 30.0)
    assert store.policies.with_revisions() == [(policy, 0)]
    assert store.revisions.tombstones("autoscaling") == {}
    # The new table works: a deletion leaves a tombstone, a later put removes it.
    assert store.policies.delete("foo", revision=10)
    assert (store.policies.get("foo"), store.revisions.tombstones("autoscaling")) == (None, {"foo": 10})
    store.policies.put(policy, revision=11)
    assert (store.revisions.tombstones("autoscaling"), store.policies.with_revisions()) == ({}, [(policy, 11)])
    # An app's deletion is its policy's too.
    store.delete_app("foo", revision=20)
    assert store.revisions.tombstones("autoscaling") == {"foo": 20}
    store.close()


def test_everything_survives_reopen(tmp_path: Path) -> None:
    store = Store.in_directory(tmp_path)
    store.put_app("foo", BROKER, celery_app="proj.celery:app", arguments=["--prefetch-multiplier=1"])
    store.add_node("foo", "wörker-1", BROKER, max_concurrency=3, min_concurrency=1)
    store.declare_queue(
        "foo",
        QueueBinding("tasks", "ex", "rk", "topic", {"durable": True}),
        BROKER,
    )
    store.add_consumption("wörker-1", store.get_queue("foo", "tasks"))
    store.set_enabled("wörker-1", False)
    before = store.dump()
    store.close()

    again = Store.in_directory(tmp_path)
    assert again.dump() == before
    spec = again.get_node("wörker-1")
    assert spec.is_enabled is False
    assert spec.queues == (QueueBinding("tasks", "ex", "rk", "topic"),)
    assert spec.queues[0].options == {"durable": True}
    assert spec.arguments == ("--prefetch-multiplier=1",)
    again.close()


def test_add_node_is_idempotent_but_conflicts_on_other_settings() -> None:
    store = Store.in_memory()
    spec, created = store.add_node("foo", "w1", BROKER, max_concurrency=2)
    assert created
    again, created_again = store.add_node("foo", "w1", BROKER, max_concurrency=2)
    assert (again, created_again) == (spec, False)
    with pytest.raises(Conflict):
        store.add_node("foo", "w1", BROKER, max_concurrency=5)
    with pytest.raises(Conflict):
        store.add_node("bar", "w1", BROKER, max_concurrency=2)


def test_node_broker_defaults_to_the_apps_and_one_row_per_broker() -> None:
    store = Store.in_memory()
    store.put_app("foo", BROKER, broker="amqp://u:p@10.0.0.1:5673/v")
    spec, _ = store.add_node("foo", "w1", BROKER)
    assert (spec.broker.hostname, spec.broker.port, spec.broker.virtual_host) == (
        "10.0.0.1",
        5673,
        "v",
    )
    store.add_node("foo", "w2", BROKER, broker="amqp://u:p@10.0.0.1:5673/v")
    assert len(store.dump()["broker"]) == 1


def test_autoscale_checks_the_resulting_range() -> None:
    store = Store.in_memory()
    store.add_node("foo", "w1", BROKER, max_concurrency=4, min_concurrency=2)
    with pytest.raises(BadParameter):
        store.set_autoscale("w1", None, 5)
    assert store.set_autoscale("w1", 8, None).max_concurrency == 8
    assert store.get_node("w1").min_concurrency == 2


def test_lookups_by_app_and_not_found() -> None:
    store = Store.in_memory()
    store.add_node("foo", "w1", BROKER)
    with pytest.raises(NotFound):
        store.get_node("w1", app="bar")
    with pytest.raises(NotFound):
        store.remove_consumption("w1", "nope")
    with pytest.raises(NotFound):
        store.delete_queue("foo", "nope")


def test_deleting_an_app_deletes_its_instances_and_queues() -> None:
    store = Store.in_memory()
    store.add_node("foo", "w1", BROKER)
    store.declare_queue("foo", QueueBinding("q", "q", "q"), BROKER)
    assert store.delete_app("foo") == ["w1"]
    dump = store.dump()
    assert dump["node"] == dump["queue"] == dump["app"] == []


def test_redeclaring_a_queue_updates_it() -> None:
    store = Store.in_memory()
    store.declare_queue("foo", QueueBinding("q", "q", "q"), BROKER)
    binding, created = store.declare_queue("foo", QueueBinding("q", "x", "y", "direct"), BROKER)
    assert not created
    assert store.get_queue("foo", "q") == binding == QueueBinding("q", "x", "y", "direct")
    assert json.loads(json.dumps(binding.to_json()))["exchange"] == "x"


# -- integrity at open (an empty or damaged store never starts silently) ------


def _store_with_rows(directory: Path, count: int = 300) -> Path:
    """A real store file spanning many pages, with no free pages."""
    store = Store.in_directory(directory)
    store.add_node("foo", "w0", BROKER, arguments=["--loglevel=INFO"])
    with store.engine.begin() as connection:  # one transaction: fast
        for i in range(1, count):
            connection.exec_driver_sql(
                "INSERT INTO node (name, app_id, max_concurrency, min_concurrency, is_enabled,"
                " created_at, arguments) VALUES (?, 1, 1, 1, 1, ?, ?)",
                (f"w{i}", float(i), json.dumps(["--loglevel=INFO"] * 5)),
            )
    assert store.count_nodes() == count
    store.close()
    path = directory / STORE_FILENAME
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA freelist_count").fetchone() == (0,)
        assert connection.execute("PRAGMA page_count").fetchone()[0] > 10
    return path


def _refused(path: Path) -> str:
    with pytest.raises(StoreError) as raised:
        Store.open(path)
    message = str(raised.value)
    assert str(path) in message and "\n" not in message
    return message


def test_missing_store_file_is_a_fresh_start(tmp_path: Path) -> None:
    store = Store.in_directory(tmp_path / "new")
    assert store.count_nodes() == 0
    store.close()
    # Made under another name and linked into place: nothing else is left.
    assert sorted(os.listdir(tmp_path / "new")) == [STORE_FILENAME]
    assert check_store_file(tmp_path / "new" / STORE_FILENAME) is True


def test_empty_store_file_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILENAME
    path.write_bytes(b"")
    assert "is empty (0 bytes)" in _refused(path)
    assert path.read_bytes() == b""


def test_garbage_store_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILENAME
    path.write_bytes(b"these are not the pages you are looking for\n" * 100)
    assert "is not a SQLite database" in _refused(path)
    path.write_bytes(b"SQLite format 3\x00")  # a header cut short
    assert "is not a SQLite database" in _refused(path)


def test_damaged_page_in_the_middle_is_refused(tmp_path: Path) -> None:
    path = _store_with_rows(tmp_path)
    size = path.stat().st_size
    middle = (size // 2) // 4096 * 4096  # the start of a page in use (no free pages)
    with open(path, "r+b") as f:
        f.seek(middle)
        f.write(b"\xff" * 4096)
    assert "is damaged" in _refused(path)


def test_damaged_btree_header_is_refused(tmp_path: Path) -> None:
    """A single wrong byte (the page type of the node table's root page)."""
    path = _store_with_rows(tmp_path)
    with sqlite3.connect(path) as connection:
        (root,) = connection.execute("SELECT rootpage FROM sqlite_master WHERE name = 'node'").fetchone()
        (page_size,) = connection.execute("PRAGMA page_size").fetchone()
    with open(path, "r+b") as f:
        f.seek((root - 1) * page_size)
        assert f.read(1) in (b"\x05", b"\x0d")  # interior or leaf table b-tree page
        f.seek((root - 1) * page_size)
        f.write(b"\x07")  # no such page type
    assert "is damaged" in _refused(path)


def test_truncated_store_is_refused(tmp_path: Path) -> None:
    path = _store_with_rows(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2 + 17)
    assert "is damaged" in _refused(path)


def test_sqlite_file_without_the_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILENAME
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE something (other)")
    connection.close()
    assert "no alembic_version" in _refused(path)


def test_store_missing_tables_or_with_unknown_revision_is_refused(tmp_path: Path) -> None:
    path = _store_with_rows(tmp_path, count=1)
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    connection.close()
    assert "unknown to this agent" in _refused(path)
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '0002'")
        connection.execute("DROP TABLE consumption")
    connection.close()
    assert "lacks the table(s) consumption" in _refused(path)


def test_symlink_or_other_file_types_are_refused(tmp_path: Path) -> None:
    real = _store_with_rows(tmp_path / "real", count=1)
    link = tmp_path / "link.sqlite"
    link.symlink_to(real)
    assert "symbolic link" in _refused(link)
    directory = tmp_path / "dir.sqlite"
    directory.mkdir()
    assert "not a regular file" in _refused(directory)
    fifo = tmp_path / "fifo.sqlite"
    os.mkfifo(fifo)
    assert "not a regular file" in _refused(fifo)  # and it does not hang


def test_orphaned_journal_is_refused(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILENAME
    (tmp_path / (STORE_FILENAME + "-journal")).write_bytes(b"\xd9\xd5\x05\xf9\x20\xa1\x63\xd7")
    assert "journal" in _refused(path)
    assert not path.exists()


def test_move_store_aside_keeps_the_old_file(tmp_path: Path) -> None:
    path = _store_with_rows(tmp_path, count=3)
    content = path.read_bytes()
    journal = tmp_path / (STORE_FILENAME + "-journal")
    journal.write_bytes(b"j")
    now = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    moved = move_store_aside(path, now=now)
    assert moved == f"{path}.20270115T080000Z.bak"
    assert Path(moved).read_bytes() == content
    assert Path(moved + "-journal").read_bytes() == b"j"
    assert not path.exists() and not journal.exists()
    # Starting fresh now works, and a second reset in the same second does
    # not overwrite the first backup.
    Store.in_directory(tmp_path).close()
    again = move_store_aside(path, now=now)
    assert again == f"{path}.20270115T080000Z-1.bak"
    assert Path(moved).read_bytes() == content
    assert move_store_aside(path, now=now) is None  # nothing left to move
    restored = Store.open(moved)  # the backup is still a working store
    assert restored.count_nodes() == 3
    restored.close()


def test_empty_store_after_reset(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILENAME
    path.write_bytes(b"")
    moved = move_store_aside(path)
    assert moved is not None and os.path.exists(moved)
    store = Store.in_directory(tmp_path)
    assert store.count_nodes() == 0
    store.close()


def test_agent_start_refuses_a_damaged_store_with_one_line_and_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scs.tap import open_store

    (tmp_path / STORE_FILENAME).write_bytes(b"")
    with pytest.raises(SystemExit) as raised:
        open_store(str(tmp_path))
    assert raised.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"scs-agent: store file {tmp_path / STORE_FILENAME} is empty (0 bytes)")
    assert "--reset-store" in err
    assert (tmp_path / STORE_FILENAME).read_bytes() == b""


def test_agent_start_with_reset_store_keeps_the_old_file(tmp_path: Path) -> None:
    from scs.tap import Options, open_store

    (tmp_path / STORE_FILENAME).write_bytes(b"junk")
    options = Options()
    options.parseOptions(["-i", "a1", "-D", str(tmp_path), "--reset-store"])
    assert options["reset-store"]
    store = open_store(str(tmp_path), reset=options["reset-store"])
    assert store.count_nodes() == 0
    store.close()
    (backup,) = tmp_path.glob(STORE_FILENAME + ".*.bak")
    assert backup.read_bytes() == b"junk"


def test_the_copies_of_peers_read_from_memory_match_the_file(tmp_path: Path) -> None:
    """Our copies of the peers' instances are decoded once and kept by the
    writers: after every change they read the same as a store opened anew."""
    store = Store.in_directory(tmp_path)

    def from_the_file() -> dict[str, list[dict]]:
        again = Store.in_directory(tmp_path)
        try:
            return again.replicas.instances()
        finally:
            again.close()

    def documents(*names: str) -> list[dict]:
        return [{"name": name, "app": "foo", "pid": None} for name in names]

    assert store.replicas.instances() == {} == from_the_file()
    given = documents("w2", "ü", "w1")
    store.replicas.put("agent2", "d2", given, now=1.0)
    store.replicas.put("agent3", "d3", documents("x"), now=2.0)
    given[0]["app"] = "changed by the caller"  # the store kept its own
    assert store.replicas.instances() == from_the_file()
    assert [d["name"] for d in store.replicas.instances("agent2")["agent2"]] == ["w1", "w2", "ü"]
    assert store.replicas.instances("agent2")["agent2"][1]["app"] == "foo"
    store.replicas.instances("agent2")["agent2"].clear()  # a caller's list is its own
    assert len(store.replicas.instances("agent2")["agent2"]) == 3

    store.replicas.drop("agent2", ["w1", "ü"])
    assert store.replicas.instances() == from_the_file()
    assert [d["name"] for d in store.replicas.instances("agent2")["agent2"]] == ["w2"]
    assert store.replicas.digests()["agent2"] == ""
    store.replicas.put("agent3", "d3b", [], now=3.0)
    store.replicas.drop("agent2")
    assert store.replicas.instances() == {} == from_the_file()
    assert store.replicas.instances("agent9") == {}
    store.close()
