"""Sealing and publishing SRS messages (the sending half of ``scs.srs``),
and recognising one of ours that the broker handed back (``recall``)."""

from __future__ import annotations

import json
from typing import Any

import attr
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from scs.srs_trust import MessageCodec
from scs.srs_wire import DIRECT, ISRSTransport

log = Logger(namespace="scs.srs")


@attr.s(auto_attribs=True, frozen=True)
class Sent:
    """The routing header of a message this agent sent (see ``Outbox.recall``)."""

    type: str
    to: str
    cid: str | None
    # When we sealed it (our clock).
    ts: float


class Outbox:
    """Every message this agent sends: sealed by the codec, published by the
    transport; a failure is logged and handed back to the caller."""

    def __init__(self, agent_id: str, incarnation: str, codec: MessageCodec, transport: ISRSTransport) -> None:
        self.agent_id = agent_id
        self.incarnation = incarnation
        self.codec = codec
        self.transport = transport

    def send(
        self,
        kind: str,
        key: str,
        message_type: str,
        payload: dict[str, Any],
        *,
        to: str | None = None,
        cid: str | None = None,
        reply_to: str | None = None,
        re: str | None = None,
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
                message_type, self.agent_id, self.incarnation, to, payload, cid=cid, reply_to=reply_to, re=re
            )
            if mandatory:
                d = self.transport.publish(kind, key, body, properties, mandatory=True)
            else:
                d = self.transport.publish(kind, key, body, properties)
        except Exception:  # noqa: BLE001 - the caller gets the failure as a Deferred
            d = defer.fail()

        def failed(f: Failure) -> Failure:
            log.warn(
                "SRS could not send {type} ({kind}): {error}",
                type=message_type,
                kind=kind,
                error=f.getErrorMessage(),
                event="srs.send.failed",
            )
            return f

        d.addErrback(failed)
        return d

    def recall(self, body: bytes) -> Sent | None:
        """The header of a message we published that the broker returned
        (mandatory, no queue bound to its key); None if it is not one of ours.

        Only the broker sends ``basic.return``, and only on our channel for
        our own publishes, so the clear routing header (type, ``to``, cid:
        the payload alone is sealed) is read without the codec: opening it
        would refuse it as addressed to another agent."""
        try:
            inner = json.loads(json.loads(body)["m"])
        except (ValueError, TypeError, KeyError, RecursionError):
            return None
        if not isinstance(inner, dict):
            return None
        kind, to, cid, ts = inner.get("type"), inner.get("to"), inner.get("cid"), inner.get("ts")
        if (
            inner.get("sender") != self.agent_id
            or inner.get("incarnation") != self.incarnation
            or not isinstance(kind, str)
            or not isinstance(to, str)
            or not (cid is None or isinstance(cid, str))
            or isinstance(ts, bool)
            or not isinstance(ts, (int, float))
        ):
            return None
        return Sent(kind, to, cid, float(ts))
