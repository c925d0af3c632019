"""Opening and upgrading the agent's store, and the queries the rest uses.

Every public method is one small synchronous transaction, run in the
reactor thread as Axiom's were; SQLite answers these in well under a
millisecond, so nothing is gained by moving them to a thread.  Methods take
validated values (see ``scs.validation``) and return the immutable records of
``scs.records``; integrity problems come back as ``NotFound``/``Conflict``.
The parts of the store with jobs of their own live in ``scs.store_*``
modules (see :class:`Store`).

Opening is strict: an existing store file that is empty, not a SQLite
database, damaged (``PRAGMA integrity_check``) or without the agent's schema
raises :class:`StoreError` instead of being started on (or silently
replaced by) an empty store.  A missing file is a fresh start; starting
fresh over an existing file is only done on purpose, by
:func:`move_store_aside` (``--reset-store``), which never deletes it.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sqlite3
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, func, inspect, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from scs.errors import Conflict, NotFound
from scs.models import (
    App,
    AppTombstone,
    AutoscalingPolicyRow,
    Broker,
    Consumption,
    Node,
    Queue,
)
from scs.records import UNSET, AppRecord, BrokerInfo, InstanceSpec, QueueBinding
from scs.store_policies import StoredPolicies
from scs.store_replicas import ReplicaCopies
from scs.store_revisions import POLICY, Revisions, drop_tombstone_in, next_revision_in, put_tombstone_in
from scs.store_settings import AgentSettings

STORE_FILENAME = ".scs-store.sqlite"
MIGRATIONS = Path(__file__).parent / "migrations"


SQLITE_MAGIC = b"SQLite format 3\x00"
SQLITE_HEADER_SIZE = 100
# Every revision of the schema has these; a store without them is not ours.
REQUIRED_TABLES = ("broker", "app", "node", "queue", "consumption")
# The tables ``LocalAgent.app_state`` is made of: a write to any of them
# bumps ``Store.app_writes``.
APP_STATE_TABLES = frozenset({"app", "broker", "app_tombstone", "autoscaling_policy", "autoscaling_tombstone"})
# A statement that writes, and the table it writes to.
_WRITE = re.compile(
    r"""\s*(?:INSERT(?:\s+OR\s+\w+)?\s+INTO|REPLACE\s+INTO|UPDATE(?:\s+OR\s+\w+)?|DELETE\s+FROM)\s+["`\[]?(\w+)""",
    re.IGNORECASE,
)
_NOT_WRITES = ("SELECT", "PRAGMA", "BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")
# Gives ``Store.app_writes`` its values: never the same twice, in any store.
_APP_WRITES = itertools.count(1)
# Files SQLite keeps next to a database; they belong to it.
COMPANION_SUFFIXES = ("-journal", "-wal", "-shm")


class StoreError(Exception):
    """A store file the agent must not start on: empty, not a SQLite
    database, damaged, not an SCS store, or not a regular file.  ``str()``
    is one line naming the file and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = " ".join(problem.split())  # one line, whatever SQLite said
        super().__init__(f"store file {self.path} {self.problem}")


def known_revisions() -> set[str]:
    """Every schema revision this agent's migrations know."""
    return {script.revision for script in ScriptDirectory(str(MIGRATIONS)).walk_revisions()}


def check_store_file(path: str | os.PathLike[str]) -> bool:
    """Whether a store file exists at ``path``; :class:`StoreError` if one
    exists but must not be used.

    Checked before SQLAlchemy or Alembic touch it, because both would
    quietly turn an empty or foreign file into a fresh, empty store."""
    path = os.fspath(path)
    try:
        # O_NOFOLLOW: a symlink is refused, not followed; O_NONBLOCK: a FIFO
        # planted there does not hang the agent at start.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        if any(os.path.lexists(path + suffix) for suffix in COMPANION_SUFFIXES):
            # SQLite would play an orphaned journal back onto a new store.
            raise StoreError(path, "is missing but its SQLite journal files are still there") from None
        return False
    except OSError as e:
        if os.path.islink(path):
            raise StoreError(path, "is a symbolic link, not a regular file") from None
        raise StoreError(path, f"cannot be opened: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StoreError(path, "is not a regular file")
        if info.st_size == 0:
            raise StoreError(path, "is empty (0 bytes)")
        header = os.read(fd, SQLITE_HEADER_SIZE)
    finally:
        os.close(fd)
    if len(header) < SQLITE_HEADER_SIZE or not header.startswith(SQLITE_MAGIC):
        raise StoreError(path, "is not a SQLite database")
    _check_database(path)
    return True


def _check_database(path: str) -> None:
    """Integrity and schema of an existing SQLite file."""
    from urllib.parse import quote

    # mode=rw: never create the file (it was there a moment ago).
    uri = f"file:{quote(os.path.abspath(path))}?mode=rw"
    try:
        connection = sqlite3.connect(uri, uri=True)
        try:
            rows = connection.execute("PRAGMA integrity_check").fetchall()
            if rows != [("ok",)]:
                first = str(rows[0][0]) if rows else "no answer"
                more = f" and {len(rows) - 1} more problems" if len(rows) > 1 else ""
                raise StoreError(path, f"is damaged (integrity check: {first}{more})")
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "alembic_version" not in tables:
                raise StoreError(path, "has no schema version (no alembic_version table): not an SCS store")
            versions = [row[0] for row in connection.execute("SELECT version_num FROM alembic_version")]
        finally:
            connection.close()
    except sqlite3.DatabaseError as e:
        raise StoreError(path, f"is damaged ({e})") from None
    if len(versions) != 1:
        raise StoreError(path, f"has {len(versions)} schema versions instead of one")
    if versions[0] not in known_revisions():
        raise StoreError(path, f"has schema revision {versions[0]!r}, unknown to this agent (a newer agent's?)")
    missing = [table for table in REQUIRED_TABLES if table not in tables]
    if missing:
        raise StoreError(path, f"lacks the table(s) {', '.join(missing)}")


def move_store_aside(path: str | os.PathLike[str], now: float | None = None) -> str | None:
    """Move the store file at ``path`` (whatever it is) to
    ``<name>.<UTC timestamp>.bak``, with its SQLite journal files; returns
    where it went, or None when there was nothing there.  Never deletes and
    never overwrites anything."""
    path = os.fspath(path)
    companions = [path + suffix for suffix in COMPANION_SUFFIXES if os.path.lexists(path + suffix)]
    if not os.path.lexists(path) and not companions:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    for attempt in range(1000):
        target = f"{path}.{stamp}{'' if attempt == 0 else f'-{attempt}'}.bak"
        taken = [target + suffix for suffix in ("", *COMPANION_SUFFIXES)]
        if not any(os.path.lexists(t) for t in taken):
            break
    else:
        raise StoreError(path, "cannot be moved aside: too many backups with this timestamp")
    try:
        if os.path.lexists(path):
            os.rename(path, target)
        for companion in companions:
            os.rename(companion, target + companion[len(path) :])
    except OSError as e:
        raise StoreError(path, f"cannot be moved aside to {target}: {e.strerror}") from None
    return target


def _enable_foreign_keys(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _engine(path: str) -> Engine:
    engine = create_engine(f"sqlite:///{path}")
    event.listen(engine, "connect", _enable_foreign_keys)
    return engine


def _create(path: str, revision: str) -> None:
    """A new store at ``path``, made under another name and linked into
    place complete, so that a crash while it is made never leaves an empty
    or half-made file that a restart would refuse."""
    partial = f"{path}.new-{os.getpid()}"
    for leftover in (partial, *(partial + suffix for suffix in COMPANION_SUFFIXES)):
        if os.path.lexists(leftover):
            os.unlink(leftover)
    engine = _engine(partial)
    try:
        migrate(engine, revision)
    finally:
        engine.dispose()
    try:
        os.link(partial, path)  # unlike rename, never replaces a file made meanwhile
    except FileExistsError:
        pass  # another process made one first: it is checked like any other
    except OSError:
        # A file system without hard links: rename, unless one appeared.
        if not os.path.lexists(path):
            os.rename(partial, path)
    finally:
        if os.path.lexists(partial):
            os.unlink(partial)
    check_store_file(path)


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema of ``engine`` to ``revision`` with Alembic."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def schema_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()


class Store:
    """The desired state of one agent: brokers, apps, instances, queues.

    The owner of the engine and its sessions (opening, upgrading and
    checking the file, the write counter ``app_writes``); the tables with
    jobs of their own are its parts, built here on the same sessions so
    that one file, one transaction style and one write counter cover them:
    ``revisions`` (revisions and tombstones, ``scs.store_revisions``),
    ``policies`` (``scs.store_policies``), ``replicas`` (the copies of the
    peers' instances, ``scs.store_replicas``) and ``settings``
    (``scs.store_settings``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # Changed by every statement that writes to the tables of the apps'
        # state (APP_STATE_TABLES), whatever method, session or connection
        # of this engine runs it: ``LocalAgent`` keeps its app state and
        # digest while it stays.  Never the same value in two stores.
        self.app_writes = next(_APP_WRITES)
        event.listen(engine, "after_cursor_execute", self._after_execute)
        # The parts with jobs of their own, on the same engine and sessions
        # (so that their writes count in ``app_writes`` too).
        self.revisions = Revisions(engine, self._sessions)
        self.policies = StoredPolicies(self._sessions, self._app)
        self.replicas = ReplicaCopies(self._sessions)
        self.settings = AgentSettings(self._sessions)
        self.revisions.clamp()

    def _after_execute(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip()[:9].upper().startswith(_NOT_WRITES):
            return
        written = _WRITE.match(statement)
        # A write whose table is not recognised counts (never a stale digest).
        if written is None or written.group(1).lower() in APP_STATE_TABLES:
            self.app_writes = next(_APP_WRITES)

    @classmethod
    def open(cls, path: str | os.PathLike[str], revision: str = "head") -> Store:
        """Open (creating and upgrading as needed) the store file at ``path``.

        A missing file is created; an existing one that is empty, damaged or
        not an SCS store raises :class:`StoreError` (see ``check_store_file``).
        """
        path = os.fspath(path)
        if not check_store_file(path):
            _create(path, revision)
        engine = _engine(path)
        try:
            migrate(engine, revision)
        except SQLAlchemyError as e:
            engine.dispose()
            cause = getattr(e, "orig", None) or e
            raise StoreError(path, f"could not be upgraded to the current schema ({cause})") from None
        return cls(engine)

    @classmethod
    def in_directory(cls, directory: str | os.PathLike[str]) -> Store:
        Path(directory).mkdir(parents=True, exist_ok=True)
        return cls.open(Path(directory) / STORE_FILENAME)

    @classmethod
    def in_memory(cls, revision: str = "head") -> Store:
        """A private in-memory store, for tests."""
        engine = create_engine(
            "sqlite://",
            poolclass=StaticPool,
            connect_args={"check_same_thread": False},
        )
        event.listen(engine, "connect", _enable_foreign_keys)
        migrate(engine, revision)
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # -- brokers ---------------------------------------------------------

    def _broker(self, session: Session, url: str) -> Broker:
        url = BrokerInfo.from_url(url).url  # one row per broker, however spelt
        broker = session.scalar(select(Broker).where(Broker.url == url))
        if broker is None:
            broker = Broker(url=url)
            session.add(broker)
        return broker

    # -- apps ------------------------------------------------------------

    def _app(self, session: Session, name: str) -> App:
        app = session.scalar(select(App).where(App.name == name))
        if app is None:
            raise NotFound(f"no app named {name!r}", app=name)
        return app

    def _app_or_create(self, session: Session, name: str, default_broker: str, revision: int | None = None) -> App:
        """The app ``name``, made with ``revision`` if it is new (its older
        tombstone goes).  Without one (an instance or queue of an app not
        here), the revision is just above the name's deletion if one is
        known here (the app is made anew), else 0: the app's own settings,
        which this agent may have missed, win over these defaults."""
        app = session.scalar(select(App).where(App.name == name))
        if app is None:
            if revision is None:
                tombstone = session.get(AppTombstone, name)
                revision = 0 if tombstone is None else tombstone.revision + 1
            app = App(
                name=name,
                broker=self._broker(session, default_broker),
                arguments="[]",
                env="{}",
                revision=revision,
            )
            session.add(app)
            drop_tombstone_in(session, name, revision)
            session.flush()
        return app

    def put_app(
        self,
        name: str,
        default_broker: str,
        *,
        broker: str | None = None,
        celery_app: Any = UNSET,
        arguments: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        workdir: Any = UNSET,
        python: Any = UNSET,
        task_events: bool | None = None,
        revision: int | None = None,
    ) -> tuple[AppRecord, bool]:
        """Create or update an app; returns it and whether it was created.

        A setting left out (None, or UNSET where None means "the agent's
        default") keeps its stored value; ``env`` replaces the whole set of
        variables (``{}`` clears it).  ``revision``: the change's, given by
        the agent that took it (None: a new one when something changed, see
        ``Revisions.next``); an older tombstone of the name goes."""
        with self.transaction() as session:
            existing = session.scalar(select(App).where(App.name == name))
            before = None if existing is None else _app_record(existing)
            if revision is None and existing is None:
                revision = next_revision_in(session, name)
            app = self._app_or_create(session, name, broker or default_broker, revision)
            if broker is not None:
                app.broker = self._broker(session, broker)
            if celery_app is not UNSET:
                app.celery_app = celery_app
            if arguments is not None:
                app.arguments = json.dumps(list(arguments))
            if env is not None:
                app.env = json.dumps(dict(sorted(env.items())))
            if workdir is not UNSET:
                app.workdir = workdir
            if python is not UNSET:
                app.python = python
            if task_events is not None:
                app.task_events = task_events
            if revision is not None:
                app.revision = revision
            elif before is not None and _app_record(app) != before:
                app.revision = next_revision_in(session, name)
            drop_tombstone_in(session, name, app.revision)
            session.flush()
            return _app_record(app), existing is None

    def ensure_app(self, name: str, default_broker: str) -> AppRecord:
        with self.transaction() as session:
            return _app_record(self._app_or_create(session, name, default_broker))

    def get_app(self, name: str) -> AppRecord:
        with self.transaction() as session:
            return _app_record(self._app(session, name))

    def has_app(self, name: str) -> bool:
        return bool(self._scalars(select(App.id).where(App.name == name)))

    def list_apps(self) -> list[AppRecord]:
        with self.transaction() as session:
            return [_app_record(a) for a in session.scalars(select(App).order_by(App.name))]

    def delete_app(self, name: str, revision: int | None = None) -> list[str]:
        """Delete an app with its instances and queues, leaving a tombstone
        at ``revision`` (None: a new one); returns the instances' names."""
        with self.transaction() as session:
            app = self._app(session, name)
            names = [n.name for n in app.nodes]
            if revision is None:
                revision = next_revision_in(session, name)
            had_policy = session.get(AutoscalingPolicyRow, app.id) is not None
            session.delete(app)
            put_tombstone_in(session, name, revision)
            if had_policy:
                # Its policy goes with it: a peer's older copy of it must
                # not come back with a later app of the same name.
                put_tombstone_in(session, name, revision, POLICY)
            return names

    # -- nodes -----------------------------------------------------------

    def _node(self, session: Session, name: str, app: str | None = None) -> Node:
        node = session.scalar(select(Node).where(Node.name == name))
        if node is None or (app is not None and node.app.name != app):
            raise NotFound(f"no instance named {name!r}", instance=name)
        return node

    def add_node(
        self,
        app: str,
        name: str,
        default_broker: str,
        *,
        max_concurrency: int = 1,
        min_concurrency: int = 1,
        broker: str | None = None,
        arguments: Sequence[str] = (),
        queues: Sequence[QueueBinding] = (),
        is_enabled: bool = True,
        moved_from: str | None = None,
    ) -> tuple[InstanceSpec, bool]:
        """Add an instance; an identical existing one is returned as is.

        Returns the instance and whether it was created.  An instance of the
        same name with other settings is a ``Conflict``.
        """
        with self.transaction() as session:
            found = session.scalar(select(Node).where(Node.name == name))
            if found is not None:
                spec = _instance_spec(found)
                wanted_broker = BrokerInfo.from_url(broker) if broker is not None else spec.broker
                same = (
                    found.app.name == app
                    and spec.max_concurrency == max_concurrency
                    and spec.min_concurrency == min_concurrency
                    and spec.broker == wanted_broker
                    and spec.node_arguments == tuple(arguments)
                    and set(spec.queue_names) >= {q.name for q in queues}
                )
                if not same:
                    raise Conflict(f"instance {name!r} exists with other settings", instance=name)
                return spec, False
            app_row = self._app_or_create(session, app, default_broker)
            node = Node(
                name=name,
                app=app_row,
                broker=self._broker(session, broker) if broker is not None else None,
                max_concurrency=max_concurrency,
                min_concurrency=min_concurrency,
                is_enabled=is_enabled,
                created_at=time.time(),
                arguments=json.dumps(list(arguments)),
                moved_from=moved_from,
            )
            for binding in queues:
                node.consumptions.append(_consumption(binding))
            session.add(node)
            session.flush()
            return _instance_spec(node), True

    def get_node(self, name: str, app: str | None = None) -> InstanceSpec:
        with self.transaction() as session:
            return _instance_spec(self._node(session, name, app))

    def _scalars(self, query: Any) -> list[Any]:
        """Run a read-only column query without an ORM session.

        Listings and ownership checks run on every agent for every cluster
        request; a bare connection answers them in about a third of the
        time a session takes (0.2 against 0.58 ms, measured on 20 rows)."""
        with self.engine.connect() as connection:
            return list(connection.execute(query).scalars())

    def has_node(self, name: str) -> bool:
        return bool(self._scalars(select(Node.id).where(Node.name == name)))

    def list_nodes(self, app: str | None = None) -> list[InstanceSpec]:
        with self.transaction() as session:
            query = select(Node).order_by(Node.created_at, Node.id)
            if app is not None:
                query = query.join(App).where(App.name == app)
            return [_instance_spec(n) for n in session.scalars(query)]

    def node_names(self, app: str | None = None) -> list[str]:
        """Names alone, in creation order: listings are hot and need no more."""
        query = select(Node.name).order_by(Node.created_at, Node.id)
        if app is not None:
            query = query.join(App).where(App.name == app)
        return self._scalars(query)

    def count_nodes(self) -> int:
        return self._scalars(select(func.count(Node.id)))[0]

    def queue_names(self, app: str) -> list[str]:
        return self._scalars(select(Queue.name).join(App).where(App.name == app).order_by(Queue.name))

    def delete_node(self, name: str, app: str | None = None) -> InstanceSpec:
        with self.transaction() as session:
            node = self._node(session, name, app)
            spec = _instance_spec(node)
            session.delete(node)
            return spec

    def set_enabled(self, name: str, enabled: bool, app: str | None = None) -> InstanceSpec:
        with self.transaction() as session:
            node = self._node(session, name, app)
            node.is_enabled = enabled
            session.flush()
            return _instance_spec(node)

    def set_autoscale(
        self,
        name: str,
        max_concurrency: int | None,
        min_concurrency: int | None,
        app: str | None = None,
    ) -> InstanceSpec:
        from scs.validation import check_concurrency_range

        with self.transaction() as session:
            node = self._node(session, name, app)
            new_max = node.max_concurrency if max_concurrency is None else max_concurrency
            new_min = node.min_concurrency if min_concurrency is None else min_concurrency
            check_concurrency_range(new_max, new_min)
            node.max_concurrency, node.min_concurrency = new_max, new_min
            session.flush()
            return _instance_spec(node)

    def add_consumption(self, name: str, binding: QueueBinding, app: str | None = None) -> InstanceSpec:
        """Make the instance consume ``binding`` (replacing an older declaration)."""
        with self.transaction() as session:
            node = self._node(session, name, app)
            for consumption in node.consumptions:
                if consumption.queue_name == binding.name:
                    node.consumptions.remove(consumption)
                    session.flush()
                    break
            node.consumptions.append(_consumption(binding))
            session.flush()
            return _instance_spec(node)

    def remove_consumption(self, name: str, queue: str, app: str | None = None) -> InstanceSpec:
        with self.transaction() as session:
            node = self._node(session, name, app)
            for consumption in node.consumptions:
                if consumption.queue_name == queue:
                    node.consumptions.remove(consumption)
                    session.flush()
                    return _instance_spec(node)
            raise NotFound(f"instance {name!r} does not consume {queue!r}", instance=name, queue=queue)

    # -- queues ----------------------------------------------------------

    def _queue(self, session: Session, app: str, name: str) -> Queue:
        queue = session.scalar(select(Queue).join(App).where(App.name == app, Queue.name == name))
        if queue is None:
            raise NotFound(f"no queue named {name!r} in app {app!r}", queue=name)
        return queue

    def declare_queue(self, app: str, binding: QueueBinding, default_broker: str) -> tuple[QueueBinding, bool]:
        """Declare (or re-declare with new settings) a queue of ``app``."""
        with self.transaction() as session:
            app_row = self._app_or_create(session, app, default_broker)
            queue = session.scalar(select(Queue).where(Queue.app_id == app_row.id, Queue.name == binding.name))
            created = queue is None
            if queue is None:
                queue = Queue(app=app_row, name=binding.name)
                session.add(queue)
            queue.exchange = binding.exchange
            queue.routing_key = binding.routing_key
            queue.exchange_type = binding.exchange_type
            queue.options = None if binding.options is None else json.dumps(binding.options)
            session.flush()
            return _queue_binding(queue), created

    def get_queue(self, app: str, name: str) -> QueueBinding:
        with self.transaction() as session:
            return _queue_binding(self._queue(session, app, name))

    def find_queue(self, app: str, name: str) -> QueueBinding | None:
        try:
            return self.get_queue(app, name)
        except NotFound:
            return None

    def list_queues(self, app: str) -> list[QueueBinding]:
        with self.transaction() as session:
            query = select(Queue).join(App).where(App.name == app).order_by(Queue.name)
            return [_queue_binding(q) for q in session.scalars(query)]

    def delete_queue(self, app: str, name: str) -> QueueBinding:
        with self.transaction() as session:
            queue = self._queue(session, app, name)
            binding = _queue_binding(queue)
            session.delete(queue)
            return binding

    # -- whole-store views -----------------------------------------------

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table, for comparing the store before and after."""
        tables: dict[str, list[tuple[Any, ...]]] = {}
        with self.engine.connect() as connection:
            for table in ("broker", "app", "node", "queue", "consumption"):
                rows = connection.exec_driver_sql(f"SELECT * FROM {table} ORDER BY id")
                tables[table] = [tuple(row) for row in rows]
            for table, order in (
                ("replica_owner", "owner"),
                ("replica_instance", "owner, name"),
                ("agent_setting", "key"),
                ("autoscaling_policy", "app_id"),
                ("app_tombstone", "name"),
                ("autoscaling_tombstone", "name"),
            ):
                rows = connection.exec_driver_sql(f"SELECT * FROM {table} ORDER BY {order}")
                tables[table] = [tuple(row) for row in rows]
        return tables


def _app_env(app: App) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(json.loads(app.env or "{}").items()))


def _app_record(app: App) -> AppRecord:
    return AppRecord(
        name=app.name,
        broker=BrokerInfo.from_url(app.broker.url),
        celery_app=app.celery_app,
        arguments=tuple(json.loads(app.arguments or "[]")),
        env=_app_env(app),
        workdir=app.workdir,
        python=app.python,
        task_events=bool(app.task_events),
        revision=app.revision or 0,
    )


def _queue_binding(row: Queue | Consumption) -> QueueBinding:
    """A declaration, or the copy of one a consumption keeps."""
    return QueueBinding(
        name=row.name if isinstance(row, Queue) else row.queue_name,
        exchange=row.exchange,
        routing_key=row.routing_key,
        exchange_type=row.exchange_type,
        options=None if row.options is None else json.loads(row.options),
    )


def _consumption(binding: QueueBinding) -> Consumption:
    return Consumption(
        queue_name=binding.name,
        exchange=binding.exchange,
        routing_key=binding.routing_key,
        exchange_type=binding.exchange_type,
        options=None if binding.options is None else json.dumps(binding.options),
    )


def _instance_spec(node: Node) -> InstanceSpec:
    app_arguments = tuple(json.loads(node.app.arguments or "[]"))
    node_arguments = tuple(json.loads(node.arguments or "[]"))
    broker = node.broker if node.broker is not None else node.app.broker
    return InstanceSpec(
        name=node.name,
        app=node.app.name,
        broker=BrokerInfo.from_url(broker.url),
        max_concurrency=node.max_concurrency,
        min_concurrency=node.min_concurrency,
        is_enabled=node.is_enabled,
        celery_app=node.app.celery_app,
        queues=tuple(_queue_binding(c) for c in node.consumptions),
        arguments=app_arguments + node_arguments,
        node_arguments=node_arguments,
        env=_app_env(node.app),
        workdir=node.app.workdir,
        python=node.app.python,
        task_events=bool(node.app.task_events),
        moved_from=node.moved_from,
    )
