"""Celery remote control, off the reactor thread.

Celery's ``app.control`` and ``inspect`` block (they publish, then wait for
replies up to a timeout), so every call runs in a thread pool through
``deferToThreadPool`` and comes back as a Deferred.  One ``celery.Celery``
object is kept per broker URL: building one per call would open a new broker
connection every time.  Every call names its ``destination``: without it
Celery waits out its whole timeout for replies that may never come; with it
Celery stops as soon as every named node has answered.  The batch calls take
a list of nodes so that one broker round trip covers every worker on that
broker.

Broker failures surface as :class:`BrokerUnavailable` (an
``scs.errors.Unavailable``); a node that does not answer is simply missing
from a batch result, and is a :class:`scs.errors.GatewayTimeout` for the
single-node commands.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from scs.errors import GatewayTimeout, SCSError, Unavailable

T = TypeVar("T")

MAX_CONCURRENT = 4
"""Control calls in flight per broker (two pooled connections each)."""


class BrokerUnavailable(Unavailable):
    code = "unavailable"


class CommandFailed(SCSError):
    """The worker answered a control command with an error."""

    status = 502
    code = "error"


def _connection_errors() -> tuple[type[BaseException], ...]:
    from kombu.exceptions import OperationalError

    errors: list[type[BaseException]] = [OperationalError, OSError, socket.timeout]
    try:
        import amqp.exceptions

        errors.append(amqp.exceptions.ConnectionError)
    except ImportError:  # pragma: no cover - amqp is a kombu dependency
        pass
    return tuple(errors)


class CeleryControl:
    """Celery's remote control for the supervisor, returning Deferreds.

    ``reactor`` and ``threadpool`` are injectable; by default the global
    reactor and its thread pool.  ``connect_timeout`` bounds how long a call
    spends finding out that the broker is gone.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any = None,
        threadpool: Any = None,
        connect_timeout: float = 1.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self._threadpool = threadpool
        self._connect_timeout = connect_timeout
        self._apps: dict[str, Any] = {}
        self._semaphores: dict[tuple[str, str], DeferredSemaphore] = {}

    # -- plumbing ---------------------------------------------------------

    def app(self, broker_url: str) -> Any:
        """The cached Celery app for this broker (built in the reactor thread,
        so the cache needs no lock)."""
        app = self._apps.get(broker_url)
        if app is None:
            from celery import Celery

            app = Celery("scs-control", broker=broker_url, set_as_current=False)
            app.conf.broker_connection_timeout = self._connect_timeout
            # Fail fast: the supervisor retries at its next wake-up; a control
            # call must not sit in a thread retrying a dead broker.
            app.conf.broker_connection_retry = False
            app.conf.broker_connection_max_retries = 0
            # amqps://: kombu checks the certificate chain by itself; this
            # makes it check the host name as well (scs.records.BrokerInfo).
            if broker_url.lower().startswith("amqps://"):
                from scs.records import BrokerInfo

                app.conf.broker_use_ssl = BrokerInfo.from_url(broker_url).kombu_ssl
            app.control  # noqa: B018 - build the cached property here, not racing in threads
            self._apps[broker_url] = app
        return app

    def _pool(self) -> Any:
        return self._threadpool if self._threadpool is not None else self._reactor.getThreadPool()

    def _run(self, broker_url: str, f: Callable[..., T], lane: str = "control") -> Deferred[T]:
        """Run ``f`` in the thread pool, at most MAX_CONCURRENT at a time per
        broker and ``lane`` (the queue operations have a lane of their own,
        so that many of them never hold up the supervisor's control calls).

        Why the limit: a control call holds one connection from kombu's
        process-wide pool for that broker and its producer takes a second;
        kombu blocks without a timeout when the pool (10 by default) is
        empty, so ten concurrent calls deadlock every thread for good.
        Raising ``broker_pool_limit`` is no cure: kombu keeps one limit for
        the whole process and refuses to shrink it for the next app that
        asks for the default.
        """
        pool = self._pool()
        errors = _connection_errors()

        def call() -> T:
            try:
                return f()
            except errors as e:
                raise BrokerUnavailable(f"broker unavailable: {e}") from e

        key = (lane, broker_url)
        sem = self._semaphores.get(key)
        if sem is None:
            sem = self._semaphores[key] = DeferredSemaphore(MAX_CONCURRENT)
        return sem.run(deferToThreadPool, self._reactor, pool, call)

    def close(self) -> None:
        apps, self._apps = self._apps, {}
        for app in apps.values():
            try:
                app.close()
            except Exception:  # noqa: BLE001 - best effort at shutdown  # pragma: no cover
                self.log.failure("closing celery app")

    # -- batch calls (one round trip per broker) --------------------------

    def ping(self, broker_url: str, nodes: Sequence[str], timeout: float) -> Deferred[set[str]]:
        """The subset of ``nodes`` that answered a ping within ``timeout``."""
        app = self.app(broker_url)
        destination = list(nodes)

        def call() -> set[str]:
            replies = app.control.ping(destination=destination, timeout=timeout)
            return {node for reply in replies or () for node in reply}

        return self._run(broker_url, call)

    def active_queues(self, broker_url: str, nodes: Sequence[str], timeout: float) -> Deferred[dict[str, list[str]]]:
        """``{node: [queue names]}`` for the nodes that answered."""
        app = self.app(broker_url)
        destination = list(nodes)

        def call() -> dict[str, list[str]]:
            replies = app.control.inspect(destination=destination, timeout=timeout).active_queues()
            return {
                node: [q["name"] for q in queues or ()]
                for node, queues in (replies or {}).items()
                if isinstance(queues, list)
            }

        return self._run(broker_url, call)

    def stats(self, broker_url: str, nodes: Sequence[str], timeout: float) -> Deferred[dict[str, dict[str, Any]]]:
        """``{node: stats}`` for the nodes that answered."""
        app = self.app(broker_url)
        destination = list(nodes)

        def call() -> dict[str, dict[str, Any]]:
            replies = app.control.inspect(destination=destination, timeout=timeout).stats()
            return {n: s for n, s in (replies or {}).items() if isinstance(s, dict)}

        return self._run(broker_url, call)

    def active(self, broker_url: str, nodes: Sequence[str], timeout: float) -> Deferred[dict[str, list[str]]]:
        """``{node: [ids of the tasks it is running]}`` for the nodes that
        answered (the autoscaler removes only a worker with none)."""
        app = self.app(broker_url)
        destination = list(nodes)

        def call() -> dict[str, list[str]]:
            replies = app.control.inspect(destination=destination, timeout=timeout).active()
            return {
                node: [str(task.get("id")) for task in tasks if isinstance(task, dict)]
                for node, tasks in (replies or {}).items()
                if isinstance(tasks, list)
            }

        return self._run(broker_url, call)

    # -- commands to one node ---------------------------------------------

    def _command(self, node: str, send: Callable[[], Any]) -> Callable[[], str]:
        def call() -> str:
            replies = send()
            for reply in replies or ():
                if node in reply:
                    answer = reply[node]
                    if isinstance(answer, dict) and "error" in answer:
                        raise CommandFailed(str(answer["error"]), node=node)
                    if isinstance(answer, dict):
                        return str(answer.get("ok", ""))
                    return str(answer)
            raise GatewayTimeout(f"{node} did not answer", node=node)

        return call

    def add_consumer(
        self,
        broker_url: str,
        node: str,
        queue: str,
        *,
        exchange: str | None = None,
        routing_key: str | None = None,
        exchange_type: str | None = None,
        timeout: float = 1.0,
    ) -> Deferred[str]:
        app = self.app(broker_url)
        return self._run(
            broker_url,
            self._command(
                node,
                lambda: app.control.add_consumer(
                    queue,
                    exchange=exchange or queue,
                    exchange_type=exchange_type or "direct",
                    routing_key=routing_key or queue,
                    destination=[node],
                    reply=True,
                    timeout=timeout,
                ),
            ),
        )

    def cancel_consumer(self, broker_url: str, node: str, queue: str, *, timeout: float = 1.0) -> Deferred[str]:
        app = self.app(broker_url)
        return self._run(
            broker_url,
            self._command(
                node,
                lambda: app.control.cancel_consumer(queue, destination=[node], reply=True, timeout=timeout),
            ),
        )

    def autoscale(self, broker_url: str, node: str, max: int, min: int, *, timeout: float = 1.0) -> Deferred[str]:
        app = self.app(broker_url)
        return self._run(
            broker_url,
            self._command(
                node,
                lambda: app.control.autoscale(max, min, destination=[node], reply=True, timeout=timeout),
            ),
        )

    # -- the broker itself --------------------------------------------------

    def warm(self, broker_url: str) -> Deferred[None]:
        """Get the app, its connection pool and the ping machinery ready
        (one ping to a node that does not exist)."""
        app = self.app(broker_url)

        def call() -> None:
            app.control.ping(destination=["scs-warm-up@nowhere"], timeout=0.01)

        return self._run(broker_url, call)

    def broker_alive(self, broker_url: str, timeout: float = 1.0) -> Deferred[bool]:
        """Can a plain AMQP connection be opened to this broker now?"""

        def call() -> bool:
            from kombu import Connection

            conn = Connection(broker_url, connect_timeout=timeout)
            try:
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)
                return True
            except Exception:  # noqa: BLE001 - any failure to connect is "not alive"
                return False
            finally:
                conn.release()

        # Not through the semaphore: it opens its own connection.
        return deferToThreadPool(self._reactor, self._pool(), call)

    # -- queues on the broker ------------------------------------------------

    def _on_queue(self, broker_url: str, timeout: float, operate: Callable[[Any], T]) -> Deferred[T | None]:
        """Run ``operate(channel)`` on a connection of its own to the broker,
        every wait on it bounded by ``timeout``; None when the broker says
        the queue does not exist (a 404 channel error).

        A connection of its own, not one of kombu's pool: its socket gets
        read and write timeouts, and the channel error that a missing queue
        causes closes that channel, which must never be handed to the next
        caller.
        """
        app = self.app(broker_url)

        def call() -> T | None:
            from amqp.exceptions import ChannelError, NotFound as QueueNotFound

            conn = app.connection_for_write(
                connect_timeout=timeout,
                transport_options={"read_timeout": timeout, "write_timeout": timeout},
            )
            try:
                # Not kombu's default (a retry two seconds later): one quick
                # second try at most.
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)
                try:
                    return operate(conn.channel())
                except QueueNotFound:
                    return None
                except ChannelError as e:
                    # Refused (a queue another connection holds exclusively,
                    # no permission): the broker's words, no URL.
                    raise CommandFailed(f"the broker refused: {e}") from e
            finally:
                conn.release()

        return self._run(broker_url, call, lane="queues")

    def queue_stats(self, broker_url: str, queue: str, timeout: float = 1.0) -> Deferred[dict[str, int] | None]:
        """``{"messages", "consumers"}`` of ``queue`` (a passive declare:
        nothing is created), or None when it does not exist on the broker."""

        def operate(channel: Any) -> dict[str, int]:
            _name, messages, consumers = channel.queue_declare(queue=queue, passive=True)
            return {"messages": int(messages), "consumers": int(consumers)}

        return self._on_queue(broker_url, timeout, operate)

    def queue_purge(self, broker_url: str, queue: str, timeout: float = 1.0) -> Deferred[int | None]:
        """Drop every ready message of ``queue``: how many, or None when it
        does not exist on the broker."""
        return self._on_queue(broker_url, timeout, lambda channel: int(channel.queue_purge(queue=queue) or 0))

    def queue_delete(self, broker_url: str, queue: str, timeout: float = 1.0) -> Deferred[int | None]:
        """Delete ``queue`` from the broker: the messages it dropped, or None
        when it did not exist (RabbitMQ deletes a missing queue without a
        word, so a passive declare asks first)."""

        def operate(channel: Any) -> int:
            channel.queue_declare(queue=queue, passive=True)
            return int(channel.queue_delete(queue=queue) or 0)

        return self._on_queue(broker_url, timeout, operate)
