"""Knowing a killed agent dead within a second: ring probes and gone notices.

Heartbeats find a peer that hangs or loses the network, after three of its
periods.  A peer killed outright (``kill -9``) is found much sooner: the
broker drops its exclusive private queue with its connection, and a
``mandatory`` message to it comes back unroutable at once.  So:

* every ``interval`` seconds (``probe_interval``: 0.5 s, or a quarter
  heartbeat period when that is shorter) each agent sends a small signed
  ``probe`` (payload ``{}``, no reply) with ``mandatory`` to its successor in
  the sorted ring of the members it believes alive, itself included: N
  probes per period for the whole cluster, not N².  The ring follows the
  table, so successors change as members come and go;
* a probe (or any mandatory message) the broker returns means the
  addressee's queue is gone: ``scs.srs.SRS`` marks it left at once
  (``Membership.left``) and this module broadcasts a signed ``gone`` notice
  (``{"agent": id}``) on the fanout, so the others need not wait for their
  own turn of the ring;
* a ``gone`` notice is never believed: the receiver sends its own mandatory
  probe to the agent named, and only the broker's return marks it left
  there.  A forged notice (from anyone who can publish on the bus, signed or
  not) costs one probe, at most one per named member and ``interval``, and
  only for members we believe alive;
* a member marked left this way is alive again on its next heartbeat (a
  restarted agent, or the same one back from a broken connection);
* a listing asked just after a kill may have been routed to the queue the
  broker was about to drop, and would wait out its timeout: a scatter still
  waiting after 50 ms probes its silent peers (``check``, at most one probe
  per peer and ``CHECK_SPACING``), and every scatter stops waiting for a
  peer found gone.

Received probes only count as hearing from the sender.  Detection takes at
most one probe interval plus a few broker round trips for the predecessor,
and one more round trip for the others.  An agent that is only stopped
(SIGSTOP) keeps its queue: probes to it are routed, and heartbeats decide.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from scs.errors import BadParameter
from scs.membership import Membership
from scs.srs_outbox import Outbox
from scs.srs_trust import Message, Rejected
from scs.srs_wire import DIRECT, FANOUT
from scs.validation import check_name

PROBE_INTERVAL = 0.5
# At most one probe per peer this often for scatters that wait on it.
CHECK_SPACING = 0.05
# A gone notice whose verifying probe came back within this many probe
# intervals is what taught us: we do not announce it again.
VERIFY_WINDOW_PERIODS = 10


def probe_interval(heartbeat_interval: float) -> float:
    """The ring's period: 0.5 s, or a quarter heartbeat period if shorter."""
    return min(PROBE_INTERVAL, heartbeat_interval / 4)


def successor(me: str, live: list[str]) -> str | None:
    """The next id after ``me`` in the sorted ring of ``live`` and ``me``."""
    ring = sorted(set(live) - {me})
    if not ring:
        return None
    return ring[bisect.bisect_right(ring, me) % len(ring)]


class Liveness:
    """One agent's probes and gone notices; see the module docstring."""

    log = Logger(namespace="scs.srs")

    def __init__(
        self,
        agent_id: str,
        outbox: Outbox,
        membership: Membership,
        reactor: IReactorTime,
        *,
        interval: float,
        live: Callable[[], list[str]],
        rejected: Callable[[Rejected], None],
    ) -> None:
        self.agent_id = agent_id
        self.interval = interval
        self._outbox = outbox
        self._membership = membership
        self._reactor = reactor
        self._live = live
        self._rejected = rejected
        # Member id -> when we last probed it to check a gone notice.
        self._verifying: dict[str, float] = {}
        # Member id -> when we last probed it for a waiting scatter.
        self._checked: dict[str, float] = {}
        self._loop = LoopingCall(self.tick)
        self._loop.clock = reactor

    def start(self) -> None:
        if not self._loop.running:
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        self._verifying.clear()
        self._checked.clear()

    def check(self, agents: list[str]) -> None:
        """Probe the queues of peers a scatter still waits for."""
        now = self._reactor.seconds()
        self._checked = {a: t for a, t in self._checked.items() if now - t < CHECK_SPACING}
        for agent in agents:
            if agent not in self._checked:
                self._checked[agent] = now
                self._probe(agent)

    def tick(self) -> None:
        """Probe our successor in the ring."""
        try:
            target = successor(self.agent_id, self._live())
            if target is not None:
                self._probe(target)
        except Exception:  # noqa: BLE001 - the loop must outlive one bad tick
            self.log.failure("SRS liveness probe failed")

    def _probe(self, target: str) -> None:
        # Failures are logged by the outbox; the next tick tries again.
        self._outbox.send(DIRECT, target, "probe", {}, mandatory=True).addErrback(lambda _: None)

    # -- receiving -----------------------------------------------------------

    def received_probe(self, message: Message) -> None:
        """A probe says nothing but that its sender runs."""
        self._membership.touch(message.sender, self._reactor.seconds())

    def received_gone(self, message: Message) -> None:
        """Check a notice that an agent's queue is gone with our own probe."""
        agent = message.payload.get("agent")
        try:
            check_name(agent, "agent")
        except BadParameter:
            self._rejected(Rejected("malformed", "bad gone notice", message.sender))
            return
        if self._membership.get(message.sender) is None:
            self._rejected(Rejected("not-a-member", "gone notice from a stranger", message.sender))
            return
        if agent == self.agent_id or agent not in self._live():
            return  # we know better, or already know
        now = self._reactor.seconds()
        last = self._verifying.get(agent)
        if last is not None and now - last < self.interval:
            return  # one probe per member and interval, whatever the notices
        self._forget_old(now)
        self._verifying[agent] = now
        self.log.info(
            "SRS {sender} says {agent} is gone: probing it",
            sender=message.sender,
            agent=agent,
            event="srs.member.gone_notice",
        )
        self._probe(agent)

    # -- the broker's word ---------------------------------------------------

    def announce(self, agent: str) -> None:
        """``agent``'s queue is gone (marked left): tell the others, unless
        we learnt it from their notice."""
        now = self._reactor.seconds()
        last = self._verifying.pop(agent, None)
        if last is not None and now - last <= VERIFY_WINDOW_PERIODS * self.interval:
            return
        self._outbox.send(FANOUT, "*", "gone", {"agent": agent}).addErrback(lambda _: None)

    def _forget_old(self, now: float) -> None:
        # Keys are members we believed alive: bounded by the table; old ones go.
        horizon = VERIFY_WINDOW_PERIODS * self.interval
        for agent in [a for a, t in self._verifying.items() if now - t > horizon]:
            del self._verifying[agent]
