"""Test helpers shared by the test suite (fakes for the reactor-facing parts)."""


# --- SRS: in-memory AMQP network (owner: SRS transport) -------------------
# FakeAMQPNetwork is a tiny broker in one process: exchanges (direct, fanout
# and the default one), exclusive queues, deliveries scheduled on an injected
# clock. FakeTransport implements scs.srs_wire.ISRSTransport on it and refuses what
# txAMQP 0.8.2 would corrupt (non-bytes or non-ASCII bodies, non-ASCII or
# unknown properties), so unit tests catch what only the real broker would.

from typing import Any as _Any

import attr as _attr
from twisted.application.service import Service as _Service
from twisted.internet import defer as _defer
from twisted.internet.error import (
    ProcessDone as _ProcessDone,
    ProcessExitedAlready as _ProcessExitedAlready,
    ProcessTerminated as _ProcessTerminated,
)
from twisted.python.failure import Failure as _Failure
from zope.interface import implementer as _implementer

from scs import srs_wire as _srs
from scs.errors import Unavailable as _Unavailable

# The properties the SRS transports may set (txAMQP spells them hyphenated).
AMQP_PROPERTIES = frozenset({"content-type", "reply-to", "correlation-id", "delivery-mode", "message-id", "type"})


@_attr.s(auto_attribs=True)
class FakeDelivery:
    exchange: str
    routing_key: str
    body: bytes
    properties: dict


class FakeAMQPNetwork:
    """An in-memory broker shared by FakeTransports.

    ``clock`` schedules every delivery ``latency`` seconds later, so nothing
    is delivered re-entrantly inside ``publish`` (as with a real broker);
    with ``twisted.internet.task.Clock``, ``clock.advance(0)`` delivers all.
    """

    def __init__(self, clock: _Any, latency: float = 0.0, reconnect_delay: float = 0.0) -> None:
        self.clock = clock
        self.latency = latency
        self.reconnect_delay = reconnect_delay
        self.running = True
        self.exchanges: dict[str, tuple[str, set[tuple[str, str]]]] = {}
        self.queues: dict[str, FakeTransport] = {}
        self.published: list[FakeDelivery] = []
        self.transports: list[FakeTransport] = []
        self._queue_counter = 0

    def transport(self) -> "FakeTransport":
        """A new transport on this network (give it to ``SRS(transport=...)``)."""
        t = FakeTransport(self)
        self.transports.append(t)
        return t

    def stop_broker(self) -> None:
        """The broker goes away: every connection drops, queues vanish."""
        self.running = False
        for t in list(self.transports):
            t._lose("broker stopped")
        self.exchanges.clear()

    def start_broker(self) -> None:
        """The broker is back: running transports reconnect after ``reconnect_delay``."""
        self.running = True
        for t in self.transports:
            if t.running and not t.connected:
                t._schedule_connect(self.reconnect_delay)

    def declare(self, exchange: str, kind: str) -> None:
        known = self.exchanges.setdefault(exchange, (kind, set()))
        if known[0] != kind:
            raise ValueError("exchange %s redeclared as %s" % (exchange, kind))

    def route(self, exchange: str, routing_key: str, body: bytes, properties: dict) -> int:
        """Queue ``body`` for every matching queue; return how many matched."""
        self.published.append(FakeDelivery(exchange, routing_key, body, dict(properties)))
        if exchange == "":
            targets = [routing_key] if routing_key in self.queues else []
        else:
            kind, bindings = self.exchanges[exchange]
            targets = sorted({q for q, key in bindings if kind == "fanout" or key == routing_key})
        for queue in targets:
            self.clock.callLater(self.latency, self._deliver, queue, body, dict(properties))
        return len(targets)

    def _deliver(self, queue: str, body: bytes, properties: dict) -> None:
        # The queue may have gone (connection lost) while the message was in flight.
        transport = self.queues.get(queue)
        if transport is not None and transport.hung:
            transport.held.append((body, properties))
        elif transport is not None and transport.receiver is not None:
            transport.receiver.message_received(body, properties)

    def _new_queue_nonce(self) -> str:
        self._queue_counter += 1
        return "%08x" % self._queue_counter


@_implementer(_srs.ISRSTransport)
class FakeTransport(_Service):
    """scs.srs.ISRSTransport on a FakeAMQPNetwork."""

    def __init__(self, network: FakeAMQPNetwork) -> None:
        self.network = network
        self.agent_id: str | None = None
        self.cluster: str | None = None
        self.receiver: _Any = None
        self.reply_queue: str | None = None
        self.crashed = False
        # Stopped (SIGSTOP): the queue stays and fills, nothing goes out.
        self.hung = False
        self.held: list[tuple[bytes, dict]] = []
        self._pending_connect: _Any = None

    @property
    def connected(self) -> bool:
        return self.reply_queue is not None

    def attach(self, agent_id: str, cluster: str, receiver: _Any) -> None:
        self.agent_id, self.cluster, self.receiver = agent_id, cluster, receiver

    def startService(self) -> None:
        super().startService()
        self._schedule_connect(0)

    def stopService(self) -> _Any:
        super().stopService()
        if self._pending_connect is not None and self._pending_connect.active():
            self._pending_connect.cancel()
        self._lose("stopped")
        return _defer.succeed(None)

    def crash(self) -> None:
        """Freeze like a killed process: the queue vanishes, nothing is told to
        the receiver, later publishes are silently dropped."""
        self.crashed = True
        self._drop_queue()

    def hang(self) -> None:
        """Stop like a SIGSTOPped process: the queue stays bound (messages to
        it are routed, not returned) but nothing reaches the receiver and
        publishes are silently dropped, until ``resume``."""
        self.hung = True

    def resume(self) -> None:
        """SIGCONT: what the queue held is delivered, publishing works again."""
        self.hung = False
        held, self.held = self.held, []
        for body, properties in held:
            if self.connected and self.receiver is not None:
                self.receiver.message_received(body, properties)

    def drop_connection(self) -> None:
        """Only this transport's connection breaks; it reconnects like ClientService."""
        self._lose("connection lost")
        if self.running and self.network.running:
            self._schedule_connect(self.network.reconnect_delay)

    def publish(
        self, kind: str, key: str, body: bytes, properties: dict[str, str], mandatory: bool = False
    ) -> _defer.Deferred:
        if not isinstance(body, bytes):
            raise TypeError("AMQP body must be bytes, got %r" % type(body))
        body.decode("ascii")  # raises: txAMQP 0.8.2 would corrupt non-ASCII
        for name, value in properties.items():
            if name not in AMQP_PROPERTIES:
                raise ValueError("unknown AMQP property %r (names are hyphenated)" % name)
            if not isinstance(value, str) or not value.isascii():
                raise ValueError("AMQP property %s must be an ASCII str: %r" % (name, value))
        if not key.isascii() and kind != _srs.DIRECT:
            raise ValueError("AMQP key must be ASCII: %r" % key)
        if self.crashed or self.hung:
            return _defer.succeed(None)
        if not self.connected:
            return _defer.fail(_Unavailable("not connected to the broker"))
        direct, fanout = _srs.exchange_names(self.cluster)
        if kind == _srs.DIRECT:
            routed = self.network.route(direct, _srs.routing_key(key), body, properties)
        elif kind == _srs.FANOUT:
            routed = self.network.route(fanout, "", body, properties)
        elif kind == _srs.REPLY:
            routed = self.network.route("", key, body, properties)
        else:
            raise ValueError("unknown publish kind %r" % kind)
        if mandatory and not routed:
            # As basic.return: the broker hands an unroutable message back.
            self.network.clock.callLater(self.network.latency, self._returned, body, dict(properties))
        return _defer.succeed(None)

    def _returned(self, body: bytes, properties: dict) -> None:
        if self.connected:
            self.receiver.message_returned(body, properties)

    def _schedule_connect(self, delay: float) -> None:
        if self._pending_connect is not None and self._pending_connect.active():
            return
        self._pending_connect = self.network.clock.callLater(delay, self._connect)

    def _connect(self) -> None:
        if not self.running or not self.network.running or self.crashed or self.connected:
            return
        direct, fanout = _srs.exchange_names(self.cluster)
        self.network.declare(direct, "direct")
        self.network.declare(fanout, "fanout")
        queue = _srs.private_queue_name(self.cluster, self.agent_id, self.network._new_queue_nonce())
        self.network.queues[queue] = self
        self.network.exchanges[direct][1].add((queue, _srs.routing_key(self.agent_id)))
        self.network.exchanges[fanout][1].add((queue, ""))
        self.reply_queue = queue
        self.receiver.transport_connected(queue)

    def _drop_queue(self) -> None:
        queue, self.reply_queue = self.reply_queue, None
        if queue is None:
            return
        self.network.queues.pop(queue, None)
        for _kind, bindings in self.network.exchanges.values():
            bindings.difference_update({b for b in bindings if b[0] == queue})

    def _lose(self, why: str) -> None:
        was_connected = self.connected
        self._drop_queue()
        if was_connected and not self.crashed:
            self.receiver.transport_disconnected(_Failure(_Unavailable(why)))


# --- Supervisor: fake process spawner, control and process table (owner: supervisor) ---
# FakeSpawner stands in for IReactorProcess.spawnProcess and lets the test
# end processes; FakeControl has scs.control.CeleryControl's interface over
# an in-memory set of Celery nodes; FakeProcessTable stands in for
# scs.leftovers.ProcessTable (pid files of workers left by a crashed agent).

_SIGNUMS = {"TERM": 15, "KILL": 9, "INT": 2, "STOP": 19, "CONT": 18, "HUP": 1}


class FakeProcess:
    """The transport a FakeSpawner gives a ProcessProtocol."""

    def __init__(
        self,
        spawner: "FakeSpawner",
        protocol: _Any,
        pid: int,
        executable: str,
        args: list,
        env: _Any,
        path: _Any,
        childFDs: _Any,
    ) -> None:
        self.spawner = spawner
        self.proto = protocol
        self.pid: int | None = pid
        self.executable = executable
        self.args = list(args)
        self.env = env
        self.path = path
        self.childFDs = childFDs
        self.signals: list = []
        self.ended = False

    def signalProcess(self, sig: _Any) -> None:
        if self.ended:
            raise _ProcessExitedAlready()
        self.signals.append(sig)
        if sig == "KILL" or (sig in ("TERM", "INT") and not self.spawner.ignore_term):
            self.spawner._schedule(self.exit, None, _SIGNUMS.get(sig, 15))

    def exit(self, code: int | None = 0, signal: int | None = None) -> None:
        """The process ends with exit ``code`` or by ``signal``."""
        if self.ended:
            return
        self.ended = True
        self.pid = None
        if signal is None and code == 0:
            reason = _Failure(_ProcessDone(0))
        else:
            reason = _Failure(_ProcessTerminated(exitCode=code if signal is None else None, signal=signal))
        self.proto.processEnded(reason)

    def loseConnection(self) -> None:
        pass

    def closeStdin(self) -> None:
        pass


class FakeSpawner:
    """Records spawnProcess calls.  ``processes`` lists every FakeProcess;
    ``alive`` the ones not ended.  TERM/INT/KILL end a process (after
    ``exit_delay`` on ``clock`` when given, else at once) unless
    ``ignore_term`` is set, which makes only KILL work, like a hung worker.
    ``fail`` makes spawnProcess raise OSError."""

    def __init__(self, clock: _Any = None, exit_delay: float = 0.0) -> None:
        self.clock = clock
        self.exit_delay = exit_delay
        self.processes: list[FakeProcess] = []
        self.ignore_term = False
        self.fail = False
        self._next_pid = 1000

    def spawnProcess(
        self,
        processProtocol: _Any,
        executable: str,
        args: _Any = (),
        env: _Any = None,
        path: _Any = None,
        uid: _Any = None,
        gid: _Any = None,
        usePTY: bool = False,
        childFDs: _Any = None,
    ) -> FakeProcess:
        if self.fail:
            raise OSError("fake spawn failure")
        self._next_pid += 1
        p = FakeProcess(self, processProtocol, self._next_pid, executable, args, env, path, childFDs)
        self.processes.append(p)
        processProtocol.makeConnection(p)
        return p

    @property
    def alive(self) -> list[FakeProcess]:
        return [p for p in self.processes if not p.ended]

    def _schedule(self, f: _Any, *args: _Any) -> None:
        if self.clock is None:
            f(*args)
        else:
            self.clock.callLater(self.exit_delay, f, *args)


class FakeControl:
    """scs.control.CeleryControl's interface over in-memory nodes.

    ``nodes`` maps a node name to ``{"queues": [...], "autoscaler": {...},
    "responsive": bool}``; ``up(node, ...)`` adds one.  ``broker_up = False``
    makes every call fail with Unavailable (and broker_alive answer False).
    With a ``clock``, a ping that misses a node takes its whole ``timeout``
    on that clock, as Celery's does.  ``paused = True`` holds every call's
    Deferred in ``held`` until ``release()``.  ``calls`` records
    ``(method, broker_url, args...)``.  ``broker_queues`` holds the broker's
    queues for ``queue_stats``, ``queue_purge`` and ``queue_delete``.
    """

    def __init__(self, clock: _Any = None) -> None:
        self.clock = clock
        self.nodes: dict[str, dict] = {}
        self.broker_up = True
        self.calls: list[tuple] = []
        self.paused = False
        self.held: list[tuple[_defer.Deferred, _Any]] = []
        self.closed = False
        # The broker's queues: name -> {"messages": n, "consumers": n}.
        self.broker_queues: dict[str, dict[str, int]] = {}

    def up(self, node: str, queues: _Any = (), max: int = 1, min: int = 1) -> dict:
        n = {
            "queues": list(queues),
            "autoscaler": {"max": max, "min": min, "current": min, "qty": 0},
            "responsive": True,
        }
        self.nodes[node] = n
        return n

    def down(self, node: str) -> None:
        self.nodes.pop(node, None)

    def _answering(self, nodes: _Any) -> list[str]:
        return [n for n in nodes if n in self.nodes and self.nodes[n]["responsive"]]

    def _result(self, compute: _Any, delay: float = 0.0) -> _defer.Deferred:
        d: _defer.Deferred = _defer.Deferred()

        def run() -> None:
            if not self.broker_up:
                d.errback(_Failure(_Unavailable("broker unavailable (fake)")))
                return
            try:
                value = compute()
            except Exception:  # noqa: BLE001 - the fake hands any failure to the caller, as Celery's would
                d.errback(_Failure())
            else:
                d.callback(value)

        def go() -> None:
            if self.clock is not None and delay > 0:
                self.clock.callLater(delay, run)
            else:
                run()

        if self.paused:
            self.held.append((d, go))
        else:
            go()
        return d

    def release(self, keep_paused: bool = False) -> None:
        """Run the held calls; with ``keep_paused`` the calls they lead to are held in turn."""
        self.paused = keep_paused
        held, self.held = self.held, []
        for _d, go in held:
            go()

    def ping(self, broker_url: str, nodes: _Any, timeout: float) -> _defer.Deferred:
        nodes = list(nodes)
        self.calls.append(("ping", broker_url, nodes, timeout))
        answering = self._answering(nodes)
        delay = timeout if len(answering) < len(nodes) else 0.0
        return self._result(lambda: set(self._answering(nodes)), delay)

    def active_queues(self, broker_url: str, nodes: _Any, timeout: float) -> _defer.Deferred:
        nodes = list(nodes)
        self.calls.append(("active_queues", broker_url, nodes, timeout))
        return self._result(lambda: {n: list(self.nodes[n]["queues"]) for n in self._answering(nodes)})

    def stats(self, broker_url: str, nodes: _Any, timeout: float) -> _defer.Deferred:
        nodes = list(nodes)
        self.calls.append(("stats", broker_url, nodes, timeout))
        return self._result(
            lambda: {n: {"autoscaler": dict(self.nodes[n]["autoscaler"]), "pid": 1} for n in self._answering(nodes)}
        )

    def active(self, broker_url: str, nodes: _Any, timeout: float) -> _defer.Deferred:
        """The tasks each answering node runs: its ``"active"`` list (none by default)."""
        nodes = list(nodes)
        self.calls.append(("active", broker_url, nodes, timeout))
        return self._result(lambda: {n: list(self.nodes[n].get("active", ())) for n in self._answering(nodes)})

    def _one(self, node: str, change: _Any) -> _defer.Deferred:
        def compute() -> str:
            if not self._answering([node]):
                from scs.errors import GatewayTimeout

                raise GatewayTimeout("%s did not answer" % node)
            return change(self.nodes[node])

        return self._result(compute)

    def add_consumer(
        self,
        broker_url: str,
        node: str,
        queue: str,
        *,
        exchange: _Any = None,
        routing_key: _Any = None,
        exchange_type: _Any = None,
        timeout: float = 1.0,
    ) -> _defer.Deferred:
        self.calls.append(("add_consumer", broker_url, node, queue, exchange, routing_key, exchange_type))

        def change(n: dict) -> str:
            if queue not in n["queues"]:
                n["queues"].append(queue)
            return "add consumer %s" % queue

        return self._one(node, change)

    def cancel_consumer(self, broker_url: str, node: str, queue: str, *, timeout: float = 1.0) -> _defer.Deferred:
        self.calls.append(("cancel_consumer", broker_url, node, queue))

        def change(n: dict) -> str:
            if queue in n["queues"]:
                n["queues"].remove(queue)
            return "no longer consuming from %s" % queue

        return self._one(node, change)

    def autoscale(self, broker_url: str, node: str, max: int, min: int, *, timeout: float = 1.0) -> _defer.Deferred:
        self.calls.append(("autoscale", broker_url, node, max, min))

        def change(n: dict) -> str:
            n["autoscaler"].update(max=max, min=min)
            return "autoscale now max=%d min=%d" % (max, min)

        return self._one(node, change)

    def warm(self, broker_url: str) -> _defer.Deferred:
        self.calls.append(("warm", broker_url))
        return _defer.succeed(None)

    def broker_alive(self, broker_url: str, timeout: float = 1.0) -> _defer.Deferred:
        self.calls.append(("broker_alive", broker_url))
        return _defer.succeed(self.broker_up)

    def queue_stats(self, broker_url: str, queue: str, timeout: float = 1.0) -> _defer.Deferred:
        self.calls.append(("queue_stats", broker_url, queue, timeout))
        return self._result(lambda: dict(self.broker_queues[queue]) if queue in self.broker_queues else None)

    def queue_purge(self, broker_url: str, queue: str, timeout: float = 1.0) -> _defer.Deferred:
        self.calls.append(("queue_purge", broker_url, queue, timeout))

        def compute() -> int | None:
            q = self.broker_queues.get(queue)
            if q is None:
                return None
            purged, q["messages"] = q["messages"], 0
            return purged

        return self._result(compute)

    def queue_delete(self, broker_url: str, queue: str, timeout: float = 1.0) -> _defer.Deferred:
        self.calls.append(("queue_delete", broker_url, queue, timeout))

        def compute() -> int | None:
            q = self.broker_queues.pop(queue, None)
            return None if q is None else q["messages"]

        return self._result(compute)

    def close(self) -> None:
        self.closed = True

    def count(self, method: str) -> int:
        return sum(1 for c in self.calls if c[0] == method)


class FakeProcessTable:
    """scs.leftovers.ProcessTable over a dict ``{pid: argv}``.  ``kill`` records
    the signal; a process leaves the table on KILL, and on TERM unless its
    pid is in ``ignore_term``."""

    def __init__(self, processes: dict | None = None) -> None:
        self.processes: dict[int, list[str]] = dict(processes or {})
        self.ignore_term: set[int] = set()
        self.killed: list[tuple[int, int]] = []
        self.pidfiles: dict[str, int] = {}

    def cmdline(self, pid: int) -> list[str] | None:
        return self.processes.get(pid)

    def pids(self) -> list[int]:
        return sorted(self.processes)

    def kill(self, pid: int, sig: int) -> None:
        self.killed.append((pid, sig))
        if sig == 9 or (sig == 15 and pid not in self.ignore_term):
            self.processes.pop(pid, None)

    def read_pidfile(self, path: str) -> int | None:
        if path in self.pidfiles:
            return self.pidfiles[path]
        try:
            with open(path, encoding="ascii") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None
