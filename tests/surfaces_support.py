"""Shared by the unit tests of the operator surfaces (admin page, metrics,
access control): an agent on an in-memory store with a fake supervisor,
the real site built as ``makeService`` builds it, and a tiny browser on
``StubTreq`` that keeps cookies and reads the anti-forgery token."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

import attrs
import treq
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from treq.testing import RequestTraversalAgent, _SynchronousProducer
from twisted.internet.defer import Deferred, succeed

from scs.agent import Agent, LocalAgent
from scs.http.auth import TokenAuth
from scs.metrics import AgentMetrics
from scs.records import WorkerStatus
from scs.store import Store
from scs.tap import http_resource

BROKER = "amqp://guest:guest@127.0.0.1:5672//"
BASE = "http://127.0.0.1:8001"
TOKEN = "s3cret-token-0123456789abcdef"
_CSRF = re.compile(rb'name="csrf" value="([0-9a-f]+)"')


class FakeSupervisor:
    """Stands in for the supervisor: every instance runs, with a pid."""

    def __init__(self) -> None:
        self.states: dict[str, WorkerStatus] = {}
        self.wakes = 0
        self.restarted: list[str] = []

    def wake(self) -> Deferred:
        self.wakes += 1
        return succeed(None)

    def status(self, name: str) -> WorkerStatus:
        return self.states.get(name, WorkerStatus(state="running", pid=4242, restarts=0))

    def wait_ready(self, name: str, timeout: float) -> Deferred:
        return succeed(True)

    def hold_reconfigure(self, app: str, seconds: float) -> None:
        self.held = getattr(self, "held", []) + [(app, seconds)]

    def reset(self, name: str) -> None:
        pass

    def restart(self, name: str) -> Deferred:
        self.restarted.append(name)
        return succeed(None)

    def active_queues(self, name: str) -> Deferred:
        return succeed([f"dq.{name}"])

    def stats(self, name: str) -> Deferred:
        return succeed({"autoscaler": {"max": 1, "min": 1}})


class _NoCookies(IndexableCookieJar):
    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


@attrs.define
class Response:
    code: int
    headers: Any
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


class Surfaces:
    """One agent with its whole HTTP site, and a client with a cookie jar."""

    def __init__(self, token: str | None = None, agent: Agent | None = None) -> None:
        self.store = Store.in_memory()
        self.supervisor = FakeSupervisor()
        self.agent = agent or Agent(LocalAgent(self.store, "agent1", BROKER, self.supervisor))
        if agent is not None:
            self.store = agent.store
        self.auth = TokenAuth(token) if token else None
        self.metrics = AgentMetrics(self.agent)
        self.transport = RequestTraversalAgent(http_resource(self.agent, self.metrics, self.auth))
        # treq's own cookie jar is replaced by one that keeps nothing: the
        # tests decide which cookies each request carries (``self.cookies``).
        self.client = HTTPClient(
            agent=self.transport, data_to_body_producer=_SynchronousProducer, cookiejar=_NoCookies()
        )
        self.cookies: dict[str, str] = {}

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        cookies: bool = True,
    ) -> Response:
        sent = dict(headers or {})
        if cookies and self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        outcome: list[Any] = []
        d = self.client.request(
            method,
            BASE + path,
            data=body,
            headers={k: [v] for k, v in sent.items()},
            allow_redirects=False,
        )
        d.addCallback(lambda r: treq.content(r).addCallback(lambda b: outcome.append(Response(r.code, r.headers, b))))
        d.addErrback(outcome.append)
        self.transport.flush()
        assert outcome, f"no response to {method} {path}"
        if not isinstance(outcome[0], Response):
            outcome[0].raiseException()
        response: Response = outcome[0]
        for cookie in response.headers.getRawHeaders("set-cookie") or ():
            name, _, rest = cookie.partition("=")
            value = rest.split(";")[0]
            if "max-age=0" in cookie.lower():
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return response

    def page(self, headers: dict[str, str] | None = None) -> Response:
        return self.request("GET", "/admin/", headers=headers)

    def csrf(self) -> str:
        """The anti-forgery token of a freshly loaded page."""
        found = _CSRF.search(self.page().body)
        assert found, "no anti-forgery token on the page"
        return found.group(1).decode()

    def submit(
        self,
        action: str,
        fields: dict[str, str],
        csrf: bool | str = True,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """POST a form as the browser would (token taken from the page)."""
        fields = dict(fields)
        if csrf is True:
            fields = {"csrf": self.csrf(), **fields}
        elif isinstance(csrf, str):
            fields = {"csrf": csrf, **fields}
        sent = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        return self.request("POST", "/admin/" + action, urlencode(fields).encode(), sent)
