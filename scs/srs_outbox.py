"""Sealing and publishing SRS messages (the sending half of ``scs.srs``)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from scs.srs_trust import MessageCodec
from scs.srs_wire import DIRECT, ISRSTransport

log = Logger(namespace="scs.srs")


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
