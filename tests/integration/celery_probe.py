"""Celery's own client, as the tests use it to check real workers."""

from __future__ import annotations

import socket
from functools import cache
from typing import Any

from celery import Celery

BROKER = "amqp://guest:guest@127.0.0.1:5672//"


@cache
def celery_client(broker: str = BROKER) -> Celery:
    return Celery(broker=broker, set_as_current=False)


def node_name(instance: str) -> str:
    return f"{instance}@{socket.gethostname()}"


def ping(instance: str, broker: str = BROKER, timeout: float = 1.0) -> bool:
    replies = celery_client(broker).control.ping(destination=[node_name(instance)], timeout=timeout)
    return any(node_name(instance) in reply for reply in replies or ())


def inspect(instance: str, broker: str = BROKER, timeout: float = 1.0) -> Any:
    return celery_client(broker).control.inspect(destination=[node_name(instance)], timeout=timeout)


def active_queues(instance: str, broker: str = BROKER) -> list[dict[str, Any]] | None:
    answer = inspect(instance, broker).active_queues() or {}
    return answer.get(node_name(instance))


def broadcast_ping_replies(broker: str = BROKER, timeout: float = 2.0) -> list[str]:
    """Every node that answers a broadcast ping, once per reply."""
    replies = celery_client(broker).control.ping(timeout=timeout) or []
    return [name for reply in replies for name in reply]
