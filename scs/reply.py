"""What every façade operation returns to the surfaces that called it,
and ``as_deferred``, how the façade's parts wait for a ``LocalAgent``
operation (which answers a value, a Deferred or a coroutine)."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed


@attrs.frozen
class Reply:
    body: Any
    status: int = 200
    missing: tuple[str, ...] = ()


def as_deferred(result: Any) -> Deferred:
    if isinstance(result, Deferred):
        return result
    if hasattr(result, "__await__") and hasattr(result, "send"):
        return Deferred.fromCoroutine(result)
    return succeed(result)
