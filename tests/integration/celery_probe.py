"""Celery's own client, as the tests use it to check real workers."""

from __future__ import annotations

from functools import cache
from typing import Any

from celery import Celery

BROKER = "amqp://guest:guest@127.0.0.1:5672//"


@cache
def celery_client(broker: str = BROKER) -> Celery:
    return Celery(broker=broker, set_as_current=False)


def node_pattern(instance: str) -> dict[str, str]:
    """Celery's broadcast filter for the worker of ``instance``, whatever
    agent runs it: its node name is ``<instance>@<agent id>``."""
    return {"pattern": f"{instance}@*", "matcher": "glob"}


def of_instance(replies: dict[str, Any] | None, instance: str) -> Any:
    """The reply of ``instance``'s worker among a broadcast's replies."""
    for node, reply in (replies or {}).items():
        if node.startswith(f"{instance}@"):
            return reply
    return None


def ping(instance: str, broker: str = BROKER, timeout: float = 1.0) -> bool:
    replies = celery_client(broker).control.ping(timeout=timeout, limit=1, **node_pattern(instance))
    return any(of_instance(reply, instance) is not None for reply in replies or ())


def inspect(instance: str, broker: str = BROKER, timeout: float = 1.0) -> Any:
    return celery_client(broker).control.inspect(timeout=timeout, limit=1, **node_pattern(instance))


def active_queues(instance: str, broker: str = BROKER) -> list[dict[str, Any]] | None:
    return of_instance(inspect(instance, broker).active_queues(), instance)


def broadcast_ping_replies(broker: str = BROKER, timeout: float = 2.0) -> list[str]:
    """Every node that answers a broadcast ping, once per reply."""
    replies = celery_client(broker).control.ping(timeout=timeout) or []
    return [name for reply in replies for name in reply]
