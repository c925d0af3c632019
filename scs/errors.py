"""Domain errors, each carrying the HTTP status the API answers with.

Everything the agent refuses is one of these; the API maps them to JSON
errors and SRS carries them between agents by ``code`` so that a refusal on
a remote agent reads the same as a local one.
"""

from __future__ import annotations

from typing import Any


class SCSError(Exception):
    """Base class: ``status`` is the HTTP code, ``details`` extra JSON fields."""

    status = 500
    code = "error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message}
        body.update(self.details)
        return body


class BadParameter(SCSError):
    status = 400
    code = "bad-parameter"


class Unauthorized(SCSError):
    status = 401
    code = "unauthorized"


class NotFound(SCSError):
    status = 404
    code = "not-found"


class MethodNotAllowed(SCSError):
    status = 405
    code = "method-not-allowed"


class Conflict(SCSError):
    status = 409
    code = "conflict"


class BodyTooLarge(SCSError):
    status = 413
    code = "body-too-large"


class WorkerFailed(SCSError):
    """The instance exists, but its worker cannot start (it keeps exiting
    before it answers: a bad ``celery_app``, a broker that refuses it)."""

    status = 502
    code = "worker-failed"


class Unavailable(SCSError):
    status = 503
    code = "unavailable"


class GatewayTimeout(SCSError):
    status = 504
    code = "timeout"


ERRORS_BY_CODE: dict[str, type[SCSError]] = {
    cls.code: cls
    for cls in (
        SCSError,
        BadParameter,
        Unauthorized,
        NotFound,
        MethodNotAllowed,
        Conflict,
        BodyTooLarge,
        WorkerFailed,
        Unavailable,
        GatewayTimeout,
    )
}


def error_from_json(code: str, body: dict[str, Any]) -> SCSError:
    """Rebuild an error that another agent sent as ``code`` and JSON body."""
    cls = ERRORS_BY_CODE.get(code, SCSError)
    details = {k: v for k, v in body.items() if k != "error"}
    return cls(str(body.get("error", "error")), **details)
