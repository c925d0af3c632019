"""The wire under SRS: what a transport must do, and the AMQP names.

``scs.srs`` speaks to an ``ISRSTransport`` (``scs.amqp.AMQPTransport`` on
a real broker, ``scs.testing.FakeTransport`` in tests) and receives through
``ITransportReceiver``.  Both sides name exchanges, routing keys and queues
with the functions here, so that every transport agrees.

Topology:

* a direct exchange ``scs.<cluster>.direct``: each agent's private queue is
  bound under ``routing_key(agent_id)``; requests to one agent go there, and
  so do a scatter's (one per live peer) and probes, ``mandatory``: the broker
  returns one whose agent has no queue (killed) at once;
* a fanout exchange ``scs.<cluster>.fanout``: every private queue is bound;
  heartbeats, broadcasts and ``gone`` notices go there;
* replies go through the default exchange straight to the asker's private
  queue, matched by correlation id.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

# Publish kinds understood by every transport.
DIRECT = "direct"  # key: the target agent id (the transport applies routing_key)
FANOUT = "fanout"  # key ignored: every agent of the cluster
REPLY = "reply"  # key: the asker's private queue name, from its reply-to


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

    def transport_disconnected(reason: Failure | None) -> None:
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
