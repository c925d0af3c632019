"""Every agent keeps a copy of every peer's instances (DESIGN §9.3).

Each instance travels as a *document*: its settings and desired state, the
agent it was moved from, and its worker's pid (for listing it while its
owner is dead).  A peer's heartbeat carries the digest of its documents;
when the digest differs from the copy's, the copy is fetched again whole
(``instance_export``).  That is anti-entropy, not "send every change
once": a missed message, a restart on either side or a copy lost with its
store is repaired at the next heartbeat, and a steady cluster costs one
digest per heartbeat.

A peer's documents are a door like any other: each is checked by
:func:`check_document` with the API's own validators before it is kept,
and their number is bounded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from scs import validation as v
from scs.errors import BadParameter, SCSError
from scs.records import InstanceSpec, WorkerStatus
from scs.store import Store

log = Logger(namespace="scs.replica")

# A peer's copy holds at most this many instances; a bigger export is
# refused.  Checking, storing and fencing a full copy stays well under a
# second of the reactor thread.
MAX_DOCUMENTS = 2_000
# A peer's copy is fetched at most once per this many seconds, however
# often its digest changes.
MIN_FETCH_INTERVAL = 2.0

DOCUMENT_FIELDS = (
    "name",
    "app",
    "is_enabled",
    "max_concurrency",
    "min_concurrency",
    "broker",
    "arguments",
    "queues",
    "moved_from",
    "pid",
)


@attrs.frozen
class PeerView:
    """What the replicas need of a member: is it alive, and its digest."""

    id: str
    alive: bool
    digest: str


def instance_document(spec: InstanceSpec, app_broker_url: str | None, status: WorkerStatus) -> dict[str, Any]:
    """What a peer keeps of ``spec`` to re-create it: ``broker`` only when
    the instance has one of its own (else it follows its app's)."""
    return {
        "name": spec.name,
        "app": spec.app,
        "is_enabled": spec.is_enabled,
        "max_concurrency": spec.max_concurrency,
        "min_concurrency": spec.min_concurrency,
        "broker": None if spec.broker.url == app_broker_url else spec.broker.url,
        "arguments": list(spec.node_arguments),
        "queues": [binding.to_json() for binding in spec.queues],
        "moved_from": spec.moved_from,
        "pid": status.pid,
    }


def digest(documents: list[dict[str, Any]]) -> str:
    """The same documents, in any order, give the same digest."""
    return sorted_digest(documents, key=lambda d: d["name"])


def sorted_digest(items: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> str:
    """The digest of JSON ``items`` put in ``key`` order (their canonical
    JSON), so that the same items in any order give the same digest: what a
    heartbeat carries for a peer to compare with its copy."""
    text = json.dumps(sorted(items, key=key), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def check_document(document: Any) -> dict[str, Any]:
    """A clean copy of a peer's instance document, or BadParameter."""
    if not isinstance(document, Mapping):
        raise BadParameter("an instance document must be an object", parameter="document")
    v.only(dict(document), DOCUMENT_FIELDS)
    for field in DOCUMENT_FIELDS:
        if field not in document:
            raise BadParameter(f"instance document lacks {field}", parameter=field)
    is_enabled = document["is_enabled"]
    if not isinstance(is_enabled, bool):
        raise BadParameter("is_enabled must be a boolean", parameter="is_enabled")
    max_concurrency = v.check_concurrency(document["max_concurrency"], "max_concurrency")
    min_concurrency = v.check_concurrency(document["min_concurrency"], "min_concurrency")
    v.check_concurrency_range(max_concurrency, min_concurrency)
    queues = document["queues"]
    if not isinstance(queues, list) or len(queues) > v.MAX_QUEUES:
        raise BadParameter("queues must be a short list of queue declarations", parameter="queues")
    bindings = []
    for queue in queues:
        if not isinstance(queue, Mapping):
            raise BadParameter("a queue declaration must be an object", parameter="queues")
        v.only(dict(queue), ("name", "exchange", "routing_key", "exchange_type", "options"))
        bindings.append(v.queue_binding(queue.get("name"), queue).to_json())
    pid = document["pid"]
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2**31):
        raise BadParameter("pid must be a process id or null", parameter="pid")
    moved_from = document["moved_from"]
    return {
        "name": v.check_instance_name(document["name"]),
        "app": v.check_app_name(document["app"]),
        "is_enabled": is_enabled,
        "max_concurrency": max_concurrency,
        "min_concurrency": min_concurrency,
        "broker": None if document["broker"] is None else v.check_broker_url(document["broker"]),
        "arguments": list(v.check_arguments(document["arguments"])),
        "queues": bindings,
        "moved_from": None if moved_from is None else v.check_name(moved_from, "moved_from"),
        "pid": pid,
    }


def check_documents(documents: Any) -> list[dict[str, Any]]:
    if not isinstance(documents, list) or len(documents) > MAX_DOCUMENTS:
        raise BadParameter(f"an export must be a list of at most {MAX_DOCUMENTS} documents", parameter="documents")
    clean = [check_document(document) for document in documents]
    if len({d["name"] for d in clean}) != len(clean):
        raise BadParameter("an export names an instance twice", parameter="documents")
    return clean


class Replicas:
    """Keeps this agent's copy of its peers' instances current.

    ``members()`` gives the SRS members (``id``, ``alive``, ``digest``);
    ``fetch(agent)`` asks one for its documents (a Deferred);
    ``on_synced(agent)`` runs after a copy changed (the fence, below).
    """

    def __init__(
        self,
        store: Store,
        agent_id: str,
        members: Callable[[], list[Any]],
        fetch: Callable[[str], Deferred],
        clock: Any,
        on_synced: Callable[[str], None] = lambda agent: None,
        forget_after: float = 86400.0,
    ) -> None:
        self.store = store
        self.agent_id = agent_id
        self.members = members
        self.fetch = fetch
        self.clock = clock
        self.on_synced = on_synced
        self._fetching: set[str] = set()
        self._fetched_at: dict[str, float] = {}
        # A copy of a peer gone from the membership table is kept this long
        # after its last refresh (what it held stays listed), then dropped.
        self.forget_after = forget_after

    def stale(self) -> list[str]:
        """Live peers whose heartbeat digest differs from our copy's."""
        held = self.store.replicas.digests()
        return [
            member.id
            for member in self.members()
            if member.id != self.agent_id and member.alive and member.digest and held.get(member.id) != member.digest
        ]

    def synced(self) -> bool:
        """Every live peer's copy is current (a fresh start waits for this)."""
        return not self.stale()

    def sync(self) -> Deferred:
        """Fetch the copies that are stale, one request per peer at a time;
        drop those of peers long forgotten."""
        known = {member.id for member in self.members()}
        now = self.clock.seconds()
        for owner, synced_at in self.store.replicas.synced_at().items():
            if owner not in known and now - synced_at > self.forget_after:
                log.info("forgot the copy of {agent}'s instances", agent=owner, event="replica.forgotten")
                self.store.replicas.drop(owner)
        due = [
            agent
            for agent in self.stale()
            if agent not in self._fetching
            and now - self._fetched_at.get(agent, -MIN_FETCH_INTERVAL) >= MIN_FETCH_INTERVAL
        ]
        fetches = [Deferred.fromCoroutine(self._sync_one(agent)) for agent in due]
        return DeferredList(fetches, consumeErrors=True)

    async def _sync_one(self, agent: str) -> None:
        self._fetching.add(agent)
        self._fetched_at[agent] = self.clock.seconds()
        try:
            answer = await self.fetch(agent)
            documents = check_documents(answer)
        except SCSError as e:
            log.warn("replica of {agent} not refreshed: {error}", agent=agent, error=e.message, event="replica.refused")
            return
        finally:
            self._fetching.discard(agent)
        self.store.replicas.put(agent, digest(documents), documents, self.clock.seconds())
        log.debug("replica of {agent}: {count} instances", agent=agent, count=len(documents), event="replica.synced")
        self.on_synced(agent)

    def forget(self, agent: str) -> None:
        """A peer gone from the membership table for good."""
        self.store.replicas.drop(agent)
