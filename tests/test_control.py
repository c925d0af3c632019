"""Unit tests of scs.control.CeleryControl with a stand-in Celery control
object and a thread pool that runs its work inline (so no thread, no broker)."""

from __future__ import annotations

from typing import Any

from kombu.exceptions import OperationalError
from twisted.trial.unittest import SynchronousTestCase

from scs.control import BrokerUnavailable, CeleryControl, CommandFailed
from scs.errors import GatewayTimeout, Unavailable

URL = "amqp://guest:guest@127.0.0.1:5672//"


class InlinePool:
    """Runs callInThreadWithCallback work at once; counts what it ran."""

    def __init__(self) -> None:
        self.ran = 0

    def callInThreadWithCallback(self, onResult: Any, f: Any, *a: Any, **kw: Any) -> None:
        self.ran += 1
        try:
            result = f(*a, **kw)
        except BaseException:  # noqa: BLE001 - as Twisted's thread pool: every error goes to onResult
            from twisted.python.failure import Failure

            onResult(False, Failure())
        else:
            onResult(True, result)


class InlineReactor:
    def callFromThread(self, f: Any, *a: Any, **kw: Any) -> None:
        f(*a, **kw)


class StubInspect:
    def __init__(self, owner: StubControl, destination: list[str], timeout: float) -> None:
        owner.calls.append(("inspect", destination, timeout))
        self.owner = owner

    def active_queues(self) -> Any:
        return self.owner.replies["active_queues"]

    def stats(self) -> Any:
        return self.owner.replies["stats"]


class StubControl:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.replies: dict[str, Any] = {}
        self.raise_: BaseException | None = None

    def _reply(self, name: str, *a: Any, **kw: Any) -> Any:
        self.calls.append((name, a, kw))
        if self.raise_ is not None:
            raise self.raise_
        return self.replies.get(name)

    def ping(self, **kw: Any) -> Any:
        return self._reply("ping", **kw)

    def inspect(self, destination: list[str], timeout: float) -> StubInspect:
        if self.raise_ is not None:
            raise self.raise_
        return StubInspect(self, destination, timeout)

    def add_consumer(self, queue: str, **kw: Any) -> Any:
        return self._reply("add_consumer", queue, **kw)

    def cancel_consumer(self, queue: str, **kw: Any) -> Any:
        return self._reply("cancel_consumer", queue, **kw)

    def autoscale(self, max: int, min: int, **kw: Any) -> Any:
        return self._reply("autoscale", max, min, **kw)


class StubApp:
    def __init__(self) -> None:
        self.control = StubControl()
        self.closed = False

    def close(self) -> None:
        self.closed = True


class ControlTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pool = InlinePool()
        self.control = CeleryControl(reactor=InlineReactor(), threadpool=self.pool)
        self.app = StubApp()
        self.control._apps[URL] = self.app
        self.stub = self.app.control

    def test_ping_batch_names_destination(self) -> None:
        self.stub.replies["ping"] = [{"a@h": {"ok": "pong"}}, {"b@h": {"ok": "pong"}}]
        got = self.successResultOf(self.control.ping(URL, ["a@h", "b@h", "c@h"], 0.5))
        self.assertEqual(got, {"a@h", "b@h"})
        self.assertEqual(self.stub.calls, [("ping", (), {"destination": ["a@h", "b@h", "c@h"], "timeout": 0.5})])
        self.assertEqual(self.pool.ran, 1)  # in the pool, not inline in the caller

    def test_ping_no_replies(self) -> None:
        self.stub.replies["ping"] = None
        self.assertEqual(self.successResultOf(self.control.ping(URL, ["a@h"], 0.1)), set())

    def test_active_queues_names(self) -> None:
        self.stub.replies["active_queues"] = {
            "a@h": [{"name": "dq.a"}, {"name": "tasks"}],
            "b@h": {"error": "nope"},
        }
        got = self.successResultOf(self.control.active_queues(URL, ["a@h", "b@h"], 1.0))
        self.assertEqual(got, {"a@h": ["dq.a", "tasks"]})
        self.assertEqual(self.stub.calls, [("inspect", ["a@h", "b@h"], 1.0)])

    def test_stats(self) -> None:
        self.stub.replies["stats"] = {"a@h": {"autoscaler": {"max": 2, "min": 1}}}
        got = self.successResultOf(self.control.stats(URL, ["a@h"], 1.0))
        self.assertEqual(got["a@h"]["autoscaler"]["max"], 2)
        self.stub.replies["stats"] = None
        self.assertEqual(self.successResultOf(self.control.stats(URL, ["a@h"], 1.0)), {})

    def test_add_consumer_carries_binding(self) -> None:
        self.stub.replies["add_consumer"] = [{"a@h": {"ok": "add consumer q"}}]
        got = self.successResultOf(
            self.control.add_consumer(
                URL, "a@h", "q", exchange="ex", routing_key="rk", exchange_type="topic", timeout=2.0
            )
        )
        self.assertEqual(got, "add consumer q")
        ((name, args, kw),) = self.stub.calls
        self.assertEqual(args, ("q",))
        self.assertEqual(
            kw,
            {
                "exchange": "ex",
                "exchange_type": "topic",
                "routing_key": "rk",
                "destination": ["a@h"],
                "reply": True,
                "timeout": 2.0,
            },
        )

    def test_add_consumer_defaults_to_queue_name(self) -> None:
        self.stub.replies["add_consumer"] = [{"a@h": {"ok": "ok"}}]
        self.successResultOf(self.control.add_consumer(URL, "a@h", "q"))
        kw = self.stub.calls[0][2]
        self.assertEqual((kw["exchange"], kw["routing_key"], kw["exchange_type"]), ("q", "q", "direct"))

    def test_command_error_reply(self) -> None:
        self.stub.replies["autoscale"] = [{"a@h": {"error": "autoscale not enabled"}}]
        f = self.failureResultOf(self.control.autoscale(URL, "a@h", 3, 1), CommandFailed)
        self.assertIn("autoscale not enabled", f.getErrorMessage())

    def test_command_no_reply_is_timeout(self) -> None:
        self.stub.replies["cancel_consumer"] = [{"other@h": {"ok": "x"}}]
        self.failureResultOf(self.control.cancel_consumer(URL, "a@h", "q"), GatewayTimeout)

    def test_broker_errors_are_unavailable(self) -> None:
        self.stub.raise_ = OperationalError("[Errno 111] Connection refused")
        f = self.failureResultOf(self.control.ping(URL, ["a@h"], 0.1), BrokerUnavailable)
        self.assertTrue(f.check(Unavailable))
        self.failureResultOf(self.control.stats(URL, ["a@h"], 0.1), Unavailable)
        self.stub.raise_ = ConnectionRefusedError()
        self.failureResultOf(self.control.autoscale(URL, "a@h", 1, 1), Unavailable)

    def test_other_errors_pass_through(self) -> None:
        self.stub.raise_ = KeyError("bug")
        self.failureResultOf(self.control.ping(URL, ["a@h"], 0.1), KeyError)

    def test_concurrency_bounded_per_broker(self) -> None:
        """At most MAX_CONCURRENT calls per broker are in threads at once;
        the others wait their turn (kombu's pool would deadlock)."""
        from scs import control as control_module

        class HoldingPool(InlinePool):
            def __init__(self) -> None:
                super().__init__()
                self.held: list = []

            def callInThreadWithCallback(self, onResult, f, *a, **kw):
                self.held.append((onResult, f))

        pool = HoldingPool()
        control = CeleryControl(reactor=InlineReactor(), threadpool=pool)
        control._apps[URL] = self.app
        control._apps["amqp://other//"] = StubApp()
        self.stub.replies["ping"] = []
        ds = [control.ping(URL, ["a@h"], 0.1) for _ in range(10)]
        other = control.ping("amqp://other//", ["a@h"], 0.1)
        self.assertEqual(len(pool.held), control_module.MAX_CONCURRENT + 1)
        while pool.held:
            onResult, f = pool.held.pop(0)
            onResult(True, f())
        for d in ds + [other]:
            self.assertEqual(self.successResultOf(d), set())

    def test_close_closes_apps(self) -> None:
        self.control.close()
        self.assertTrue(self.app.closed)
        self.assertEqual(self.control._apps, {})


class AppCacheTests(SynchronousTestCase):
    def test_one_app_per_broker_not_current(self) -> None:
        from celery import current_app

        control = CeleryControl(reactor=InlineReactor(), threadpool=InlinePool(), connect_timeout=0.5)
        a = control.app(URL)
        self.assertIs(control.app(URL), a)
        b = control.app("amqp://guest:guest@127.0.0.1:5673//")
        self.assertIsNot(a, b)
        self.assertIsNot(current_app._get_current_object(), a)
        self.assertEqual(a.conf.broker_connection_timeout, 0.5)
        self.assertFalse(a.conf.broker_connection_retry)
        # kombu's process-wide pool limit is left alone (see _run).
        self.assertEqual(a.conf.broker_pool_limit, 10)
        control.close()

    def test_broker_alive_false_on_refused_port(self) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # Bound but not listening: connections are refused at once.
        control = CeleryControl(reactor=InlineReactor(), threadpool=InlinePool())
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
            alive = self.successResultOf(control.broker_alive(f"amqp://guest:guest@127.0.0.1:{port}//", timeout=0.5))
        self.assertIs(alive, False)
