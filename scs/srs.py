"""SRS: the agents' protocol (membership, requests, scatter-gather).

This module knows the messages and the bookkeeping, not the wire: it talks to
an ``ISRSTransport`` (``scs.amqp.AMQPTransport`` on a real broker,
``scs.testing.FakeTransport`` in tests).

Topology (declared by the transport, named by ``exchange_names`` and
``routing_key`` below so that every transport agrees):

* a direct exchange ``scs.<cluster>.direct``: each agent's private queue is
  bound under ``routing_key(agent_id)``; requests to one agent go there;
* a fanout exchange ``scs.<cluster>.fanout``: every private queue is bound;
  heartbeats, scatter requests and broadcasts go there;
* replies go through the default exchange straight to the asker's private
  queue (``reply-to``), matched by ``correlation-id``.

Every body is ASCII-only JSON (txAMQP 0.8.2 counts ``str`` lengths in
characters, so non-ASCII text travels as ``\\u`` escapes), sealed and
opened by ``scs.srs_trust.MessageCodec``: a signed routing header (type,
sender, incarnation, ``to``, timestamp, nonce, and for requests and replies
the correlation id and reply queue) around a payload::

    heartbeat: "url", "interval", "summary": {"instances": N}, "hello": bool,
               "token": bool (the agent requires an HTTP token)
    bye:       {}
    request:   "op", "args"
    reply:     "ok": true, "result": ...
               "ok": false, "error": {"code": ..., "body": {...}}

With a cluster secret every message is signed, fresh and used once, and its
payload is encrypted; without one anyone on the broker is a member.  Either
way every field is checked before it is used, and what is dropped is
counted by reason (``rejected``).

Membership comes only from heartbeats, bounded by ``max_peers``; a member
silent for ``forget_after`` seconds leaves the table; a ``bye`` counts only
from the member's current incarnation.  A reply is taken only from the
agent that was asked, addressed to us, for the request it names.  An agent
that requires a token accepts requests only from peers that require one.

Choices the contract left open:

* Liveness: a peer is alive while we are connected, it has not said ``bye``
  and it was heard from (any message) within 3 of its heartbeat periods.
  When our broker connection drops, every other member turns not-alive at
  once: we can no longer reach anyone, so believing them alive would only
  make callers wait.
* ``scatter`` while not connected fires at once with ``({}, missing)`` where
  ``missing`` names the peers that were alive when the connection dropped
  (the ones a listing would have asked), so the listing can name them in
  its missing-agents header; callers may also check ``is_connected()``.
* ``connected_callbacks`` run ``discovery_delay`` seconds (default a
  quarter heartbeat period) after each connection, not at once: our first
  heartbeat asks peers to answer with theirs, and a callback that scatters
  (fetching the apps of the cluster) must find them in the table.
* ``call`` to this agent's own id runs the handler directly (no broker
  round trip, works while disconnected); the result is still passed through
  JSON so that local and remote answers look the same.
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable, Optional
from urllib.parse import quote

import attr
from twisted.application.service import IService, MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from scs.errors import BadParameter, GatewayTimeout, SCSError, Unauthorized, Unavailable, error_from_json
from scs.srs_trust import Message, MessageCodec, Rejected
from scs.validation import check_name

# Publish kinds understood by every transport.
DIRECT = "direct"  # key: the target agent id (the transport applies routing_key)
FANOUT = "fanout"  # key ignored: every agent of the cluster
REPLY = "reply"  # key: the asker's private queue name, from its reply-to

# A peer silent for this many of its heartbeat periods is dead.
DEAD_AFTER_PERIODS = 3
# Bounds on the period a peer announces, so that one misconfigured (or
# hostile) peer cannot make itself immortal or flap.
MIN_PERIOD, MAX_PERIOD = 0.05, 60.0
# Default bound on the membership table (other agents).
DEFAULT_MAX_PEERS = 256
# Default time a silent member stays listed (dead) before it is forgotten.
DEFAULT_FORGET_AFTER = 24 * 3600.0
# Distinct oddities logged (once each) before the rest are only counted.
MAX_LOGGED_ODDITIES = 1000
# A heartbeat is small: anything larger is not one.
MAX_HEARTBEAT_URL = 512
MAX_HEARTBEAT_BYTES = 8 * 1024


def _ascii_name(text: str) -> str:
    """Injective ASCII form of ``text`` for AMQP names (shortstr must be ASCII)."""
    return quote(text, safe="")


def exchange_names(cluster: str) -> tuple[str, str]:
    """(direct, fanout) exchange names of a cluster; two clusters never share one."""
    name = _ascii_name(cluster)
    return f"scs.{name}.direct", f"scs.{name}.fanout"


def routing_key(agent_id: str) -> str:
    """The direct-exchange routing key of an agent (ASCII even for non-ASCII ids)."""
    return _ascii_name(agent_id)


def private_queue_name(cluster: str, agent_id: str, nonce: str) -> str:
    """Name of an agent's private queue; the nonce keeps a restarted agent's
    queue distinct from the old one the broker may not have dropped yet."""
    return f"scs.{_ascii_name(cluster)}.agent.{routing_key(agent_id)}.{nonce}"


def encode_message(message: dict[str, Any]) -> bytes:
    """Bytes of ASCII-only JSON, the only body txAMQP 0.8.2 carries intact."""
    return json.dumps(message, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class ITransportReceiver(Interface):
    """What a transport calls back (SRS implements it)."""

    def transport_connected(reply_queue: str) -> None:
        """Connected, queue bound and consuming; ``reply_queue`` is our private queue."""

    def transport_disconnected(reason: Optional[Failure]) -> None:
        """The connection is gone; the transport reconnects by itself."""

    def message_received(body: bytes, properties: dict[str, str]) -> None:
        """One message from the private queue; properties use hyphenated names."""

    def message_returned(body: bytes, properties: dict[str, str]) -> None:
        """A mandatory message we published could not be routed to any queue."""


class ISRSTransport(IService):
    """The wire under SRS: a service that keeps one broker connection."""

    reply_queue = Attribute("Name of the private queue while connected, else None.")

    def attach(agent_id: str, cluster: str, receiver: ITransportReceiver) -> None:
        """Set identity and receiver; called once, before the service starts."""

    def publish(kind: str, key: str, body: bytes, properties: dict[str, str], mandatory: bool = False) -> Deferred:
        """Send ``body``; ``kind`` is DIRECT, FANOUT or REPLY. Fails with
        ``scs.errors.Unavailable`` when not connected. A ``mandatory`` message
        that reaches no queue comes back through ``message_returned``."""


@attr.s(auto_attribs=True)
class _Member:
    id: str
    url: str = ""
    interval: float = 2.0
    last_seen: Optional[float] = None
    summary: dict[str, Any] = attr.Factory(dict)
    left: bool = False
    # When it last failed to answer one of our scatters; until we hear from
    # it again, later scatters do not wait for it (it is reported missing at
    # once), so a crashed peer costs one scatter timeout, not one per
    # listing until it is declared dead.
    silent_since: Optional[float] = None
    # Last liveness we logged, so that transitions are logged once.
    reported_alive: bool = False
    # The run of the agent that sent the last heartbeat: a "bye" from any
    # other run (an old one replayed, or a forgery) does not count.
    incarnation: str = ""
    # It requires a bearer token on its HTTP API (one trust domain).
    requires_token: bool = False


@attr.s(auto_attribs=True)
class _PendingCall:
    deferred: Deferred
    agent_id: str
    op: str
    timer: Any


@attr.s(auto_attribs=True)
class _PendingScatter:
    deferred: Deferred
    op: str
    expected: set[str]
    timer: Any
    results: dict[str, Any] = attr.Factory(dict)
    # Peers not waited for (suspects), reported missing unless they answer.
    skipped: list[str] = attr.Factory(list)


def _default_handler(op: str, args: dict[str, Any]) -> Any:
    raise Unavailable("this agent does not serve SRS requests yet", op=op)


class SRS(MultiService):
    """One agent's membership in the cluster and its requests to peers."""

    log = Logger()

    def __init__(
        self,
        agent_id: str,
        *,
        cluster: str = "scs",
        url: str = "",
        transport: Optional[ISRSTransport] = None,
        broker_url: str = "amqp://guest:guest@127.0.0.1:5672//",
        spec_path: Optional[str] = None,
        heartbeat_interval: float = 2.0,
        reactor: Optional[IReactorTime] = None,
        summary: Callable[[], dict] = lambda: {},
        rng: Optional[random.Random] = None,
        discovery_delay: Optional[float] = None,
        codec: Optional[MessageCodec] = None,
        requires_token: bool = False,
        max_peers: int = DEFAULT_MAX_PEERS,
        forget_after: float = DEFAULT_FORGET_AFTER,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.agent_id = agent_id
        self.cluster = cluster
        self.url = url
        self.heartbeat_interval = heartbeat_interval
        self.discovery_delay = heartbeat_interval / 4 if discovery_delay is None else discovery_delay
        self.summary = summary
        self.handler: Callable[[str, dict], Any] = _default_handler
        self.connected_callbacks: list[Callable[[], Any]] = []
        self._reactor = reactor
        self._rng = rng if rng is not None else random.Random()
        self.codec = codec if codec is not None else MessageCodec(cluster, clock=reactor.seconds)
        self.requires_token = requires_token
        self.max_peers = max_peers
        self.forget_after = forget_after
        if transport is None:
            from scs.amqp import AMQPTransport

            transport = AMQPTransport(broker_url, spec_path=spec_path, reactor=reactor, rng=self._rng)
        self.transport = transport
        transport.attach(agent_id, cluster, self)
        self.addService(transport)

        self._incarnation = self._new_id()[:16]
        self._connected = False
        # Peers alive when the connection last dropped: who a scatter misses meanwhile.
        self._alive_when_lost: list[str] = []
        self._reply_queue: Optional[str] = None
        self._last_connected: Optional[float] = None
        self._members: dict[str, _Member] = {}
        self._calls: dict[str, _PendingCall] = {}
        self._scatters: dict[str, _PendingScatter] = {}
        self._ignored_logged: set[tuple[str, str, str]] = set()
        self._beat = LoopingCall(self._heartbeat_tick)
        self._beat.clock = reactor
        self._discovery: Any = None

    # -- service -----------------------------------------------------------

    def stopService(self) -> Deferred:
        """Say bye (so peers drop us at once), fail what is pending, disconnect."""
        if self._beat.running:
            self._beat.stop()
        self._cancel_discovery()
        d: Deferred = defer.succeed(None)
        if self._connected:
            d = self._send(FANOUT, "*", "bye", {})
            d.addErrback(lambda _: None)
        self._fail_pending("this agent is stopping")
        d.addCallback(lambda _: MultiService.stopService(self))
        return d

    # -- public API --------------------------------------------------------

    def is_connected(self) -> bool:
        return self._connected

    def rejected_counts(self) -> dict[str, int]:
        """Messages dropped so far, by reason (``scs.srs_trust.REASONS``)."""
        return dict(self.codec.rejected)

    def members(self) -> list[dict[str, Any]]:
        """The membership table, this agent included, sorted by id."""
        now = self._reactor.seconds()
        rows = [
            {
                "id": self.agent_id,
                "url": self.url,
                "alive": self._connected,
                "last_seen": now if self._connected else self._last_connected,
                "instances": _instances(self._safe_summary()),
                "requires_token": self.requires_token,
            }
        ]
        for m in self._members.values():
            rows.append(
                {
                    "id": m.id,
                    "url": m.url,
                    "alive": self._alive(m, now),
                    "last_seen": m.last_seen,
                    "instances": _instances(m.summary),
                    "requires_token": m.requires_token,
                }
            )
        rows.sort(key=lambda row: row["id"])
        return rows

    def live_agents(self) -> list[str]:
        """Ids believed alive that accept our requests, self included (even
        while disconnected: the local agent can always serve its own)."""
        now = self._reactor.seconds()
        ids = [m.id for m in self._members.values() if self._alive(m, now) and self._accepts_us(m)]
        ids.append(self.agent_id)
        return sorted(ids)

    def call(self, agent_id: str, op: str, args: dict, timeout: float = 5.0) -> Deferred:
        """Run ``op`` on one agent; its SCSError is re-raised here as the same class."""
        if agent_id == self.agent_id:
            return self._run_local(op, args)
        if not self._connected or self._reply_queue is None:
            return defer.fail(Unavailable("not connected to the cluster broker", agent=agent_id, op=op))
        correlation_id = self._new_id()
        d = Deferred(lambda _: self._forget_call(correlation_id))
        timer = self._reactor.callLater(timeout, self._call_timed_out, correlation_id)
        self._calls[correlation_id] = _PendingCall(d, agent_id, op, timer)
        # Mandatory: when the agent has no queue (crashed, not yet detected)
        # the broker returns the request at once and we fail fast instead of
        # waiting out the timeout.
        sent = self._send(
            DIRECT,
            agent_id,
            "request",
            {"op": op, "args": args},
            cid=correlation_id,
            reply_to=self._reply_queue,
            mandatory=True,
        )
        sent.addErrback(self._call_send_failed, correlation_id)
        return d

    def scatter(self, op: str, args: dict, timeout: float = 2.0) -> Deferred:
        """Ask every other live agent; fires ``({id: result or SCSError}, missing)``.

        Fires as soon as every peer believed alive at the start answered, or
        at ``timeout`` naming the silent ones. Answers from agents we did not
        wait for (just joined) are kept if they arrive in time.
        """
        now = self._reactor.seconds()
        if not self._connected or self._reply_queue is None:
            missing = list(self._alive_when_lost)
            return defer.succeed(({}, missing))
        live = [m for m in self._members.values() if self._alive(m, now) and self._accepts_us(m)]
        suspects = sorted(m.id for m in live if self._suspect(m))
        expected = {m.id for m in live} - set(suspects)
        if not expected:
            return defer.succeed(({}, suspects))
        correlation_id = self._new_id()
        d = Deferred(lambda _: self._forget_scatter(correlation_id))
        timer = self._reactor.callLater(timeout, self._finish_scatter, correlation_id)
        self._scatters[correlation_id] = _PendingScatter(d, op, expected, timer, skipped=suspects)
        sent = self._send(
            FANOUT, "*", "request", {"op": op, "args": args}, cid=correlation_id, reply_to=self._reply_queue
        )
        # A failed publish means nobody will answer: give up now, not at the timeout.
        sent.addErrback(lambda _: self._finish_scatter(correlation_id))
        return d

    def broadcast(self, op: str, args: dict) -> None:
        """Fire and forget to every other agent; dropped (logged) when disconnected."""
        if not self._connected:
            self.log.warn("SRS broadcast {op} dropped: not connected", op=op, event="srs.broadcast.dropped")
            return
        self._send(FANOUT, "*", "request", {"op": op, "args": args})

    # -- ITransportReceiver ------------------------------------------------

    def transport_connected(self, reply_queue: str) -> None:
        self._connected = True
        self._reply_queue = reply_queue
        self._last_connected = self._reactor.seconds()
        self.log.info(
            "SRS {agent_id} connected to cluster {cluster}",
            agent_id=self.agent_id,
            cluster=self.cluster,
            event="srs.connected",
        )
        self._send_heartbeat(hello=True)
        if not self._beat.running:
            self._beat.start(self.heartbeat_interval, now=False)
        self._cancel_discovery()
        self._discovery = self._reactor.callLater(self.discovery_delay, self._run_connected_callbacks)

    def _run_connected_callbacks(self) -> None:
        self._discovery = None
        for callback in list(self.connected_callbacks):
            d = defer.maybeDeferred(callback)
            d.addErrback(lambda f: self.log.failure("SRS connected callback failed", f))

    def _cancel_discovery(self) -> None:
        if self._discovery is not None and self._discovery.active():
            self._discovery.cancel()
        self._discovery = None

    def transport_disconnected(self, reason: Optional[Failure]) -> None:
        if not self._connected:
            return
        self._alive_when_lost = [agent for agent in self.live_agents() if agent != self.agent_id]
        self._connected = False
        self._reply_queue = None
        self._last_connected = self._reactor.seconds()
        if self._beat.running:
            self._beat.stop()
        self._cancel_discovery()
        self.log.emit(
            LogLevel.warn if self.running else LogLevel.info,
            "SRS {agent_id} disconnected from the broker: {reason}",
            agent_id=self.agent_id,
            reason=reason.getErrorMessage() if reason is not None else "closed",
            event="srs.disconnected",
        )
        self._fail_pending("lost the connection to the cluster broker")
        self._log_transitions()

    def message_received(self, body: bytes, properties: dict[str, str]) -> None:
        try:
            message = self.codec.open(body, me=self.agent_id)
            check_name(message.sender, "sender")
        except Rejected as e:
            self._rejected(e)
            return
        except BadParameter:
            self._rejected(Rejected("malformed", "sender is not an agent id"), counted=False)
            return
        if message.sender == self.agent_id:
            if message.incarnation != self._incarnation:
                self._log_once(
                    ("duplicate", message.sender, message.incarnation[:32]),
                    "SRS: another agent uses our id {sender}",
                    sender=message.sender,
                )
            return
        if message.type in ("heartbeat", "bye") and len(body) > MAX_HEARTBEAT_BYTES:
            self._rejected(Rejected("oversized", f"{message.type} of {len(body)} bytes", message.sender), counted=False)
            return
        if message.type == "heartbeat":
            self._on_heartbeat(message)
        elif message.type == "bye":
            self._on_bye(message)
        elif message.type == "request":
            self._on_request(message)
        elif message.type == "reply":
            self._on_reply(message)
        else:
            self._rejected(Rejected("malformed", "unknown type %r" % message.type[:32], message.sender))

    def _rejected(self, rejection: Rejected, counted: bool = True) -> None:
        """Drop a message: counted by reason, logged once per reason and sender."""
        if not counted:
            self.codec.count(rejection.reason)
        self._log_once(
            ("rejected", rejection.reason, str(rejection.sender)[:64]),
            "SRS dropped a message ({reason}) from {sender}: {detail}",
            reason=rejection.reason,
            sender=rejection.sender,
            detail=rejection.detail,
            log_event="srs.rejected",
        )

    def message_returned(self, body: bytes, properties: dict[str, str]) -> None:
        pending = self._calls.pop(properties.get("correlation-id", ""), None)
        if pending is None:
            return
        if pending.timer.active():
            pending.timer.cancel()
        self.log.info(
            "SRS request {op} to {member} returned: no such agent connected",
            op=pending.op,
            member=pending.agent_id,
            event="srs.call.unroutable",
        )
        # The broker just told us it has no queue: it is gone now, not in
        # three periods (its next heartbeat, if any, brings it back).
        self._peer_left(pending.agent_id)
        pending.deferred.errback(Unavailable("agent %s is not connected to the cluster" % pending.agent_id, agent=pending.agent_id))

    # -- receiving ---------------------------------------------------------

    def _on_heartbeat(self, message: Message) -> None:
        payload = message.payload
        url, interval, summary = payload.get("url"), payload.get("interval"), payload.get("summary")
        if (
            not isinstance(url, str)
            or len(url) > MAX_HEARTBEAT_URL
            or not (url == "" or url.startswith(("http://", "https://")))
            or not url.isprintable()
            or isinstance(interval, bool)
            or not isinstance(interval, (int, float))
            or interval != interval
            or not isinstance(summary, dict)
        ):
            self._rejected(Rejected("malformed", "bad heartbeat", message.sender), counted=False)
            return
        member = self._members.get(message.sender)
        if member is None:
            member = self._admit(message.sender)
            if member is None:
                return
        member.last_seen = self._reactor.seconds()
        member.left = False
        member.incarnation = message.incarnation
        member.url = url
        member.interval = min(max(float(interval), MIN_PERIOD), MAX_PERIOD)
        # Only the fields we use, type-checked: a peer cannot park data here.
        member.summary = {"instances": _instances(summary)}
        member.requires_token = payload.get("token") is True
        self._log_transitions()
        if payload.get("hello") is True:
            # A newcomer should not wait a whole period to learn about us.
            self._send_heartbeat(to=member.id)

    def _admit(self, sender: str) -> Optional[_Member]:
        """A new member, unless the table is full of live ones."""
        if len(self._members) >= self.max_peers:
            now = self._reactor.seconds()
            dead = [m for m in self._members.values() if not self._heard_recently(m, now)]
            if not dead:
                self._rejected(Rejected("not-a-member", "membership table is full", sender), counted=False)
                return None
            oldest = min(dead, key=lambda m: m.last_seen or 0.0)
            del self._members[oldest.id]
        member = self._members[sender] = _Member(sender, interval=self.heartbeat_interval)
        return member

    def _on_bye(self, message: Message) -> None:
        member = self._members.get(message.sender)
        if member is None or member.incarnation != message.incarnation:
            # A replayed bye of an earlier run, or one from a stranger.
            self._rejected(Rejected("not-a-member", "bye from another incarnation", message.sender), counted=False)
            return
        self._peer_left(message.sender)

    def _on_request(self, message: Message) -> None:
        payload = message.payload
        op, args = payload.get("op"), payload.get("args")
        reply_to, correlation_id = message.reply_to, message.cid
        if reply_to is not None and not reply_to.startswith(
            private_queue_name(self.cluster, message.sender, "")
        ):
            # Replies go only to the asker's own private queue.
            self._rejected(Rejected("misrouted", "reply-to is not the sender's queue", message.sender), counted=False)
            return
        self._touch(message.sender)
        if not self._trusts(message.sender):
            self._log_once(
                ("untrusted", message.sender, ""),
                "SRS refuses requests from {sender}: this agent requires a token and {sender} does not",
                sender=message.sender,
            )
            self.codec.count("untrusted-peer")
            d: Deferred = defer.fail(
                Unauthorized("agent %s accepts cluster operations only from agents that require a token" % self.agent_id)
            )
        elif not isinstance(op, str) or not isinstance(args, dict):
            d = defer.fail(BadParameter("malformed SRS request"))
        else:
            d = defer.maybeDeferred(self.handler, op, args)
        if reply_to and correlation_id:
            d.addCallbacks(self._ok_reply, self._error_reply, errbackArgs=(op,))
            d.addCallback(self._send_reply, message.sender, reply_to, correlation_id)
            d.addErrback(lambda f: self.log.failure("SRS could not reply to {op}", f, op=op))
        else:
            d.addErrback(self._log_broadcast_failure, op)

    def _trusts(self, sender: str) -> bool:
        """Whether we run requests from ``sender`` (one trust domain)."""
        if not self.requires_token:
            return True
        member = self._members.get(sender)
        return member is not None and member.requires_token

    def _accepts_us(self, member: _Member) -> bool:
        """Whether ``member`` runs our requests (the mirror of ``_trusts``)."""
        return self.requires_token or not member.requires_token

    def _ok_reply(self, result: Any) -> dict[str, Any]:
        payload = {"ok": True, "result": result}
        try:
            encode_message(payload)
        except (TypeError, ValueError) as e:
            self.log.error("SRS handler result is not JSON: {error}", error=str(e))
            return {"ok": False, "error": {"code": SCSError.code, "body": {"error": "result is not JSON"}}}
        return payload

    def _error_reply(self, failure: Failure, op: Any) -> dict[str, Any]:
        if failure.check(SCSError):
            error: SCSError = failure.value
            body = error.to_json()
            code = error.code
        else:
            self.log.failure("SRS handler failed on {op}", failure, op=op)
            code, body = SCSError.code, {"error": "internal error on agent %s" % self.agent_id}
        payload = {"ok": False, "error": {"code": code, "body": body}}
        try:
            encode_message(payload)
        except (TypeError, ValueError):
            payload["error"]["body"] = {"error": str(body.get("error"))}
        return payload

    def _send_reply(self, payload: dict[str, Any], asker: str, reply_to: str, correlation_id: str) -> Deferred:
        return self._send(REPLY, reply_to, "reply", payload, to=asker, re=correlation_id)

    def _log_broadcast_failure(self, failure: Failure, op: Any) -> None:
        if failure.check(SCSError):
            self.log.warn("SRS broadcast {op} refused: {error}", op=op, error=failure.getErrorMessage())
        else:
            self.log.failure("SRS broadcast {op} failed", failure, op=op)

    def _on_reply(self, message: Message) -> None:
        sender, payload, correlation_id = message.sender, message.payload, message.re or ""
        if payload.get("ok") is True:
            outcome: Any = payload.get("result")
        else:
            error = payload.get("error")
            if not isinstance(error, dict):
                error = {}
            body = error.get("body")
            outcome = error_from_json(str(error.get("code", SCSError.code)), body if isinstance(body, dict) else {})
        pending_call = self._calls.get(correlation_id)
        if pending_call is not None and pending_call.agent_id == sender:
            del self._calls[correlation_id]
            self._touch(sender)
            if pending_call.timer.active():
                pending_call.timer.cancel()
            if isinstance(outcome, SCSError):
                pending_call.deferred.errback(outcome)
            else:
                pending_call.deferred.callback(outcome)
            return
        scatter = self._scatters.get(correlation_id)
        if scatter is not None and sender not in scatter.results:
            self._touch(sender)
            scatter.results[sender] = outcome
            if scatter.expected <= scatter.results.keys():
                self._finish_scatter(correlation_id)
            return
        # Late, duplicated, or from an agent that was not asked.
        self._rejected(Rejected("unexpected-reply", "", sender), counted=False)

    # -- membership --------------------------------------------------------

    @staticmethod
    def _suspect(member: _Member) -> bool:
        """Missed a scatter and has not been heard from since."""
        return member.silent_since is not None and (
            member.last_seen is None or member.last_seen <= member.silent_since
        )

    def _touch(self, sender: str) -> None:
        """A member was heard from (only heartbeats make new members)."""
        member = self._members.get(sender)
        if member is not None and not member.left:
            member.last_seen = self._reactor.seconds()

    def _peer_left(self, sender: str) -> None:
        member = self._members.get(sender)
        if member is not None:
            member.left = True
            self._log_transitions()

    def _heard_recently(self, member: _Member, now: float) -> bool:
        if member.last_seen is None or member.left:
            return False
        return now - member.last_seen <= DEAD_AFTER_PERIODS * member.interval

    def _alive(self, member: _Member, now: float) -> bool:
        return self._connected and self._heard_recently(member, now)

    def _log_transitions(self) -> None:
        now = self._reactor.seconds()
        for m in sorted(self._members.values(), key=lambda m: m.id):
            alive = self._alive(m, now)
            if alive == m.reported_alive:
                continue
            m.reported_alive = alive
            if alive:
                self.log.info(
                    "SRS member {member} is alive ({url})",
                    member=m.id,
                    url=m.url,
                    agent_id=self.agent_id,
                    event="srs.member.alive",
                )
            else:
                why = "gone" if m.left else ("disconnected" if not self._connected else "silent")
                self.log.warn(
                    "SRS member {member} is dead ({why})",
                    member=m.id,
                    why=why,
                    last_seen=m.last_seen,
                    agent_id=self.agent_id,
                    event="srs.member.dead",
                )

    def _heartbeat_tick(self) -> None:
        self._send_heartbeat()
        self._log_transitions()
        self._forget_long_dead()

    def _forget_long_dead(self) -> None:
        now = self._reactor.seconds()
        for m in list(self._members.values()):
            if now - (m.last_seen or 0.0) > self.forget_after:
                del self._members[m.id]
                self.log.info("SRS forgot member {member}, silent since {last_seen}", member=m.id, last_seen=m.last_seen, event="srs.member.forgotten")

    def _send_heartbeat(self, hello: bool = False, to: Optional[str] = None) -> None:
        payload = {
            "url": self.url,
            "interval": self.heartbeat_interval,
            "summary": self._safe_summary(),
            "hello": hello,
            "token": self.requires_token,
        }
        if to is None:
            self._send(FANOUT, "*", "heartbeat", payload)
        else:
            self._send(DIRECT, to, "heartbeat", payload)

    def _safe_summary(self) -> dict[str, Any]:
        try:
            summary = self.summary()
        except Exception:
            self.log.failure("SRS summary() failed")
            return {}
        return summary if isinstance(summary, dict) else {}

    # -- sending and pending requests --------------------------------------

    def _send(
        self,
        kind: str,
        key: str,
        message_type: str,
        payload: dict[str, Any],
        *,
        to: Optional[str] = None,
        cid: Optional[str] = None,
        reply_to: Optional[str] = None,
        re: Optional[str] = None,
        mandatory: bool = False,
    ) -> Deferred:
        """Seal and publish one message. ``to`` (the agent it is for, signed
        into it) defaults to ``key`` for DIRECT and everyone for FANOUT."""
        if to is None:
            to = key if kind == DIRECT else "*"
        properties = {}
        if reply_to is not None:
            properties["reply-to"] = reply_to
        if (cid or re) is not None:
            properties["correlation-id"] = cid or re
        try:
            body = self.codec.encode(
                message_type, self.agent_id, self._incarnation, to, payload, cid=cid, reply_to=reply_to, re=re
            )
            if mandatory:
                d = self.transport.publish(kind, key, body, properties, mandatory=True)
            else:
                d = self.transport.publish(kind, key, body, properties)
        except Exception:
            d = defer.fail()

        def failed(f: Failure) -> Failure:
            self.log.warn(
                "SRS could not send {type} ({kind}): {error}",
                type=message_type,
                kind=kind,
                error=f.getErrorMessage(),
                event="srs.send.failed",
            )
            return f

        d.addErrback(failed)
        return d

    def _new_id(self) -> str:
        return "%032x" % self._rng.getrandbits(128)

    def _run_local(self, op: str, args: dict) -> Deferred:
        d = defer.maybeDeferred(self.handler, op, args)

        def same_as_remote(result: Any) -> Any:
            return json.loads(encode_message({"r": result}))["r"]

        def wrap_unexpected(f: Failure) -> Failure:
            if f.check(SCSError):
                return f
            self.log.failure("SRS handler failed on {op}", f, op=op)
            return Failure(SCSError("internal error on agent %s" % self.agent_id))

        d.addCallbacks(same_as_remote, wrap_unexpected)
        return d

    def _call_timed_out(self, correlation_id: str) -> None:
        pending = self._calls.pop(correlation_id, None)
        if pending is not None:
            pending.deferred.errback(
                GatewayTimeout("agent %s did not answer %s in time" % (pending.agent_id, pending.op), agent=pending.agent_id)
            )

    def _call_send_failed(self, failure: Failure, correlation_id: str) -> None:
        pending = self._calls.pop(correlation_id, None)
        if pending is not None:
            if pending.timer.active():
                pending.timer.cancel()
            pending.deferred.errback(Unavailable("could not send to agent %s" % pending.agent_id, agent=pending.agent_id))

    def _forget_call(self, correlation_id: str) -> None:
        pending = self._calls.pop(correlation_id, None)
        if pending is not None and pending.timer.active():
            pending.timer.cancel()

    def _forget_scatter(self, correlation_id: str) -> None:
        pending = self._scatters.pop(correlation_id, None)
        if pending is not None and pending.timer.active():
            pending.timer.cancel()

    def _finish_scatter(self, correlation_id: str) -> None:
        pending = self._scatters.pop(correlation_id, None)
        if pending is None:
            return
        if pending.timer.active():
            pending.timer.cancel()
        silent = pending.expected - pending.results.keys()
        now = self._reactor.seconds()
        for agent_id in silent:
            member = self._members.get(agent_id)
            if member is not None:
                member.silent_since = now
        missing = sorted(silent | (set(pending.skipped) - pending.results.keys()))
        if missing:
            self.log.info("SRS scatter {op}: no answer from {missing}", op=pending.op, missing=missing, event="srs.scatter.missing")
        pending.deferred.callback((pending.results, missing))

    def _fail_pending(self, why: str) -> None:
        for correlation_id in list(self._calls):
            pending = self._calls.pop(correlation_id)
            if pending.timer.active():
                pending.timer.cancel()
            pending.deferred.errback(Unavailable(why, agent=pending.agent_id))
        for correlation_id in list(self._scatters):
            self._finish_scatter(correlation_id)

    def _log_once(self, key: tuple[str, str, str], format: str, log_event: str = "srs.ignored", **fields: Any) -> None:
        # Peers send every period: one line per distinct oddity, not one per
        # heartbeat; and a flood of distinct oddities is not a flood of lines.
        if key in self._ignored_logged or len(self._ignored_logged) >= MAX_LOGGED_ODDITIES:
            return
        self._ignored_logged.add(key)
        self.log.warn(format, event=log_event, **fields)


def _instances(summary: dict[str, Any]) -> int:
    count = summary.get("instances", 0)
    return count if isinstance(count, int) and not isinstance(count, bool) else 0
