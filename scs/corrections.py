"""What to tell a running worker so that its queues and autoscale range match
its instance: a pure function of the spec and of what the worker reports.

Queues declared with the plain binding reach the worker through ``-Q`` at
start; any other binding, and any queue added since, through Celery's
``add_consumer``.  A queue the worker consumes but the instance does not
list is cancelled, except the instance's private ``dq.<name>``, which is
never cancelled and is added back if the worker lost it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from scs.records import InstanceSpec, QueueBinding
from scs.worker import private_queue


@attrs.frozen
class AddConsumer:
    """``add_consumer`` with the queue's binding."""

    queue: str
    exchange: str
    routing_key: str
    exchange_type: str | None = None
    event = "node.consume_from"


@attrs.frozen
class CancelConsumer:
    """``cancel_consumer`` of a queue the instance no longer lists."""

    queue: str
    event = "node.cancel_consume_from"


@attrs.frozen
class Autoscale:
    """``autoscale`` to the instance's concurrency range."""

    max: int
    min: int
    event = "node.autoscale"


Correction = AddConsumer | CancelConsumer | Autoscale


def _add(binding: QueueBinding) -> AddConsumer:
    return AddConsumer(
        binding.name,
        exchange=binding.exchange or binding.name,
        routing_key=binding.routing_key or binding.name,
        exchange_type=binding.exchange_type,
    )


def corrections(
    spec: InstanceSpec,
    queues: Sequence[str] | None,
    autoscaler: Mapping[str, Any] | None,
) -> list[Correction]:
    """The commands that bring a worker to ``spec``, in the order to send
    them: consumers to add (the private queue first, then the spec's order),
    consumers to cancel (by name), then autoscale.

    ``queues`` are the queue names the worker reports consuming and
    ``autoscaler`` its ``stats()["autoscaler"]``; ``None`` for either means
    the worker did not say, and nothing is corrected on that side."""
    result: list[Correction] = []
    if queues is not None:
        dq = private_queue(spec.name)
        have = set(queues)
        wanted = [QueueBinding(dq, dq, dq), *spec.queues]
        names = [q.name for q in wanted]
        for i, binding in enumerate(wanted):
            if binding.name not in have and binding.name not in names[:i]:
                result.append(_add(binding))
        result += [CancelConsumer(q) for q in sorted(have - set(names)) if q != dq]
    if autoscaler is not None:
        want = (spec.max_concurrency, spec.min_concurrency)
        if (autoscaler.get("max"), autoscaler.get("min")) != want:
            result.append(Autoscale(*want))
    return result


__all__ = ["AddConsumer", "Autoscale", "CancelConsumer", "Correction", "corrections"]
