"""SRS: the agents' protocol (membership, requests, scatter-gather).

This module knows the messages and the bookkeeping, not the wire: it talks to
an ``ISRSTransport`` (``scs.amqp.AMQPTransport`` on a real broker,
``scs.testing.FakeTransport`` in tests).

The exchanges, keys and queues are named in ``scs.srs_wire``.

Every body is ASCII-only JSON (txAMQP 0.8.2 counts ``str`` lengths in
characters, so non-ASCII text travels as ``\\u`` escapes), sealed and
opened by ``scs.srs_trust.MessageCodec``: a signed routing header (type,
sender, incarnation, ``to``, timestamp, nonce, and for requests and replies
the correlation id and reply queue) around a payload::

    heartbeat: "url", "interval", "summary": {"instances": N}, "hello": bool,
               "token": bool (the agent requires an HTTP token)
    bye:       {}
    probe:     {}                 (mandatory, to one agent: is its queue there?)
    gone:      "agent"            (its queue is gone; checked before believed)
    request:   "op", "args"
    reply:     "ok": true, "result": ...
               "ok": false, "error": {"code": ..., "body": {...}}

With a cluster secret every message is signed, fresh and used once, and its
payload is encrypted; without one anyone on the broker is a member.  Either
way every field is checked before it is used, and what is dropped is
counted by reason (``rejected``).

Membership (``scs.membership``) comes only from heartbeats, bounded by
``max_peers``; a member silent for ``forget_after`` seconds leaves the
table; a ``bye`` counts only from the member's current incarnation.  A
member whose private queue is gone (``kill -9``) is known dead within a
second through ring probes and checked ``gone`` notices
(``scs.srs_liveness``).  The requests waiting for answers are
``scs.srs_requests``.  A reply is taken only from the agent that was
asked, addressed to us, for the request it names.  An agent
that requires a token accepts requests only from peers that require one.

Choices the contract left open:

* Liveness: a peer is alive while we are connected, it has not said ``bye``
  and it was heard from (any message) within 3 of its heartbeat periods.
  When our broker connection drops, every other member turns not-alive at
  once: we can no longer reach anyone, so believing them alive would only
  make callers wait.
* ``scatter`` sends its request to each live peer by its own key,
  mandatory, so that one whose queue is gone is returned by the broker and
  not waited for; an agent not yet in the table is not asked.
* ``scatter`` while not connected fires at once with ``({}, missing)`` where
  ``missing`` names the peers that were alive when the connection dropped
  (the ones a listing would have asked), so the listing can name them in
  its missing-agents header; callers may also check ``is_connected()``.
* ``on_connected`` callbacks run ``discovery_delay`` seconds (default a
  quarter heartbeat period) after each connection, not at once: our first
  heartbeat asks peers to answer with theirs, and a callback that scatters
  (fetching the apps of the cluster) must find them in the table.
* ``call`` to this agent's own id runs the handler directly (no broker
  round trip, works while disconnected); the result is still passed through
  JSON so that local and remote answers look the same.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from scs.errors import BadParameter, SCSError, Unauthorized, Unavailable
from scs.membership import (
    DEFAULT_FORGET_AFTER,
    DEFAULT_MAX_PEERS,
    BadHeartbeat,
    Member,
    Membership,
    TableFull,
    accepts_us,
    count,
    log_liveness,
    member_row,
    trusts,
)
from scs.srs_liveness import Liveness, probe_interval
from scs.srs_outbox import Outbox
from scs.srs_requests import PendingRequests
from scs.srs_serving import error_payload, ok_payload, outcome, run_here
from scs.srs_trust import Message, MessageCodec, Rejected
from scs.srs_wire import (  # noqa: F401 - the wire's names are part of this module's API
    DIRECT,
    FANOUT,
    REPLY,
    ISRSTransport,
    ITransportReceiver,
    encode_message,
    exchange_names,
    private_queue_name,
    routing_key,
)
from scs.validation import check_name

# Distinct oddities logged (once each) before the rest are only counted.
MAX_LOGGED_ODDITIES = 1000
# A heartbeat is small: anything larger is not one (nor a bye, probe or gone).
MAX_HEARTBEAT_BYTES = 8 * 1024
SMALL_TYPES = ("heartbeat", "bye", "probe", "gone")

# Runs an operation a peer asked for: (op, args) -> result or Deferred.
Handler = Callable[[str, dict[str, Any]], Any]


def _no_handler(op: str, args: dict[str, Any]) -> Any:
    raise Unavailable("this agent serves no SRS requests", op=op)


class SRS(MultiService):
    """One agent's membership in the cluster and its requests to peers."""

    log = Logger()

    def __init__(
        self,
        agent_id: str,
        transport: ISRSTransport,
        *,
        reactor: IReactorTime,
        cluster: str = "scs",
        url: str = "",
        handler: Handler = _no_handler,
        on_connected: Sequence[Callable[[], Any]] = (),
        heartbeat_interval: float = 2.0,
        summary: Callable[[], dict] = lambda: {},
        rng: random.Random | None = None,
        discovery_delay: float | None = None,
        codec: MessageCodec | None = None,
        requires_token: bool = False,
        max_peers: int = DEFAULT_MAX_PEERS,
        forget_after: float = DEFAULT_FORGET_AFTER,
    ) -> None:
        super().__init__()
        self.agent_id = agent_id
        self.cluster = cluster
        self.url = url
        self.handler = handler
        self.on_connected = list(on_connected)
        self.heartbeat_interval = heartbeat_interval
        self.discovery_delay = heartbeat_interval / 4 if discovery_delay is None else discovery_delay
        self.summary = summary
        self.codec = codec if codec is not None else MessageCodec(cluster, clock=reactor.seconds)
        self.requires_token = requires_token
        self.membership = Membership(heartbeat_interval, max_peers, forget_after)
        self.transport = transport
        transport.attach(agent_id, cluster, self)
        self.addService(transport)

        self._reactor = reactor
        self._rng = rng if rng is not None else random.Random()
        self._incarnation = self._new_id()[:16]
        self._outbox = Outbox(agent_id, self._incarnation, self.codec, transport)
        self._connected = False
        # Peers alive when the connection last dropped: who a scatter misses meanwhile.
        self._alive_when_lost: list[str] = []
        self._reply_queue: str | None = None
        self._last_connected: float | None = None
        self._pending = PendingRequests(reactor, self._scatter_ended, lambda silent: self.liveness.check(silent))
        self._oddities = FirstSeen(MAX_LOGGED_ODDITIES)
        self._beat = LoopingCall(self._heartbeat_tick)
        self._beat.clock = reactor
        self._discovery: Any = None
        self.liveness = Liveness(
            agent_id,
            self._outbox,
            self.membership,
            reactor,
            interval=probe_interval(heartbeat_interval),
            live=lambda: [m.id for m in self.membership.alive(reactor.seconds(), self._connected)],
            rejected=lambda rejection: self._rejected(rejection, counted=False),
        )

    # -- service -----------------------------------------------------------

    def stopService(self) -> Deferred:
        """Say bye (so peers drop us at once), fail what is pending, disconnect."""
        if self._beat.running:
            self._beat.stop()
        self.liveness.stop()
        self._cancel_discovery()
        d: Deferred = defer.succeed(None)
        if self._connected:
            d = self._outbox.send(FANOUT, "*", "bye", {})
            d.addErrback(lambda _: None)
        self._pending.fail_all("this agent is stopping")
        d.addCallback(lambda _: MultiService.stopService(self))
        return d

    # -- public API --------------------------------------------------------

    def is_connected(self) -> bool:
        return self._connected

    def sees_the_cluster(self) -> bool:
        """Whether a peer not alive here is dead rather than cut off from
        us: we are connected and have heard the peers answer our hello
        (``discovery_delay`` after connecting).  While we are cut off every
        peer looks dead, and none of them may be judged so."""
        return self._connected and self._discovery is None

    def rejected_counts(self) -> dict[str, int]:
        """Messages dropped so far, by reason (``scs.srs_trust.REASONS``)."""
        return dict(self.codec.rejected)

    def members(self) -> list[dict[str, Any]]:
        """The membership table, this agent included, sorted by id."""
        now = self._reactor.seconds()
        me = Member(self.agent_id, self.url, last_seen=now if self._connected else self._last_connected)
        me.instances = count(_summary_of(self.summary, self.log).get("instances"))
        me.requires_token = self.requires_token
        rows = [member_row(me, self._connected), *self.membership.rows(now, self._connected)]
        return sorted(rows, key=lambda row: row["id"])

    def absent_holders(self) -> list[str]:
        """Agents known to hold instances that cannot be asked now."""
        return self.membership.absent_holders(self._reactor.seconds())

    def live_agents(self) -> list[str]:
        """Ids believed alive that accept our requests, self included (even
        while disconnected: the local agent can always serve its own)."""
        ids = [m.id for m in self._live_peers()]
        ids.append(self.agent_id)
        return sorted(ids)

    def call(self, agent_id: str, op: str, args: dict, timeout: float = 5.0) -> Deferred:
        """Run ``op`` on one agent; its SCSError is re-raised here as the same class."""
        if agent_id == self.agent_id:
            return self._run_local(op, args)
        if not self._connected or self._reply_queue is None:
            return defer.fail(Unavailable("not connected to the cluster broker", agent=agent_id, op=op))
        correlation_id = self._new_id()
        d = self._pending.call(correlation_id, agent_id, op, timeout)
        # Mandatory: when the agent has no queue (crashed, not yet detected)
        # the broker returns the request at once and we fail fast instead of
        # waiting out the timeout.
        sent = self._outbox.send(
            DIRECT,
            agent_id,
            "request",
            {"op": op, "args": args},
            cid=correlation_id,
            reply_to=self._reply_queue,
            mandatory=True,
        )
        sent.addErrback(
            lambda _: self._pending.fail_call(
                correlation_id, Unavailable(f"could not send to agent {agent_id}", agent=agent_id)
            )
        )
        return d

    def scatter(
        self, op: str, args: dict, timeout: float = 2.0, arguments_for: Callable[[str], dict] | None = None
    ) -> Deferred:
        """Ask every other live agent; fires ``({id: result or SCSError}, missing)``.
        ``arguments_for``: a peer's own arguments (``args`` when None).

        Fires as soon as every peer believed alive at the start answered or
        was returned by the broker (its queue is gone), or at ``timeout``
        naming the silent ones. Suspects (silent at an earlier scatter) are
        asked but not waited for: their answers are kept if in time.
        """
        if not self._connected or self._reply_queue is None:
            return defer.succeed(({}, list(self._alive_when_lost)))
        live = self._live_peers()
        suspects = sorted(m.id for m in live if m.suspect())
        expected = {m.id for m in live} - set(suspects)
        if not expected:
            return defer.succeed(({}, suspects))
        correlation_id = self._new_id()
        d = self._pending.scatter(correlation_id, op, expected, suspects, timeout)
        for peer in sorted(m.id for m in live):
            sent = self._outbox.send(
                DIRECT,
                peer,
                "request",
                {"op": op, "args": args if arguments_for is None else arguments_for(peer)},
                cid=correlation_id,
                reply_to=self._reply_queue,
                mandatory=True,
            )
            # Not sent: it will not answer; stop waiting for it now.
            sent.addErrback(lambda _, peer=peer: self._pending.unreachable(correlation_id, peer))
        return d

    def broadcast(self, op: str, args: dict) -> None:
        """Fire and forget to every other agent; dropped (logged) when disconnected."""
        if not self._connected:
            self.log.warn("SRS broadcast {op} dropped: not connected", op=op, event="srs.broadcast.dropped")
            return
        self._outbox.send(FANOUT, "*", "request", {"op": op, "args": args})

    def _live_peers(self) -> list[Member]:
        now = self._reactor.seconds()
        return [m for m in self.membership.alive(now, self._connected) if accepts_us(self.requires_token, m)]

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
        self.liveness.start()
        self._cancel_discovery()
        self._discovery = self._reactor.callLater(self.discovery_delay, self._run_on_connected)

    def _run_on_connected(self) -> None:
        self._discovery = None
        for callback in self.on_connected:
            d = defer.maybeDeferred(callback)
            d.addErrback(lambda f: self.log.failure("SRS connected callback failed", f))

    def _cancel_discovery(self) -> None:
        if self._discovery is not None and self._discovery.active():
            self._discovery.cancel()
        self._discovery = None

    def transport_disconnected(self, reason: Failure | None) -> None:
        if not self._connected:
            return
        self._alive_when_lost = [agent for agent in self.live_agents() if agent != self.agent_id]
        self._connected = False
        self._reply_queue = None
        self._last_connected = self._reactor.seconds()
        if self._beat.running:
            self._beat.stop()
        self.liveness.stop()
        self._cancel_discovery()
        self.log.emit(
            LogLevel.warn if self.running else LogLevel.info,
            "SRS {agent_id} disconnected from the broker: {reason}",
            agent_id=self.agent_id,
            reason=reason.getErrorMessage() if reason is not None else "closed",
            event="srs.disconnected",
        )
        self._pending.fail_all("lost the connection to the cluster broker")
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
        if message.type in SMALL_TYPES and len(body) > MAX_HEARTBEAT_BYTES:
            self._rejected(Rejected("oversized", f"{message.type} of {len(body)} bytes", message.sender), counted=False)
            return
        receive = {
            "heartbeat": self._on_heartbeat,
            "bye": self._on_bye,
            "probe": self.liveness.received_probe,
            "gone": self.liveness.received_gone,
            "request": self._on_request,
            "reply": self._on_reply,
        }.get(message.type)
        if receive is None:
            self._rejected(Rejected("malformed", "unknown type %r" % message.type[:32], message.sender))
            return
        receive(message)

    def message_returned(self, body: bytes, properties: dict[str, str]) -> None:
        """The broker has no queue for the agent a mandatory message was for:
        it is gone now, not in three periods (its next heartbeat, if any,
        brings it back)."""
        sent = self._outbox.recall(body)
        pending = self._pending.take_call(properties.get("correlation-id", ""))
        agent = pending.agent_id if pending is not None else (sent.to if sent is not None else None)
        if agent is None or agent in ("*", self.agent_id):
            return
        if pending is not None:
            self.log.info(
                "SRS request {op} to {member} returned: no such agent connected",
                op=pending.op,
                member=agent,
                event="srs.call.unroutable",
            )
        if self.membership.left(agent, self._reactor.seconds(), sent.ts if sent is not None else None):
            self._log_transitions()
            self.liveness.announce(agent)
            self._pending.gone(agent)
        if pending is not None:
            pending.deferred.errback(Unavailable(f"agent {agent} is not connected to the cluster", agent=agent))
        elif sent is not None and sent.type == "request" and sent.cid is not None:
            self._pending.unreachable(sent.cid, agent)

    # -- receiving ---------------------------------------------------------

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

    def _on_heartbeat(self, message: Message) -> None:
        now = self._reactor.seconds()
        try:
            member = self.membership.heartbeat(message.sender, message.incarnation, message.payload, now)
        except BadHeartbeat:
            self._rejected(Rejected("malformed", "bad heartbeat", message.sender), counted=False)
            return
        except TableFull:
            self._rejected(Rejected("not-a-member", "membership table is full", message.sender), counted=False)
            return
        self._log_transitions()
        if message.payload.get("hello") is True:
            # A newcomer should not wait a whole period to learn about us.
            self._send_heartbeat(to=member.id)

    def _on_bye(self, message: Message) -> None:
        if not self.membership.bye(message.sender, message.incarnation, self._reactor.seconds()):
            # A replayed bye of an earlier run, or one from a stranger.
            self._rejected(Rejected("not-a-member", "bye from another incarnation", message.sender), counted=False)
            return
        self._pending.gone(message.sender)
        self._log_transitions()

    def _on_request(self, message: Message) -> None:
        payload = message.payload
        op, args = payload.get("op"), payload.get("args")
        reply_to, correlation_id = message.reply_to, message.cid
        if reply_to is not None and not reply_to.startswith(private_queue_name(self.cluster, message.sender, "")):
            # Replies go only to the asker's own private queue.
            self._rejected(Rejected("misrouted", "reply-to is not the sender's queue", message.sender), counted=False)
            return
        self.membership.touch(message.sender, self._reactor.seconds())
        if not trusts(self.requires_token, self.membership.get(message.sender)):
            self._log_once(
                ("untrusted", message.sender, ""),
                "SRS refuses requests from {sender}: this agent requires a token and {sender} does not",
                sender=message.sender,
            )
            self.codec.count("untrusted-peer")
            d: Deferred = defer.fail(
                Unauthorized(f"agent {self.agent_id} accepts cluster operations only from agents that require a token")
            )
        elif not isinstance(op, str) or not isinstance(args, dict):
            d = defer.fail(BadParameter("malformed SRS request"))
        else:
            d = defer.maybeDeferred(self.handler, op, args)
        if reply_to and correlation_id:
            d.addCallbacks(
                ok_payload,
                error_payload,
                callbackArgs=(self.log,),
                errbackArgs=(op, self.agent_id, self.log),
            )
            d.addCallback(
                lambda reply: self._outbox.send(REPLY, reply_to, "reply", reply, to=message.sender, re=correlation_id)
            )
            d.addErrback(lambda f: self.log.failure("SRS could not reply to {op}", f, op=op))
        else:
            d.addErrback(self._log_broadcast_failure, op)

    def _log_broadcast_failure(self, failure: Failure, op: Any) -> None:
        if failure.check(SCSError):
            self.log.warn("SRS broadcast {op} refused: {error}", op=op, error=failure.getErrorMessage())
        else:
            self.log.failure("SRS broadcast {op} failed", failure, op=op)

    def _on_reply(self, message: Message) -> None:
        if self._pending.reply(message.sender, message.re or "", outcome(message.payload)):
            self.membership.touch(message.sender, self._reactor.seconds())
        else:
            # Late, duplicated, or from an agent that was not asked.
            self._rejected(Rejected("unexpected-reply", "", message.sender), counted=False)

    # -- membership --------------------------------------------------------

    def _scatter_ended(self, op: str, silent: set[str], missing: list[str]) -> None:
        self.membership.missed(silent, self._reactor.seconds())
        if missing:
            self.log.info(
                "SRS scatter {op}: no answer from {missing}", op=op, missing=missing, event="srs.scatter.missing"
            )

    def _log_transitions(self) -> None:
        for member, alive in self.membership.transitions(self._reactor.seconds(), self._connected):
            log_liveness(self.log, self.agent_id, member, alive, self._connected)

    def _heartbeat_tick(self) -> None:
        self._send_heartbeat()
        self._log_transitions()
        for member in self.membership.forget_long_dead(self._reactor.seconds()):
            self.log.info(
                "SRS forgot member {member}, silent since {last_seen}",
                member=member.id,
                last_seen=member.last_seen,
                event="srs.member.forgotten",
            )

    def _send_heartbeat(self, hello: bool = False, to: str | None = None) -> None:
        payload = {
            "url": self.url,
            "interval": self.heartbeat_interval,
            "summary": _summary_of(self.summary, self.log),
            "hello": hello,
            "token": self.requires_token,
        }
        if to is None:
            self._outbox.send(FANOUT, "*", "heartbeat", payload)
        else:
            self._outbox.send(DIRECT, to, "heartbeat", payload)

    # -- sending -----------------------------------------------------------

    def _new_id(self) -> str:
        return "%032x" % self._rng.getrandbits(128)

    def _run_local(self, op: str, args: dict) -> Deferred:
        return run_here(self.handler, op, args, self.agent_id, self.log)

    def _log_once(self, key: tuple[str, str, str], format: str, log_event: str = "srs.ignored", **fields: Any) -> None:
        # Peers send every period: one line per distinct oddity, not one per
        # heartbeat; and a flood of distinct oddities is not a flood of lines.
        if self._oddities.first(key):
            self.log.warn(format, event=log_event, **fields)


class FirstSeen:
    """Remembers up to ``limit`` keys; ``first`` is True once per key (and
    False for everything once full)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[Any] = set()

    def first(self, key: Any) -> bool:
        if key in self._seen or len(self._seen) >= self.limit:
            return False
        self._seen.add(key)
        return True


def _summary_of(summary: Callable[[], Any], log: Logger) -> dict[str, Any]:
    """The agent's summary for heartbeats; {} when it fails."""
    try:
        value = summary()
    except Exception:  # noqa: BLE001 - a failing summary must not stop the heartbeats
        log.failure("SRS summary() failed")
        return {}
    return value if isinstance(value, dict) else {}
