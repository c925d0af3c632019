"""scs.corrections.corrections: what a worker is told, from its spec and what
it reports.  A pure function: each case is (spec, reported queues, reported
autoscaler) -> the corrections, in order."""

from __future__ import annotations

import pytest

from scs.corrections import AddConsumer, Autoscale, CancelConsumer, corrections
from scs.records import BrokerInfo, InstanceSpec, QueueBinding

BROKER = BrokerInfo.from_url("amqp://guest:guest@127.0.0.1:5672//")
TASKS = QueueBinding("tasks", "tasks", "tasks")
ODD = QueueBinding("odd", "ex", "rk", "topic")
BARE = QueueBinding("bare", "", "")


def spec(queues=(), max=1, min=1):
    return InstanceSpec(
        name="w1", app="foo", broker=BROKER, queues=tuple(queues), max_concurrency=max, min_concurrency=min
    )


SCALED = {"max": 1, "min": 1, "current": 1}

CASES = [
    pytest.param(spec(), ["dq.w1"], SCALED, [], id="nothing to do"),
    pytest.param(spec(), None, None, [], id="worker said nothing"),
    pytest.param(spec(), [], None, [AddConsumer("dq.w1", "dq.w1", "dq.w1")], id="private queue added back"),
    pytest.param(
        spec(),
        ["celery"],
        None,
        [AddConsumer("dq.w1", "dq.w1", "dq.w1"), CancelConsumer("celery")],
        id="private back, stranger cancelled",
    ),
    pytest.param(spec([TASKS]), ["dq.w1"], None, [AddConsumer("tasks", "tasks", "tasks")], id="plain queue added"),
    pytest.param(spec([ODD]), ["dq.w1"], None, [AddConsumer("odd", "ex", "rk", "topic")], id="binding carried"),
    pytest.param(
        spec([BARE]),
        ["dq.w1"],
        None,
        [AddConsumer("bare", "bare", "bare")],
        id="empty exchange and key default to the name",
    ),
    pytest.param(
        spec([TASKS, ODD]),
        ["dq.w1", "z", "a", "tasks"],
        None,
        [AddConsumer("odd", "ex", "rk", "topic"), CancelConsumer("a"), CancelConsumer("z")],
        id="adds in spec order, cancels sorted",
    ),
    pytest.param(spec(), ["dq.w1"], {"max": 1, "min": 1}, [], id="autoscale right"),
    pytest.param(spec(max=4, min=2), ["dq.w1"], SCALED, [Autoscale(4, 2)], id="autoscale corrected"),
    pytest.param(spec(max=4, min=2), ["dq.w1"], {}, [Autoscale(4, 2)], id="no autoscaler reported"),
    pytest.param(
        spec([ODD], max=3),
        ["x"],
        SCALED,
        [
            AddConsumer("dq.w1", "dq.w1", "dq.w1"),
            AddConsumer("odd", "ex", "rk", "topic"),
            CancelConsumer("x"),
            Autoscale(3, 1),
        ],
        id="everything, in order",
    ),
    pytest.param(
        spec([QueueBinding("dq.w1", "dq.w1", "dq.w1")]),
        [],
        None,
        [AddConsumer("dq.w1", "dq.w1", "dq.w1")],
        id="private queue listed twice is added once",
    ),
]


@pytest.mark.parametrize(("instance", "queues", "autoscaler", "expected"), CASES)
def test_corrections(instance, queues, autoscaler, expected) -> None:
    assert corrections(instance, queues, autoscaler) == expected


@pytest.mark.parametrize("reported", [["dq.w1"], ["dq.w1", "other"], ["other", "dq.w1", "more"]])
def test_private_queue_is_never_cancelled(reported) -> None:
    assert CancelConsumer("dq.w1") not in corrections(spec(), reported, None)


def test_event_names() -> None:
    assert (AddConsumer.event, CancelConsumer.event, Autoscale.event) == (
        "node.consume_from",
        "node.cancel_consume_from",
        "node.autoscale",
    )
