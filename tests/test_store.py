"""The store: schema migrations, persistence across reopen, integrity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from scs.errors import BadParameter, Conflict, NotFound
from scs.records import QueueBinding
from scs.store import STORE_FILENAME, Store, migrate, schema_revision

BROKER = "amqp://guest:guest@127.0.0.1:5672//"


def test_in_memory_store_is_at_head() -> None:
    store = Store.in_memory()
    assert schema_revision(store.engine) == "0002"


def test_upgrade_from_first_revision_keeps_data(tmp_path: Path) -> None:
    """A store made by the first schema revision is upgraded in place at open."""
    path = tmp_path / STORE_FILENAME
    engine = create_engine(f"sqlite:///{path}")
    migrate(engine, "0001")
    assert schema_revision(engine) == "0001"
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO broker (id, url) VALUES (1, 'amqp://guest:guest@127.0.0.1:5672/%2F')"
        )
        connection.exec_driver_sql(
            "INSERT INTO app (id, name, broker_id, celery_app) VALUES (1, 'foo', 1, 'proj:app')"
        )
        connection.exec_driver_sql(
            "INSERT INTO node (id, name, app_id, broker_id, max_concurrency, min_concurrency,"
            " is_enabled, created_at) VALUES (1, 'w1', 1, NULL, 4, 2, 1, 0.0)"
        )
        connection.exec_driver_sql(
            "INSERT INTO queue (id, app_id, name, exchange, routing_key) "
            "VALUES (1, 1, 'tasks', 'tasks', 'tasks')"
        )
        connection.exec_driver_sql(
            "INSERT INTO consumption (id, node_id, queue_name, exchange, routing_key) "
            "VALUES (1, 1, 'tasks', 'tasks', 'tasks')"
        )
    engine.dispose()

    store = Store.in_directory(tmp_path)
    assert schema_revision(store.engine) == "0002"
    spec = store.get_node("w1")
    assert (spec.app, spec.max_concurrency, spec.min_concurrency) == ("foo", 4, 2)
    assert spec.queue_names == ("tasks",)
    assert spec.celery_app == "proj:app"
    assert spec.arguments == ()  # the new column got its default
    assert store.get_app("foo").arguments == ()
    assert store.list_queues("foo")[0].name == "tasks"
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
