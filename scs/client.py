"""``scs.client.Client``: the agent's HTTP API as a typed Python library.

The ``scs`` command line (``scs.cli``) is built on it, and any Python
program can use it the same way::

    from scs.client import Client, APIError

    with Client("http://127.0.0.1:8000", token="...", timeout=30) as scs:
        worker = scs.create_instance("foo", "worker1", queues=["tasks"])
        print(worker["agent"], worker["state"])
        try:
            scs.instance("nope")
        except APIError as e:
            print(e.status, e.message)          # 404 no instance named 'nope'

Every method is one request (``status`` and ``queue_details`` a few),
answers the API's JSON (typed below as ``TypedDict``s) and raises
``APIError`` for an error answer, carrying the HTTP status, the API's
message and its whole JSON body; ``AgentUnreachable`` (an ``APIError``
whose ``status`` is ``None``) when the agent cannot be reached or does not
answer in time.  A cluster answer that lacks some agents (the
``X-SCS-Missing-Agents`` header) is reported to ``on_missing_agents``.

The HTTP client is httpx: it is typed, synchronous (a command line or a
script needs no event loop), has separate connect and read timeouts, keeps
one connection for the requests of a session, and tests can hand it a
``MockTransport`` to see exactly what would be sent.  (requests would do
too, but ships no type hints of its own and no mock transport.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, TypedDict, cast
from urllib.parse import quote, unquote

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
# Ordinary requests: a read, a change of desired state.
DEFAULT_TIMEOUT = 30.0
# Requests that wait on workers: a create waits for the first ping, a
# delete for the worker to stop, a (rolling) restart for every worker.
DEFAULT_WAIT_TIMEOUT = 600.0
MISSING_AGENTS_HEADER = "X-SCS-Missing-Agents"
MISSING_AGENTS_COUNT_HEADER = "X-SCS-Missing-Agents-Count"
MAX_TOKEN_LENGTH = 4096


class Broker(TypedDict):
    hostname: str
    port: int
    userid: str
    password: str
    virtual_host: str


class Instance(TypedDict, total=False):
    """An instance as the API answers it (``GET /<app>/instances/<name>/``)."""

    name: str
    app: str
    agent: str
    node: str
    state: str
    pid: int | None
    restarts: int
    is_enabled: bool
    queues: list[str]
    broker: Broker
    max_concurrency: int
    min_concurrency: int
    arguments: list[str]


class Member(TypedDict, total=False):
    """A cluster member (``GET /agents/``)."""

    id: str
    url: str
    alive: bool
    last_seen: float | None
    instances: int
    requires_token: bool


class Autoscale(TypedDict):
    max: int
    min: int


class LogTail(TypedDict):
    name: str
    agent: str
    lines: list[str]


class AppOperation(TypedDict, total=False):
    """The answer of ``POST /<app>/restart``, ``enable``, ``disable``."""

    instances: list[str]
    failed: dict[str, str]
    skipped: list[str]


class Queue(TypedDict, total=False):
    name: str
    exchange: str
    routing_key: str
    exchange_type: str | None
    options: Any
    messages: int | None
    consumers: int | None


class APIError(Exception):
    """The agent refused a request, or could not be asked.

    ``status`` is the HTTP status (``None`` when there was no answer),
    ``message`` the API's ``error`` text, ``body`` its whole JSON answer
    (``parameter`` names the bad parameter of a 400)."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        body: Mapping[str, Any] | None = None,
        method: str = "",
        url: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.body: dict[str, Any] = dict(body or {})
        self.method = method
        self.url = url

    @property
    def parameter(self) -> str | None:
        value = self.body.get("parameter")
        return value if isinstance(value, str) else None

    def __str__(self) -> str:
        if self.status is None:
            return self.message
        return f"{self.message} (HTTP {self.status})"


class AgentUnreachable(APIError):
    """No answer: connection refused, name not resolved, timed out."""


class TokenFileError(ValueError):
    """The token file cannot be used; the message says why."""


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in ``path``: its first line, stripped of whitespace (as
    the agent's ``--auth-token-file`` reads it)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_TOKEN_LENGTH + 1)
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise TokenFileError(f"cannot read {os.fspath(path)!r}: {reason}") from None
    stripped = text.strip()
    token = stripped.splitlines()[0].strip() if stripped else ""
    if not token:
        raise TokenFileError(f"{os.fspath(path)!r} is empty")
    if len(token) > MAX_TOKEN_LENGTH or not token.isascii() or not token.isprintable():
        raise TokenFileError(f"the token in {os.fspath(path)!r} must be printable ASCII")
    return token


def _segment(value: str) -> str:
    """One path segment, every reserved character escaped ("/" too)."""
    return quote(value, safe="")


def _instance_path(name: str, app: str | None) -> str:
    if app is None:
        return f"/instances/{_segment(name)}/"
    return f"/{_segment(app)}/instances/{_segment(name)}/"


MissingAgentsHandler = Callable[[list[str], int], None]


class Client:
    """A session with one agent (which answers for its whole cluster).

    ``url`` is the agent's base URL; ``token`` the bearer token of an agent
    started with ``--auth-token-file``; ``timeout`` bounds ordinary
    requests and ``wait_timeout`` those that wait on workers (create,
    delete, restart).  ``on_missing_agents(ids, count)`` is called when a
    cluster answer lacks some agents.  ``transport`` replaces the network
    (tests)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
        *,
        on_missing_agents: MissingAgentsHandler | None = None,
        transport: httpx.BaseTransport | None = None,
        verify: Any = True,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.wait_timeout = max(wait_timeout, timeout)
        self.on_missing_agents = on_missing_agents
        headers = {"Accept": "application/json", "User-Agent": "scs-client"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=self._timeout(timeout),
            follow_redirects=False,
            transport=transport,
            verify=verify,
        )

    @staticmethod
    def _timeout(seconds: float) -> httpx.Timeout:
        return httpx.Timeout(seconds, connect=min(seconds, 10.0))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- the one place that talks HTTP ------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None,
        wait: bool = False,
    ) -> Any:
        """Send one request; answer its JSON or raise ``APIError``.

        ``path`` is already escaped (see ``_segment``); ``body`` goes as a
        JSON object; ``wait`` gives it ``wait_timeout``."""
        url = self.url + path
        try:
            response = self._http.request(
                method,
                path,
                params=dict(query) if query else None,
                json=dict(body) if body is not None else None,
                timeout=self._timeout(self.wait_timeout if wait else self.timeout),
            )
        except httpx.TimeoutException:
            seconds = self.wait_timeout if wait else self.timeout
            raise AgentUnreachable(
                f"no answer from the agent at {self.url} within {seconds:g} s", method=method, url=url
            ) from None
        except httpx.TransportError as e:
            raise AgentUnreachable(
                f"cannot reach the agent at {self.url}: {_reason(e)}", method=method, url=url
            ) from None
        self._report_missing(response)
        payload = _json_of(response)
        if response.is_success:
            if payload is _NOT_JSON:
                raise APIError(
                    "the agent answered something that is not JSON", response.status_code, method=method, url=url
                )
            return payload
        if isinstance(payload, dict) and isinstance(payload.get("error"), str):
            raise APIError(payload["error"], response.status_code, payload, method=method, url=url)
        reason = response.reason_phrase or "error"
        raise APIError(f"the agent answered {reason}", response.status_code, method=method, url=url)

    def _report_missing(self, response: httpx.Response) -> None:
        header = response.headers.get(MISSING_AGENTS_HEADER)
        if header is None or self.on_missing_agents is None:
            return
        ids = [unquote(part) for part in header.split(",") if part]
        try:
            count = int(response.headers.get(MISSING_AGENTS_COUNT_HEADER, len(ids)))
        except ValueError:
            count = len(ids)
        self.on_missing_agents(ids, max(count, len(ids)))

    # -- cluster ------------------------------------------------------------

    def ping(self) -> dict[str, str]:
        return cast(dict[str, str], self.request("GET", "/ping/"))

    def agents(self) -> list[Member]:
        return cast(list[Member], self.request("GET", "/agents/"))

    def apps(self) -> list[str]:
        return cast(list[str], self.request("GET", "/"))

    def status(self) -> list[Instance]:
        """Every instance of the cluster, app by app, sorted by app and name."""
        found: list[Instance] = []
        for app in sorted(self.apps()):
            found += self.instance_details(app)
        return sorted(found, key=lambda i: (i.get("app", ""), i.get("name", "")))

    # -- apps ------------------------------------------------------------------

    def app(self, app: str) -> dict[str, Any]:
        return cast(dict[str, Any], self.request("GET", f"/{_segment(app)}/"))

    def restart_app(self, app: str, rolling: bool = False) -> AppOperation:
        """Restart every instance of ``app``; ``rolling``: one at a time,
        each once the previous one's new worker answers a ping."""
        query = {"rolling": "1"} if rolling else None
        return cast(AppOperation, self.request("POST", f"/{_segment(app)}/restart/", query=query, wait=True))

    def enable_app(self, app: str) -> AppOperation:
        return cast(AppOperation, self.request("POST", f"/{_segment(app)}/enable/", wait=True))

    def disable_app(self, app: str) -> AppOperation:
        return cast(AppOperation, self.request("POST", f"/{_segment(app)}/disable/", wait=True))

    # -- instances ----------------------------------------------------------

    def instances(self, app: str) -> list[str]:
        """Names of the app's instances on every agent."""
        return cast(list[str], self.request("GET", f"/{_segment(app)}/instances/"))

    def instance_details(self, app: str) -> list[Instance]:
        """Every instance object of the app on every agent."""
        return cast(list[Instance], self.request("GET", f"/{_segment(app)}/instances/", query={"details": "1"}))

    def instance(self, name: str, app: str | None = None) -> Instance:
        """One instance, from its owner; without ``app``, found by name."""
        return cast(Instance, self.request("GET", _instance_path(name, app)))

    def create_instance(
        self,
        app: str,
        name: str | None = None,
        *,
        queues: Iterable[str] | None = None,
        max_concurrency: int | None = None,
        min_concurrency: int | None = None,
        broker: str | None = None,
        arguments: Iterable[str] | None = None,
        nowait: bool = False,
    ) -> Instance:
        """A new instance (a random name without ``name``) on a random live
        agent; answers once its worker answers a ping, or at once with
        ``nowait``."""
        body: dict[str, Any] = {}
        if queues is not None:
            body["queues"] = ",".join(queues)
        if max_concurrency is not None:
            body["max_concurrency"] = max_concurrency
        if min_concurrency is not None:
            body["min_concurrency"] = min_concurrency
        if broker is not None:
            body["broker"] = broker
        if arguments is not None:
            body["arguments"] = list(arguments)
        if nowait:
            body["nowait"] = True
        path = f"/{_segment(app)}/instances/" + ("" if name is None else f"{_segment(name)}/")
        return cast(Instance, self.request("PUT", path, body=body, wait=not nowait))

    def delete_instance(self, name: str, app: str | None = None) -> Instance:
        """Delete an instance; its worker is shut down."""
        return cast(Instance, self.request("DELETE", _instance_path(name, app), wait=True))

    def enable(self, app: str, name: str) -> Instance:
        return cast(Instance, self.request("POST", _instance_path(name, app) + "enable/", wait=True))

    def disable(self, app: str, name: str) -> Instance:
        return cast(Instance, self.request("POST", _instance_path(name, app) + "disable/", wait=True))

    def restart(self, app: str, name: str) -> Instance:
        return cast(Instance, self.request("POST", _instance_path(name, app) + "restart/", wait=True))

    def autoscale(self, app: str, name: str) -> Autoscale:
        return cast(Autoscale, self.request("GET", _instance_path(name, app) + "autoscale/"))

    def set_autoscale(self, app: str, name: str, max: int | None = None, min: int | None = None) -> Autoscale:
        """Set the autoscale range; either bound alone keeps the other."""
        body = {key: value for key, value in (("max", max), ("min", min)) if value is not None}
        return cast(Autoscale, self.request("POST", _instance_path(name, app) + "autoscale/", body=body))

    def instance_queues(self, app: str, name: str) -> dict[str, Any]:
        """The queues it should consume and (``active``) does consume."""
        return cast(dict[str, Any], self.request("GET", _instance_path(name, app) + "queues/"))

    def consume(self, app: str, name: str, queue: str) -> dict[str, Any]:
        path = _instance_path(name, app) + f"queues/{_segment(queue)}/"
        return cast(dict[str, Any], self.request("PUT", path))

    def cancel(self, app: str, name: str, queue: str) -> dict[str, Any]:
        path = _instance_path(name, app) + f"queues/{_segment(queue)}/"
        return cast(dict[str, Any], self.request("DELETE", path))

    def stats(self, app: str, name: str) -> dict[str, Any]:
        """The worker's Celery stats."""
        return cast(dict[str, Any], self.request("GET", _instance_path(name, app) + "stats/"))

    def log(self, app: str, name: str, lines: int | None = None) -> LogTail:
        """The last ``lines`` lines of the worker's log (the agent's default
        when ``None``)."""
        query = None if lines is None else {"lines": str(lines)}
        return cast(LogTail, self.request("GET", _instance_path(name, app) + "log/", query=query))

    # -- queues ---------------------------------------------------------------

    def queues(self, app: str) -> list[str]:
        """Names of the app's declared queues on every agent."""
        return cast(list[str], self.request("GET", f"/{_segment(app)}/queues/"))

    def queue(self, app: str, name: str) -> Queue:
        """A queue's declaration with the broker's ``messages`` and ``consumers``."""
        return cast(Queue, self.request("GET", f"/{_segment(app)}/queues/{_segment(name)}/"))

    def declare_queue(
        self,
        app: str,
        name: str,
        *,
        exchange: str | None = None,
        routing_key: str | None = None,
        exchange_type: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Queue:
        """Declare a queue for the app on every agent (exchange and routing
        key default to its name)."""
        given = {"exchange": exchange, "routing_key": routing_key, "exchange_type": exchange_type, "options": options}
        body = {key: value for key, value in given.items() if value is not None}
        return cast(Queue, self.request("PUT", f"/{_segment(app)}/queues/{_segment(name)}/", body=body))

    def delete_queue(self, app: str, name: str) -> Queue:
        return cast(Queue, self.request("DELETE", f"/{_segment(app)}/queues/{_segment(name)}/"))

    def queue_details(self, app: str) -> list[Queue]:
        """Every declared queue of the app, with the broker's figures."""
        return [self.queue(app, name) for name in sorted(self.queues(app))]

    # -- autoscaling by queue depth ----------------------------------------------

    def autoscaling(self, app: str) -> dict[str, Any]:
        """The app's autoscaling policy with ``decision``, the last decision
        of the agent that decides (None before the first)."""
        return cast(dict[str, Any], self.request("GET", f"/{_segment(app)}/autoscaling/"))

    def set_autoscaling(
        self,
        app: str,
        *,
        queue: str | None = None,
        min_instances: int | None = None,
        max_instances: int | None = None,
        messages_per_instance: int | None = None,
        scale_down_after: float | None = None,
    ) -> dict[str, Any]:
        """Set the app's autoscaling policy; what is left out keeps its
        stored value (or the default, for a first policy, which needs
        ``queue`` and ``max_instances``)."""
        given = {
            "queue": queue,
            "min_instances": min_instances,
            "max_instances": max_instances,
            "messages_per_instance": messages_per_instance,
            "scale_down_after": scale_down_after,
        }
        body = {key: value for key, value in given.items() if value is not None}
        return cast(dict[str, Any], self.request("PUT", f"/{_segment(app)}/autoscaling/", body=body))

    def delete_autoscaling(self, app: str) -> dict[str, Any]:
        """Drop the app's autoscaling policy (its instances stay)."""
        return cast(dict[str, Any], self.request("DELETE", f"/{_segment(app)}/autoscaling/"))


_NOT_JSON = object()


def _json_of(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return _NOT_JSON


def _reason(error: httpx.TransportError) -> str:
    """A short reason: "connection refused", not the errno soup."""
    text = str(error) or type(error).__name__
    lowered = text.lower()
    for known in ("connection refused", "name or service not known", "no route to host", "connection reset"):
        if known in lowered:
            return known
    # "[Errno 111] Connection refused" and the like: drop the errno.
    if text.startswith("[Errno") and "]" in text:
        text = text.split("]", 1)[1].strip()
    return text
