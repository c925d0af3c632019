"""Apps converge across agents: revisions, tombstones and anti-entropy.

Apps live on every agent (DESIGN §7).  A change is stored everywhere by a
scatter at the time it is made; an agent that is down or cut off from the
broker then misses it.  So every app carries a *revision* (milliseconds of
the clock of the agent that took the change, or one more than the highest
revision that agent knew for the name), every agent of the scatter stores
the same one, and a deleted app leaves a *tombstone* (its name and the
revision of the deletion).

Anti-entropy, as for the copies of the instances (``scs.replica``): every
heartbeat carries the digest of this agent's apps and tombstones
(``LocalAgent.summary``, "apps"); a live peer whose digest differs is asked
for its state (``app_state``), at most once per ``MIN_FETCH_INTERVAL``, and
it is merged here.  For each name the highest version wins: a higher
revision; at the same revision a tombstone over an app, and of two apps the
one whose settings' canonical JSON is larger.  Both sides of a difference
fetch, so the cluster converges whichever holds the newer data.  An app
that wins is stored with ``LocalAgent.app_put`` (its workers are then
replaced for the new settings, one at a time per app, by the supervisor);
a tombstone that wins deletes the app here with ``LocalAgent.app_delete``
(its instances too).

A peer's state is a door like any other: every item passes the checks of
the operation it stands for (``check_operation``: ``app_put``, or
``app_delete`` for a tombstone), the revision included (never more than a
day ahead of this agent's clock); an item refused is logged
(``srs.copy.refused``) and left out, and a state larger than
``MAX_ITEMS`` or naming an app twice is refused whole.

Tombstones older than ``forget_after`` (``--forget-dead-after``, by their
revision's time, which is the same on every agent) are purged, and a peer's
tombstone that old is not taken: an agent away longer than that may give a
deleted app back.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import attrs
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger

from scs.errors import BadParameter, SCSError
from scs.membership import DEFAULT_FORGET_AFTER
from scs.operation_args import check_operation
from scs.records import now_ms
from scs.replica import MAX_DOCUMENTS, MIN_FETCH_INTERVAL

log = Logger(namespace="scs.app_sync")

# A peer's state holds at most this many apps and tombstones.
MAX_ITEMS = MAX_DOCUMENTS
# An app's settings, as ``app_state`` and ``app_export`` give them.
SETTINGS = ("app", "broker", "celery_app", "arguments", "env", "workdir", "python", "task_events")


def state_digest(items: list[dict[str, Any]]) -> str:
    """The digest of an ``app_state``: the same items in any order give
    the same digest."""
    ordered = sorted(items, key=lambda item: (item["app"], bool(item.get("deleted"))))
    text = json.dumps(ordered, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


@attrs.frozen(order=True)
class Version:
    """What decides between two versions of one app name: the higher
    revision, then a tombstone over an app, then the larger settings."""

    revision: int
    deleted: bool
    settings: str


def check_item(item: Any) -> tuple[Version, dict[str, Any]]:
    """A peer's app or tombstone checked as the operation it stands for:
    its version and the clean arguments (``app_put``'s, or ``app_delete``'s
    for a tombstone); BadParameter otherwise."""
    if not isinstance(item, dict):
        raise BadParameter("an app must be an object", parameter="app")
    if "deleted" in item:
        if item["deleted"] is not True or "revision" not in item:
            raise BadParameter("a deleted app is {app, revision, deleted: true}", parameter="deleted")
        clean = check_operation("app_delete", {k: v for k, v in item.items() if k != "deleted"})
        return Version(clean["revision"], True, ""), clean
    if "roll" in item:
        raise BadParameter("unknown parameter roll", parameter="roll")
    clean = check_operation("app_put", item)
    clean.setdefault("revision", 0)
    return Version(clean["revision"], False, _canonical(clean)), clean


def _canonical(clean: dict[str, Any]) -> str:
    return json.dumps({k: clean.get(k) for k in SETTINGS}, sort_keys=True, separators=(",", ":"))


class AppSync:
    """This agent's apps kept in step with its peers'; see the module
    docstring.  ``local`` is this agent's ``LocalAgent``, ``peers`` its
    ``scs.peers.Peers``."""

    def __init__(
        self, local: Any, peers: Any, call_timeout: float = 10.0, forget_after: float = DEFAULT_FORGET_AFTER
    ) -> None:
        self.local = local
        self.peers = peers
        self.call_timeout = call_timeout
        self.forget_after = forget_after
        self._fetching: set[str] = set()
        self._fetched_at: dict[str, float] = {}

    def _seconds(self) -> float:
        clock = self.local.clock
        return clock.seconds() if clock is not None else time.monotonic()

    def _horizon(self) -> int:
        """Tombstones with an older revision are forgotten."""
        return now_ms() - int(self.forget_after * 1000)

    def stale(self) -> list[str]:
        """Live peers whose heartbeat's apps digest differs from ours."""
        srs = self.peers.srs
        if srs is None:
            return []
        ours = self.local.apps_digest()
        return [
            member.id
            for member in srs.membership
            if member.id != self.local.agent_id
            and member.apps_digest
            and member.apps_digest != ours
            and self.peers.peer_alive(member.id)
        ]

    def sync(self) -> Deferred:
        """Purge old tombstones; fetch and merge the state of every stale
        peer (one request per peer at a time, at most one per interval)."""
        purged = self.local.store.purge_tombstones(self._horizon())
        if purged:
            log.info("forgot the deletion of {apps}", apps=purged, event="app.tombstone.purged")
        now = self._seconds()
        due = [
            agent
            for agent in self.stale()
            if agent not in self._fetching
            and now - self._fetched_at.get(agent, -MIN_FETCH_INTERVAL) >= MIN_FETCH_INTERVAL
        ]
        return DeferredList([Deferred.fromCoroutine(self._fetch(agent)) for agent in due], consumeErrors=True)

    async def _fetch(self, agent: str) -> None:
        self._fetching.add(agent)
        self._fetched_at[agent] = self._seconds()
        try:
            answer = await self.peers.srs.call(agent, "app_state", {}, timeout=self.call_timeout)
        except SCSError as e:
            log.info("apps of {agent} not fetched: {error}", agent=agent, error=e.message, event="app.sync.failed")
            return
        finally:
            self._fetching.discard(agent)
        self.merge(agent, answer)

    async def pull_all(self) -> None:
        """Merge the state of every live peer (an agent that connects)."""
        if not self.peers.clustered():
            return
        answers, _missing = await self.peers.srs.scatter("app_state", {}, timeout=self.call_timeout)
        for agent in sorted(answers):
            if not isinstance(answers[agent], Exception):
                self.merge(agent, answers[agent])

    def checked(self, agent: str, answer: Any) -> dict[str, tuple[Version, dict[str, Any]]]:
        """A peer's state, checked: name -> (version, clean arguments).
        Items refused are logged and left out; a state too large or naming
        an app twice is refused whole (BadParameter)."""
        if not isinstance(answer, list) or len(answer) > MAX_ITEMS:
            raise BadParameter(f"an app state must be a list of at most {MAX_ITEMS} items", parameter="apps")
        theirs: dict[str, tuple[Version, dict[str, Any]]] = {}
        for item in answer:
            try:
                version, clean = check_item(item)
            except SCSError as e:
                _refused(agent, e.message)
                continue
            if clean["app"] in theirs:
                raise BadParameter("an app state names an app twice", parameter="apps")
            theirs[clean["app"]] = (version, clean)
        return theirs

    def ours(self) -> dict[str, Version]:
        """This agent's versions, computed as a peer's are."""
        versions = {}
        for item in self.local.app_state():
            try:
                versions[item["app"]] = check_item(item)[0]
            except SCSError:
                versions[item["app"]] = Version(item["revision"], bool(item.get("deleted")), "")
        return versions

    def merge(self, agent: str, answer: Any) -> list[str]:
        """Take from a peer's state what is newer than ours; the names
        changed here."""
        try:
            theirs = self.checked(agent, answer)
        except SCSError as e:
            _refused(agent, e.message)
            return []
        ours = self.ours()
        horizon = self._horizon()
        changed = []
        for name in sorted(theirs):
            version, clean = theirs[name]
            if version.deleted and version.revision < horizon:
                continue  # a deletion forgotten here already
            if name in ours and not version > ours[name]:
                continue
            if version.deleted:
                if not self.local.app_delete(name, revision=version.revision)["deleted"]:
                    self.local.store.put_tombstone(name, version.revision)
            else:
                self.local.app_put(**clean)
            changed.append(name)
            log.info(
                "app {app} {what} as {agent} has it (revision {revision})",
                app=name,
                what="deleted" if version.deleted else "updated",
                agent=agent,
                revision=version.revision,
                event="app.merged",
            )
        return changed


def _refused(agent: str, error: str) -> None:
    log.warn(
        "refused an app copied from {agent}: {error}",
        agent=agent,
        error=error,
        event="srs.copy.refused",
        operation="app_state",
    )


def app_sync_service(app_sync: AppSync, clock: Any, interval: float = 0.5) -> TimerService:
    """A service running ``app_sync.sync`` every ``interval`` seconds (the
    digests come with the heartbeats; a steady cluster costs a comparison);
    a failed round is logged, the next one runs."""

    def sync() -> Deferred:
        return maybeDeferred(app_sync.sync).addErrback(lambda f: log.failure("app sync failed", f))

    service = TimerService(interval, sync)
    service.clock = clock
    return service
