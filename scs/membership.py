"""The cluster's membership table, as one agent sees it.

Members are made only by heartbeats (``heartbeat``), whose fields are
checked and of which only what is used is kept; the table holds at most
``max_peers`` members, a new one taking the place of the longest-dead when
it is full; a ``bye`` counts only from the member's current run; members
silent for ``forget_after`` seconds are forgotten.

Liveness: a member is alive while we are connected, it has not said bye and
it was heard from (any accepted message) within ``DEAD_AFTER_PERIODS`` of
its own heartbeat periods.  A member that missed one of our scatters is a
*suspect* until heard from again: later scatters do not wait for it, so a
crashed peer costs one scatter timeout, not one per listing until it is
declared dead.  Faster than both, the broker's word: a member whose private
queue is gone (a message to it came back unroutable) has ``left`` at once,
until its next heartbeat (``scs.srs_liveness``).

Each member records when it was first seen dead and why (``dead_since``,
``dead_cause``: ``queue-gone``, ``bye`` or ``silent``), cleared when it is
alive again.  That is the member's own state, not our connection's: while
we are disconnected members turn ``silent`` too (check ``is_connected``).

The table does no I/O: it answers, and ``scs.srs.SRS`` logs what changed
(``transitions``, through ``log_liveness``).

One trust domain: an agent that requires an HTTP token runs requests only
from members that require one too (``trusts``), and so a token-less agent
sends none to those (``accepts_us``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attr
from twisted.logger import Logger

# A peer silent for this many of its heartbeat periods is dead.
DEAD_AFTER_PERIODS = 3
# Bounds on the period a peer announces, so that one misconfigured (or
# hostile) peer cannot make itself immortal or flap.
MIN_PERIOD, MAX_PERIOD = 0.05, 60.0
DEFAULT_MAX_PEERS = 256
DEFAULT_FORGET_AFTER = 24 * 3600.0
MAX_URL_LENGTH = 512
# A heartbeat's summary may carry a digest of the member's instances, and
# one of its apps.
MAX_DIGEST_LENGTH = 64

# Why a member is dead (``Member.dead_cause``).
QUEUE_GONE, BYE, SILENT = "queue-gone", "bye", "silent"


class BadHeartbeat(ValueError):
    """A heartbeat whose fields are not what a heartbeat holds."""


class TableFull(Exception):
    """Every member is alive and the table is at ``max_peers``."""


@attr.s(auto_attribs=True)
class Member:
    id: str
    url: str = ""
    interval: float = 2.0
    last_seen: float | None = None
    instances: int = 0
    left: bool = False
    # When it last failed to answer one of our scatters.
    silent_since: float | None = None
    # Last liveness reported by ``transitions``.
    reported_alive: bool = False
    # The run of the agent that sent the last heartbeat.
    incarnation: str = ""
    # It requires a bearer token on its HTTP API (one trust domain).
    requires_token: bool = False
    # When it was first seen dead (None while alive), and why.
    dead_since: float | None = None
    dead_cause: str = ""
    # The "digest" of its last heartbeat's summary ("" when absent or bad).
    digest: str = ""
    # The "apps" digest of that summary: its apps and tombstones (scs.app_sync).
    apps_digest: str = ""
    # Its last heartbeat said it is draining: it takes no placements.
    draining: bool = False

    def heard_recently(self, now: float) -> bool:
        if self.last_seen is None or self.left:
            return False
        return now - self.last_seen <= DEAD_AFTER_PERIODS * self.interval

    def suspect(self) -> bool:
        """Missed a scatter and has not been heard from since."""
        return self.silent_since is not None and (self.last_seen is None or self.last_seen <= self.silent_since)


def digest(value: Any) -> str:
    """A peer's digest: a short string of printable ASCII, or ""."""
    if isinstance(value, str) and len(value) <= MAX_DIGEST_LENGTH and value.isascii() and value.isprintable():
        return value
    return ""


def count(value: Any) -> int:
    """A non-negative integer from a peer, or 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


class Membership:
    """The other agents of the cluster; see the module docstring."""

    def __init__(
        self,
        default_interval: float,
        max_peers: int = DEFAULT_MAX_PEERS,
        forget_after: float = DEFAULT_FORGET_AFTER,
    ) -> None:
        self.default_interval = default_interval
        self.max_peers = max_peers
        self.forget_after = forget_after
        self.members: dict[str, Member] = {}

    def __iter__(self) -> Iterator[Member]:
        return iter(sorted(self.members.values(), key=lambda m: m.id))

    def get(self, agent_id: str) -> Member | None:
        return self.members.get(agent_id)

    def heartbeat(self, sender: str, incarnation: str, payload: dict[str, Any], now: float) -> Member:
        """Record a heartbeat; BadHeartbeat or TableFull when it is refused."""
        url, interval, summary = payload.get("url"), payload.get("interval"), payload.get("summary")
        if (
            not isinstance(url, str)
            or len(url) > MAX_URL_LENGTH
            or not (url == "" or url.startswith(("http://", "https://")))
            or not url.isprintable()
            or isinstance(interval, bool)
            or not isinstance(interval, (int, float))
            or not 0 < interval < MAX_PERIOD * 1000
            or not isinstance(summary, dict)
        ):
            raise BadHeartbeat("bad heartbeat")
        member = self.members.get(sender) or self._admit(sender, now)
        member.last_seen = now
        member.left = False
        member.incarnation = incarnation
        member.url = url
        member.interval = min(max(float(interval), MIN_PERIOD), MAX_PERIOD)
        # Only the fields we use, type-checked: a peer cannot park data here.
        member.instances = count(summary.get("instances"))
        member.digest = digest(summary.get("digest"))
        member.apps_digest = digest(summary.get("apps"))
        member.draining = summary.get("draining") is True
        member.requires_token = payload.get("token") is True
        _alive_again(member)
        return member

    def _admit(self, sender: str, now: float) -> Member:
        if len(self.members) >= self.max_peers:
            dead = [m for m in self.members.values() if not m.heard_recently(now)]
            if not dead:
                raise TableFull(sender)
            oldest = min(dead, key=lambda m: m.last_seen or 0.0)
            del self.members[oldest.id]
        member = self.members[sender] = Member(sender, interval=self.default_interval)
        return member

    def bye(self, sender: str, incarnation: str, now: float) -> bool:
        """Mark a member gone; False when the bye is not from its current run."""
        member = self.members.get(sender)
        if member is None or member.incarnation != incarnation:
            return False
        member.left = True
        _dead(member, BYE, now)
        return True

    def left(self, sender: str, now: float, sent_at: float | None = None) -> bool:
        """The broker says the member has no queue: gone now (until its next
        heartbeat).  True when this is news (it had not left before).

        ``sent_at``: when the message the broker returned was sent.  A member
        heard from since then has a queue again (a restart or a reconnection
        that overtook the return): the return is old news."""
        member = self.members.get(sender)
        if member is None or member.left:
            return False
        if sent_at is not None and member.last_seen is not None and member.last_seen > sent_at:
            return False
        member.left = True
        _dead(member, QUEUE_GONE, now)
        return True

    def touch(self, sender: str, now: float) -> None:
        """A member was heard from (only heartbeats make new members)."""
        member = self.members.get(sender)
        if member is not None and not member.left:
            member.last_seen = now

    def missed(self, agent_ids: set[str], now: float) -> None:
        """These members did not answer a scatter in time."""
        for agent_id in agent_ids:
            member = self.members.get(agent_id)
            if member is not None:
                member.silent_since = now

    def alive(self, now: float, connected: bool) -> list[Member]:
        for member in self:
            note_dead(member, now)
        return [m for m in self if connected and m.heard_recently(now)]

    def absent_holders(self, now: float) -> list[str]:
        """Members not heard from (dead, or gone with a bye) whose last
        heartbeat said they held instances: any name may be theirs."""
        return sorted(m.id for m in self if m.instances > 0 and not m.heard_recently(now))

    def transitions(self, now: float, connected: bool) -> list[tuple[Member, bool]]:
        """Members whose liveness changed since last asked, with it."""
        changed = []
        for member in self:
            note_dead(member, now)
            alive = connected and member.heard_recently(now)
            if alive != member.reported_alive:
                member.reported_alive = alive
                changed.append((member, alive))
        return changed

    def rows(self, now: float, connected: bool) -> list[dict[str, Any]]:
        """The members as ``GET /agents/`` lists them."""
        for member in self:
            note_dead(member, now)
        return [member_row(m, connected and m.heard_recently(now)) for m in self]

    def forget_long_dead(self, now: float) -> list[Member]:
        gone = [m for m in self.members.values() if now - (m.last_seen or 0.0) > self.forget_after]
        for member in gone:
            del self.members[member.id]
        return gone


def note_dead(member: Member, now: float) -> None:
    """Bring ``dead_since`` up to date: a member not heard from within its
    periods has been dead (silent) since its last message plus those periods."""
    if member.heard_recently(now):
        _alive_again(member)
    elif member.dead_since is None:
        since = now if member.last_seen is None else member.last_seen + DEAD_AFTER_PERIODS * member.interval
        _dead(member, BYE if member.left else SILENT, min(since, now))


def _dead(member: Member, cause: str, now: float) -> None:
    # The first sighting counts: a silent member whose queue then goes stays
    # dead since it fell silent.
    if member.dead_since is None:
        member.dead_since = now
        member.dead_cause = cause


def _alive_again(member: Member) -> None:
    member.dead_since = None
    member.dead_cause = ""


def member_row(member: Member, alive: bool) -> dict[str, Any]:
    """A member as ``GET /agents/`` lists it."""
    return {
        "id": member.id,
        "url": member.url,
        "alive": alive,
        "last_seen": member.last_seen,
        "instances": member.instances,
        "requires_token": member.requires_token,
    }


def trusts(requires_token: bool, member: Member | None) -> bool:
    """Whether an agent (requiring a token or not) runs ``member``'s requests."""
    return not requires_token or (member is not None and member.requires_token)


def accepts_us(requires_token: bool, member: Member) -> bool:
    """Whether ``member`` runs the requests of an agent (the mirror of ``trusts``)."""
    return requires_token or not member.requires_token


def log_liveness(log: Logger, agent_id: str, member: Member, alive: bool, connected: bool) -> None:
    if alive:
        log.info(
            "SRS member {member} is alive ({url})",
            member=member.id,
            agent=member.id,
            cause="heartbeat",
            url=member.url,
            agent_id=agent_id,
            event="srs.member.alive",
        )
        return
    why = "gone" if member.left else ("disconnected" if not connected else "silent")
    log.warn(
        "SRS member {member} is dead ({cause})",
        member=member.id,
        agent=member.id,
        cause=member.dead_cause or "disconnected",
        why=why,
        last_seen=member.last_seen,
        agent_id=agent_id,
        event="srs.member.dead",
    )
