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

Autoscaling policies converge the same way, in the same state and digest:
each carries a revision given as an app's (``Store.next_revision``), a
deletion of the policy (or of its app with one) leaves a policy tombstone,
and ``app_state`` lists them after the apps as items with ``"kind":
"autoscaling"``, checked as ``autoscaling_put`` or ``autoscaling_delete``.
The apps of a state are merged first, then the policies: a policy is kept
only with its app, and an app that arrives brings its policy in the same
round.

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
from scs.store import APP, POLICY
from scs.validation import POLICY_FIELDS

log = Logger(namespace="scs.app_sync")

# A peer's state holds at most this many apps and tombstones, and as many
# policies and their tombstones.
MAX_ITEMS = MAX_DOCUMENTS
# An app's settings, as ``app_state`` and ``app_export`` give them.
SETTINGS = ("app", "broker", "celery_app", "arguments", "env", "workdir", "python", "task_events")


@attrs.frozen
class Kind:
    """What an item of an ``app_state`` is of: ``name`` (its ``kind``; an
    app's item has none) is the prefix of the operations it stands for
    (``<name>_put``, and ``<name>_delete`` for a tombstone); ``settings``
    are compared at equal revisions."""

    name: str
    settings: tuple[str, ...]


APP_KIND = Kind(APP, SETTINGS)
POLICY_KIND = Kind(POLICY, ("app", *POLICY_FIELDS))
# Merged in this order: an app that arrives takes its policy in the same round.
KINDS = (APP_KIND, POLICY_KIND)
_KIND_BY_NAME = {kind.name: kind for kind in KINDS}


def state_digest(items: list[dict[str, Any]]) -> str:
    """The digest of an ``app_state``: the same items in any order give
    the same digest."""
    ordered = sorted(items, key=lambda item: (item.get("kind", APP), item["app"], bool(item.get("deleted"))))
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
    """A peer's app, policy or tombstone checked as the operation it stands
    for: its version and the clean arguments (``app_put``'s or
    ``autoscaling_put``'s, ``*_delete``'s for a tombstone); BadParameter
    otherwise."""
    return check_kind_item(item)[1:]


def check_kind_item(item: Any) -> tuple[Kind, Version, dict[str, Any]]:
    """``check_item``, with the kind of the item."""
    if not isinstance(item, dict):
        raise BadParameter("an app must be an object", parameter="app")
    kind = APP_KIND
    if "kind" in item:
        # An app's item has no kind; any other kind is named.
        named = _KIND_BY_NAME.get(item["kind"]) if isinstance(item["kind"], str) else None
        if named is None or named is APP_KIND:
            raise BadParameter("unknown kind of item", parameter="kind")
        kind = named
    arguments = {k: v for k, v in item.items() if k not in ("kind", "deleted")}
    if "deleted" in item:
        if item["deleted"] is not True or "revision" not in item:
            raise BadParameter("a deleted item is {app, revision, deleted: true}", parameter="deleted")
        clean = check_operation(f"{kind.name}_delete", arguments)
        return kind, Version(clean["revision"], True, ""), clean
    if "roll" in item:
        raise BadParameter("unknown parameter roll", parameter="roll")
    clean = check_operation(f"{kind.name}_put", arguments)
    clean.setdefault("revision", 0)
    return kind, Version(clean["revision"], False, _canonical(kind, clean)), clean


def _canonical(kind: Kind, clean: dict[str, Any]) -> str:
    return json.dumps({k: clean.get(k) for k in kind.settings}, sort_keys=True, separators=(",", ":"))


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
        for kind in KINDS:
            purged = self.local.store.purge_tombstones(self._horizon(), kind.name)
            if purged:
                log.info(
                    "forgot the deletion of {apps} ({kind})", apps=purged, kind=kind.name, event="app.tombstone.purged"
                )
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
        """A peer's apps, checked: name -> (version, clean arguments); see
        ``checked_kinds``."""
        return self.checked_kinds(agent, answer)[APP]

    def checked_kinds(self, agent: str, answer: Any) -> dict[str, dict[str, tuple[Version, dict[str, Any]]]]:
        """A peer's state, checked: kind -> name -> (version, clean
        arguments).  Items refused are logged and left out; a state too
        large (more than ``MAX_ITEMS`` of a kind) or naming an app twice in
        a kind is refused whole (BadParameter)."""
        if not isinstance(answer, list) or len(answer) > MAX_ITEMS * len(KINDS):
            raise BadParameter(f"an app state must be a list of at most {MAX_ITEMS} items", parameter="apps")
        theirs: dict[str, dict[str, tuple[Version, dict[str, Any]]]] = {kind.name: {} for kind in KINDS}
        for item in answer:
            try:
                kind, version, clean = check_kind_item(item)
            except SCSError as e:
                _refused(agent, e.message)
                continue
            of_kind = theirs[kind.name]
            if clean["app"] in of_kind:
                raise BadParameter("an app state names an app twice", parameter="apps")
            if len(of_kind) >= MAX_ITEMS:
                raise BadParameter(f"an app state must be a list of at most {MAX_ITEMS} items", parameter="apps")
            of_kind[clean["app"]] = (version, clean)
        return theirs

    def ours(self, kind: str = APP) -> dict[str, Version]:
        """This agent's versions of ``kind``, computed as a peer's are."""
        versions = {}
        for item in self.local.app_state():
            if item.get("kind", APP) != kind:
                continue
            try:
                versions[item["app"]] = check_item(item)[0]
            except SCSError:
                versions[item["app"]] = Version(item["revision"], bool(item.get("deleted")), "")
        return versions

    def merge(self, agent: str, answer: Any) -> list[str]:
        """Take from a peer's state what is newer than ours; the names
        changed here (a policy's as ``autoscaling:<app>``)."""
        try:
            theirs = self.checked_kinds(agent, answer)
        except SCSError as e:
            _refused(agent, e.message)
            return []
        horizon = self._horizon()
        changed = []
        for kind in KINDS:
            # Ours again for each kind: the apps merged may have taken
            # their policies with them.
            ours = self.ours(kind.name)
            for name in sorted(theirs[kind.name]):
                version, clean = theirs[kind.name][name]
                if version.deleted and version.revision < horizon:
                    continue  # a deletion forgotten here already
                if name in ours and not version > ours[name]:
                    continue
                if not self._apply(kind, name, version, clean):
                    continue
                changed.append(name if kind is APP_KIND else f"{kind.name}:{name}")
                log.info(
                    "{what_of} {app} {what} as {agent} has it (revision {revision})",
                    what_of="app" if kind is APP_KIND else "autoscaling policy of",
                    app=name,
                    what="deleted" if version.deleted else "updated",
                    agent=agent,
                    revision=version.revision,
                    kind=kind.name,
                    event="app.merged",
                )
        return changed

    def _apply(self, kind: Kind, name: str, version: Version, clean: dict[str, Any]) -> bool:
        """Store a peer's newer item here; whether it was."""
        local = self.local
        if kind is APP_KIND:
            if not version.deleted:
                local.app_put(**clean)
            elif not local.app_delete(name, revision=version.revision)["deleted"]:
                local.store.put_tombstone(name, version.revision)
            return True
        if version.deleted:
            if not local.autoscaling_delete(name, revision=version.revision)["deleted"]:
                local.store.put_tombstone(name, version.revision, POLICY)
            return True
        if not local.store.has_app(name):
            return False  # a policy is kept with its app only
        local.autoscaling_put(**clean)
        return True


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
