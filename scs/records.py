"""Plain, immutable records passed between the store, the agent and the
supervisor.  The store turns its ORM rows into these so that nothing outside
``scs.store`` ever holds a live SQLAlchemy object."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import attrs

DEFAULT_AMQP_PORT = 5672
# The broker of SRS and of new apps unless told otherwise (--broker).
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672//"

# Sentinel for "parameter not given" where None is a meaningful value.
UNSET: Any = object()


def now_ms() -> int:
    """This agent's clock in milliseconds: what app revisions are made of
    (``scs.app_sync``)."""
    return int(time.time() * 1000)


DEFAULT_AMQPS_PORT = 5671
DEFAULT_PORTS = {"amqp": DEFAULT_AMQP_PORT, "amqps": DEFAULT_AMQPS_PORT}


@attrs.frozen
class BrokerInfo:
    """Where a worker's broker is, as the instance object's ``broker`` shows it."""

    hostname: str = "127.0.0.1"
    port: int = DEFAULT_AMQP_PORT
    userid: str = "guest"
    password: str = "guest"
    virtual_host: str = "/"
    transport: str = "amqp"

    @classmethod
    def from_url(cls, url: str) -> BrokerInfo:
        """Parse ``amqp://user:password@host:port/vhost``, or ``amqps://``
        for AMQP over TLS (``transport`` "amqps", default port 5671).

        Raises ``ValueError`` with a readable message on anything else.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("amqp", "pyamqp", "amqps"):
            # The scheme alone: the URL may hold a password, and this
            # message reaches answers and logs.
            raise ValueError(f"broker URL must start with amqp:// or amqps://, not {parts.scheme!r}")
        transport = "amqps" if scheme == "amqps" else "amqp"
        if parts.query or parts.fragment:
            raise ValueError("broker URL must not have a query or fragment")
        try:
            port = parts.port or DEFAULT_PORTS[transport]
        except ValueError:
            # Not urllib's text: it may quote part of the password.
            raise ValueError("bad port in broker URL") from None
        # amqp://host// names the vhost "/"; amqp://host/x names "x".
        path = parts.path
        if path in ("", "/"):
            vhost = "/"
        else:
            vhost = unquote(path[1:])
        return cls(
            hostname=parts.hostname or "127.0.0.1",
            port=port,
            userid=unquote(parts.username) if parts.username else "guest",
            password=unquote(parts.password) if parts.password else "guest",
            virtual_host=vhost,
            transport=transport,
        )

    @property
    def ssl(self) -> bool:
        """Whether the broker is reached over TLS (``amqps://``)."""
        return self.transport == "amqps"

    @property
    def kombu_ssl(self) -> dict[str, str] | None:
        """Celery's ``broker_use_ssl`` for this broker: None for amqp://.

        For amqps:// kombu alone verifies the certificate chain (against
        Python's default trust store, ``SSL_CERT_FILE`` included) but not the
        host name it was issued for; naming ``server_hostname`` turns that
        check on, as the SRS connection does it.
        """
        return {"server_hostname": self.hostname} if self.ssl else None

    @property
    def url(self) -> str:
        host = self.hostname
        if ":" in host:
            host = f"[{host}]"
        return "{}://{}:{}@{}:{}/{}".format(
            "amqps" if self.ssl else "amqp",
            quote(self.userid, safe=""),
            quote(self.password, safe=""),
            host,
            self.port,
            quote(self.virtual_host, safe=""),
        )

    def to_json(self, masked: bool = True) -> dict[str, Any]:
        return {
            "hostname": self.hostname,
            "port": self.port,
            "userid": self.userid,
            "password": "********" if masked else self.password,
            "virtual_host": self.virtual_host,
        }


@attrs.frozen
class QueueBinding:
    """A queue an instance consumes, with the declaration it was given."""

    name: str
    exchange: str
    routing_key: str
    exchange_type: str | None = None
    options: dict[str, Any] | None = attrs.field(default=None, eq=False, hash=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "exchange_type": self.exchange_type,
            "options": self.options,
        }


@attrs.frozen
class InstanceSpec:
    """The desired state of one worker instance, as the store has it."""

    name: str
    app: str
    broker: BrokerInfo
    max_concurrency: int = 1
    min_concurrency: int = 1
    is_enabled: bool = True
    celery_app: str | None = None
    queues: tuple[QueueBinding, ...] = ()
    # The app's extra worker arguments followed by the instance's own.
    arguments: tuple[str, ...] = ()
    # The instance's own extra arguments alone (what the API was given).
    node_arguments: tuple[str, ...] = ()
    # The app's settings for its workers (see ``AppRecord``).
    env: tuple[tuple[str, str], ...] = ()
    workdir: str | None = None
    python: str | None = None
    task_events: bool = False
    # The agent it was moved from by a failover or a drain, or None.
    moved_from: str | None = None

    @property
    def queue_names(self) -> tuple[str, ...]:
        return tuple(q.name for q in self.queues)


@attrs.frozen
class AppRecord:
    """A Celery application as the store has it."""

    name: str
    broker: BrokerInfo
    celery_app: str | None = None
    arguments: tuple[str, ...] = ()
    # Environment variables of its workers, merged over the agent's, as
    # sorted (name, value) pairs; shown as they are (no secrets here: see
    # the README).
    env: tuple[tuple[str, str], ...] = ()
    # The workers' working directory and interpreter; None: the agent's.
    workdir: str | None = None
    python: str | None = None
    # Workers started with --task-events, so that monitors see tasks.
    task_events: bool = False
    # The version of these settings across agents (``scs.app_sync``); not
    # a setting: two records with the same settings are equal.
    revision: int = attrs.field(default=0, eq=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "broker": self.broker.to_json(),
            "celery_app": self.celery_app,
            "arguments": list(self.arguments),
            "env": dict(self.env),
            "workdir": self.workdir,
            "python": self.python,
            "task_events": self.task_events,
        }


@attrs.frozen
class AutoscalingPolicy:
    """An app's queue-depth autoscaling policy (DESIGN §9.5): keep about
    ceil(messages / messages_per_instance) instances consuming ``queue``,
    within [min_instances, max_instances]; remove one only after the depth
    stayed low ``scale_down_after`` seconds."""

    app: str
    queue: str
    min_instances: int = 1
    max_instances: int = 1
    messages_per_instance: int = 10
    scale_down_after: float = 60.0

    # The fields a policy document has besides ``app``.
    FIELDS = ("queue", "min_instances", "max_instances", "messages_per_instance", "scale_down_after")

    def to_json(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "queue": self.queue,
            "min_instances": self.min_instances,
            "max_instances": self.max_instances,
            "messages_per_instance": self.messages_per_instance,
            "scale_down_after": self.scale_down_after,
        }


@attrs.frozen
class WorkerStatus:
    """What the supervisor knows of one instance's worker right now."""

    state: str  # starting running unresponsive restarting stopping stopped failed
    pid: int | None = None
    restarts: int = 0


# The states an instance's worker can be in, as the API shows them.
STATES = (
    "starting",
    "running",
    "unresponsive",
    "restarting",
    "stopping",
    "stopped",
    "failed",
)
