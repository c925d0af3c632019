"""The replies to peers' requests, and running a request here.

A handler's result travels as ``{"ok": true, "result": ...}``; an
``SCSError`` as ``{"ok": false, "error": {"code", "body"}}`` so that the
asker re-raises the same class (``outcome``); anything else is an internal
error whose details stay in this agent's log.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from scs.errors import SCSError, error_from_json
from scs.srs_wire import encode_message


def ok_payload(result: Any, log: Logger) -> dict[str, Any]:
    payload = {"ok": True, "result": result}
    try:
        encode_message(payload)
    except (TypeError, ValueError) as e:
        log.error("SRS handler result is not JSON: {error}", error=str(e))
        return {"ok": False, "error": {"code": SCSError.code, "body": {"error": "result is not JSON"}}}
    return payload


def error_payload(failure: Failure, op: Any, agent_id: str, log: Logger) -> dict[str, Any]:
    if failure.check(SCSError):
        error: SCSError = failure.value
        code, body = error.code, error.to_json()
    else:
        log.failure("SRS handler failed on {op}", failure, op=op)
        code, body = SCSError.code, {"error": f"internal error on agent {agent_id}"}
    payload = {"ok": False, "error": {"code": code, "body": body}}
    try:
        encode_message(payload)
    except (TypeError, ValueError):
        payload["error"]["body"] = {"error": str(body.get("error"))}
    return payload


def outcome(payload: dict[str, Any]) -> Any:
    """What a reply says: the result, or the SCSError to raise."""
    if payload.get("ok") is True:
        return payload.get("result")
    error = payload.get("error")
    if not isinstance(error, dict):
        error = {}
    body = error.get("body")
    return error_from_json(str(error.get("code", SCSError.code)), body if isinstance(body, dict) else {})


def run_here(handler: Callable[[str, dict], Any], op: str, args: dict, agent_id: str, log: Logger) -> Deferred:
    """Run a request for this agent itself, answering as a peer would: the
    result passed through JSON, unexpected errors hidden."""
    d = defer.maybeDeferred(handler, op, args)

    def same_as_remote(result: Any) -> Any:
        return json.loads(encode_message({"r": result}))["r"]

    def wrap_unexpected(f: Failure) -> Failure:
        if f.check(SCSError):
            return f
        log.failure("SRS handler failed on {op}", f, op=op)
        return Failure(SCSError(f"internal error on agent {agent_id}"))

    d.addCallbacks(same_as_remote, wrap_unexpected)
    return d
