"""The agent's object store schema: ``Broker``, ``App``, ``Node``, ``Queue``
and the consumption relation between nodes and queues.

It keeps the virtues of an Axiom store (the object database the design first
named, which has no Python 3 release): small synchronous transactions in the
reactor thread, one SQLite file per agent, named item classes.  Schema changes go through the
Alembic revisions in ``scs/migrations``; this module is the current shape.
"""

from __future__ import annotations

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Broker(Base):
    """An AMQP broker, kept once per URL and shared by apps and nodes."""

    __tablename__ = "broker"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    url: Mapped[str] = mapped_column(String(1024), unique=True)


class App(Base):
    """A Celery application: its default broker, its ``-A`` target and the
    settings every worker of it runs with."""

    __tablename__ = "app"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    broker_id: Mapped[int] = mapped_column(ForeignKey("broker.id"))
    celery_app: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # JSON list of extra ``celery worker`` arguments for every instance.
    arguments: Mapped[str] = mapped_column(Text, default="[]", server_default="[]")
    # JSON object of environment variables for its workers, merged over the
    # agent's own environment.
    env: Mapped[str] = mapped_column(Text, default="{}", server_default="{}")
    # The workers' working directory; None: the agent's.
    workdir: Mapped[str | None] = mapped_column(String(4096), nullable=True)
    # The interpreter that runs ``-m celery``; None: the agent's.
    python: Mapped[str | None] = mapped_column(String(4096), nullable=True)
    # Start the workers with ``--task-events`` (``-E``) for monitors.
    task_events: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    # Which version of its settings this is (``scs.app_sync``): the highest
    # wins across agents.  Milliseconds of the clock of the agent that took
    # the change, or one more than the last revision it knew.
    revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    broker: Mapped[Broker] = relationship(lazy="joined")
    nodes: Mapped[list[Node]] = relationship(back_populates="app", cascade="all, delete-orphan", passive_deletes=True)
    queues: Mapped[list[Queue]] = relationship(back_populates="app", cascade="all, delete-orphan", passive_deletes=True)


class AppTombstone(Base):
    """A deleted app: its name and the revision of the deletion, so that a
    peer that still has an older copy of the app deletes it too rather than
    giving it back (``scs.app_sync``).  A later put of the name with a
    higher revision removes it; it is purged after ``--forget-dead-after``."""

    __tablename__ = "app_tombstone"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer)
    # When this agent recorded it (its own clock, for people reading the store).
    deleted_at: Mapped[float] = mapped_column(Float, default=0.0)


class Node(Base):
    """One worker instance owned by this agent (a ``celery worker`` process)."""

    __tablename__ = "node"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Unique on the agent, not per app: it becomes the Celery node name.
    name: Mapped[str] = mapped_column(String(64), unique=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("app.id", ondelete="CASCADE"))
    # None: use the app's broker.
    broker_id: Mapped[int | None] = mapped_column(ForeignKey("broker.id"), nullable=True)
    max_concurrency: Mapped[int] = mapped_column(Integer, default=1)
    min_concurrency: Mapped[int] = mapped_column(Integer, default=1)
    is_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[float] = mapped_column(Float, default=0.0)
    # JSON list of extra ``celery worker`` arguments for this instance.
    arguments: Mapped[str] = mapped_column(Text, default="[]", server_default="[]")
    # The agent it was moved from (a failover or a drain), or None.  That
    # agent, back, drops its own copy: the moved one wins.
    moved_from: Mapped[str | None] = mapped_column(String(64), nullable=True)

    app: Mapped[App] = relationship(back_populates="nodes", lazy="joined")
    broker: Mapped[Broker | None] = relationship(lazy="joined")
    consumptions: Mapped[list[Consumption]] = relationship(
        back_populates="node",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Consumption.id",
        lazy="selectin",
    )


class Queue(Base):
    """A queue declaration of an app: where its messages come from."""

    __tablename__ = "queue"
    __table_args__ = (UniqueConstraint("app_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("app.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    exchange: Mapped[str] = mapped_column(String(200))
    routing_key: Mapped[str] = mapped_column(String(200))
    exchange_type: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # JSON object of extra kombu queue options, or None.
    options: Mapped[str | None] = mapped_column(Text, nullable=True)

    app: Mapped[App] = relationship(back_populates="queues")


class Consumption(Base):
    """A node consuming from a queue.

    It keeps a copy of the declaration it was told to use, because the
    declaration may live on another agent of the cluster (a queue is owned
    by the agent it was declared on), and the worker must keep
    consuming with it across restarts of either agent.
    """

    __tablename__ = "consumption"
    __table_args__ = (UniqueConstraint("node_id", "queue_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("node.id", ondelete="CASCADE"))
    queue_name: Mapped[str] = mapped_column(String(200))
    exchange: Mapped[str] = mapped_column(String(200))
    routing_key: Mapped[str] = mapped_column(String(200))
    exchange_type: Mapped[str | None] = mapped_column(String(32), nullable=True)
    options: Mapped[str | None] = mapped_column(Text, nullable=True)

    node: Mapped[Node] = relationship(back_populates="consumptions")


class ReplicaOwner(Base):
    """A peer whose instances this agent keeps a copy of, and the digest of
    that copy (compared with the digest in the peer's heartbeats)."""

    __tablename__ = "replica_owner"

    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))
    synced_at: Mapped[float] = mapped_column(Float, default=0.0)


class ReplicaInstance(Base):
    """One instance of a peer, as that peer exported it (a checked JSON
    document: its settings and desired state), to re-create it elsewhere
    if the peer's machine is lost."""

    __tablename__ = "replica_instance"

    owner: Mapped[str] = mapped_column(ForeignKey("replica_owner.owner", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    document: Mapped[str] = mapped_column(Text)


class AgentSetting(Base):
    """This agent's own state that must survive a restart (``draining``)."""

    __tablename__ = "agent_setting"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class AutoscalingPolicyRow(Base):
    """An app's queue-depth autoscaling policy (``scs.autoscaling``), one
    per app at most, gone with its app."""

    __tablename__ = "autoscaling_policy"

    app_id: Mapped[int] = mapped_column(ForeignKey("app.id", ondelete="CASCADE"), primary_key=True)
    queue: Mapped[str] = mapped_column(String(200))
    min_instances: Mapped[int] = mapped_column(Integer)
    max_instances: Mapped[int] = mapped_column(Integer)
    messages_per_instance: Mapped[int] = mapped_column(Integer)
    scale_down_after: Mapped[float] = mapped_column(Float)
    # As an app's (``scs.app_sync``): given by the agent that took the change.
    revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class AutoscalingTombstone(Base):
    """A deleted autoscaling policy (by ``DELETE /<app>/autoscaling/`` or
    with its app): the app's name and the revision of the deletion, as
    ``AppTombstone`` is for apps (``scs.app_sync``)."""

    __tablename__ = "autoscaling_tombstone"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer)
    deleted_at: Mapped[float] = mapped_column(Float, default=0.0)
