"""The REST API (README "The HTTP API"), as a Klein app on a class.

Each route reads its parameters (``scs.http.params``), validates them
(``scs.validation``) and calls the ``Agent`` façade; domain errors become
JSON errors with their HTTP status.  Every route answers with and without a
trailing slash, and a known path asked with a wrong method answers 405.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlsplit

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import HTTPException

from scs import validation as v
from scs.agent import Agent, Reply
from scs.errors import BadParameter, MethodNotAllowed, NotFound, SCSError, Unavailable
from scs.http.guard import BadHost, parse_host
from scs.http.openapi import openapi_document
from scs.http.params import DEFAULT_MAX_BODY, request_params

log = Logger(namespace="scs.http")

ALL_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
MISSING_AGENTS_HEADER = b"X-SCS-Missing-Agents"
MISSING_AGENTS_COUNT_HEADER = b"X-SCS-Missing-Agents-Count"
MAX_MISSING_AGENTS_LISTED = 20

# path -> methods, filled by ``endpoint`` so that the other methods of a
# known path can answer 405 instead of 404.
_METHODS: dict[str, set[str]] = {}


def write_json(request: IRequest, body: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def write_missing_agents(request: IRequest, missing: Sequence[str]) -> None:
    """The agents a cluster answer lacks: their ids (the first
    MAX_MISSING_AGENTS_LISTED of them, so that the header stays small
    whatever the membership table holds) and how many there are."""
    listed = missing[:MAX_MISSING_AGENTS_LISTED]
    request.setHeader(MISSING_AGENTS_HEADER, ",".join(quote(agent, safe="") for agent in listed).encode())
    request.setHeader(MISSING_AGENTS_COUNT_HEADER, str(len(missing)).encode())


def write_error(request: IRequest, error: SCSError) -> bytes:
    return write_json(request, error.to_json(), error.status)


_klein = Klein()


class _UTF8PathGuard(Resource):
    """Answers JSON errors for what Klein would answer in HTML or plain text
    (or fail on): a method it does not know, a path or Host that is not
    UTF-8, a name with an escaped "/" that routing would split, an empty
    name ("//").  Hands every other request to the Klein app."""

    isLeaf = True

    def __init__(self, wrapped: IResource) -> None:
        super().__init__()
        self.wrapped = wrapped

    def render(self, request: IRequest) -> Any:
        if request.method.decode("latin-1") not in ALL_METHODS:
            request.setHeader(b"Allow", ", ".join(ALL_METHODS).encode())
            error = MethodNotAllowed(
                f"method {request.method.decode('latin-1')!r} is not supported",
                allowed=list(ALL_METHODS),
            )
            return write_error(request, error)
        try:
            unquote_to_bytes(request.path).decode("utf-8")
        except UnicodeDecodeError:
            return write_error(request, BadParameter("the URL path is not valid UTF-8"))
        # Werkzeug fails (a 500) on a Host that is not a host name, such as
        # ".": refuse those here.  Which hosts are served is decided by the
        # guard around the whole site (scs.http.guard).
        for host in request.requestHeaders.getRawHeaders(b"host") or []:
            try:
                parse_host(host.strip())
            except BadHost as e:
                message = str(e) if "Host" in str(e) else f"bad Host header: {e}"
                return write_error(request, BadParameter(message))
        segments = request.path.split(b"/")
        if any(b"/" in unquote_to_bytes(part) for part in segments):
            return write_error(request, BadParameter("a name in the URL path must not contain '/' (%2F)"))
        # Werkzeug merges "//", which would turn "PUT /app/instances//" (an
        # empty name) into "create an instance with a random name".
        if b"" in segments[1:-1]:
            return write_error(request, BadParameter("the URL path has an empty segment: a name is empty"))
        return self.wrapped.render(request)


WRITE_METHODS = frozenset({"PUT", "POST", "DELETE", "PATCH"})
# Operations asked with nowait that may run at once, per agent.
MAX_BACKGROUND = 100


def _nowait(params: dict[str, Any]) -> bool:
    """Take ``nowait`` out of a write route's parameters."""
    value = params.pop("nowait", None)
    if value is None or isinstance(value, v.EmptyField):
        return False
    return v.check_bool(value, "nowait")


def _log_background_failure(failure: Failure, path: str) -> None:
    # An SCSError has been logged by the operation itself ("<-- error=").
    if not failure.check(SCSError):
        log.failure("unexpected error in {path} (answered 202)", failure, path=path)


def endpoint(path: str, *methods: str, own_nowait: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Route ``path`` (with or without its trailing slash) to a handler
    ``f(self, params, **path_arguments)`` returning a ``Reply``.

    Every write route takes ``nowait``: once the request is checked (bad
    input still gets its 4xx), the answer is 202 at once and the operation
    goes on; its outcome is in the agent's log.  ``own_nowait`` routes
    (instance creation) read ``nowait`` themselves and answer 202 with what
    they created."""

    def register(f: Callable[..., Any]) -> Callable[..., Any]:
        async def handler(self: API, request: IRequest, **path_arguments: Any) -> bytes:
            try:
                params = request_params(request, self.max_body)
                nowait = False
                if not own_nowait and request.method.decode("latin-1") in WRITE_METHODS:
                    nowait = _nowait(params)
                if nowait and self.background >= MAX_BACKGROUND:
                    # Each 202 frees its connection: without this, one client
                    # could start any number of operations.
                    raise Unavailable(
                        f"{MAX_BACKGROUND} operations asked with nowait are still running: try again later"
                    )
                running = Deferred.fromCoroutine(f(self, params, **path_arguments))
                if nowait and not running.called:
                    self.background += 1
                    running.addErrback(_log_background_failure, path)
                    running.addBoth(self._background_done)
                    return write_json(request, {"accepted": True}, 202)
                reply = await running
            except SCSError as e:
                return write_error(request, e)
            except Exception:  # noqa: BLE001 - never a stack trace to the client
                log.failure("unexpected error in {path}", Failure(), path=path)
                return write_json(request, {"error": "internal error"}, 500)
            if reply.missing:
                write_missing_agents(request, reply.missing)
            if nowait and reply.status < 300:
                return write_json(request, reply.body, 202)
            return write_json(request, reply.body, reply.status)

        handler.__name__ = f.__name__
        _METHODS.setdefault(path, set()).update(methods)
        _klein.route(path, methods=list(methods), strict_slashes=False, endpoint=f"{f.__name__}")(handler)
        return f

    return register


class API:
    """The HTTP API of one agent, answering for the cluster."""

    app = _klein

    def __init__(
        self,
        agent: Agent,
        max_body: int = DEFAULT_MAX_BODY,
        mounts: dict[str, IResource] | None = None,
    ) -> None:
        self.agent = agent
        self.max_body = max_body
        # Operations answered 202 (nowait) and still running.
        self.background = 0
        # Other surfaces served beside the API: "admin" and "metrics".
        self.mounts = dict(mounts or {})

    def resource(self) -> IResource:
        return _UTF8PathGuard(self.app.resource())

    def _background_done(self, result: object) -> None:
        self.background -= 1

    # -- routes ----------------------------------------------------------------

    @_klein.route("/admin/", branch=True, endpoint="admin")
    def admin(self, request: IRequest) -> IResource | bytes:
        return self._mounted("admin", request)

    @_klein.route("/metrics", branch=True, strict_slashes=False, endpoint="metrics")
    def metrics(self, request: IRequest) -> IResource | bytes:
        return self._mounted("metrics", request)

    def _mounted(self, name: str, request: IRequest) -> IResource | bytes:
        resource = self.mounts.get(name)
        if resource is None:
            return write_error(request, NotFound(f"this agent serves no {name}", path=name))
        return resource

    @endpoint("/", "GET")
    async def app_list(self, params: dict[str, Any]) -> Reply:
        v.only(params, ())
        return await self.agent.app_list()

    @endpoint("/ping/", "GET")
    async def ping(self, params: dict[str, Any]) -> Reply:
        v.only(params, ())
        return Reply({"ok": "pong"})

    @endpoint("/agents/", "GET")
    async def agents(self, params: dict[str, Any]) -> Reply:
        v.only(params, ())
        return Reply(self.agent.members())

    # A static path: Werkzeug tries it before "/<app>/", and "openapi.json"
    # is a reserved app name (scs.validation.RESERVED_APP_NAMES).
    @endpoint("/openapi.json", "GET")
    async def openapi(self, params: dict[str, Any]) -> Reply:
        v.only(params, ())
        return Reply(openapi_document())

    @endpoint("/agents/<agent>/drain/", "POST", "PUT")
    async def agent_drain(self, params: dict[str, Any], agent: str) -> Reply:
        v.only(params, ())
        return await self.agent.drain(v.check_name(agent, "agent"))

    @endpoint("/agents/<agent>/undrain/", "POST", "PUT")
    async def agent_undrain(self, params: dict[str, Any], agent: str) -> Reply:
        v.only(params, ())
        return await self.agent.drain(v.check_name(agent, "agent"), undrain=True)

    @endpoint("/<app>/", "PUT", "POST")
    async def app_put(self, params: dict[str, Any], app: str) -> Reply:
        v.only(params, v.APP_SETTINGS)
        return await self.agent.app_put(v.check_app_name(app), **v.check_app_settings(params))

    @endpoint("/<app>/", "GET")
    async def app_get(self, params: dict[str, Any], app: str) -> Reply:
        v.only(params, ())
        return await self.agent.app_get(v.check_app_name(app))

    @endpoint("/<app>/", "DELETE")
    async def app_delete(self, params: dict[str, Any], app: str) -> Reply:
        v.only(params, ())
        return await self.agent.app_delete(v.check_app_name(app))

    @endpoint("/<app>/restart/", "POST", "PUT")
    async def app_restart(self, params: dict[str, Any], app: str) -> Reply:
        v.only(params, ("rolling",))
        rolling = v.check_bool(params["rolling"], "rolling") if "rolling" in params else False
        return await self.agent.app_instances(v.check_app_name(app), "restart", rolling=rolling)

    @endpoint("/<app>/enable/", "POST", "PUT")
    async def app_enable(self, params: dict[str, Any], app: str) -> Reply:
        v.only(params, ())
        return await self.agent.app_instances(v.check_app_name(app), "enable")

    @endpoint("/<app>/disable/", "POST", "PUT")
    async def app_disable(self, params: dict[str, Any], app: str) -> Reply:
        v.only(params, ())
        return await self.agent.app_instances(v.check_app_name(app), "disable")

    @endpoint("/<app>/autoscaling/", "PUT", "POST")
    async def autoscaling_put(self, params: dict[str, Any], app: str) -> Reply:
        v.only(params, v.POLICY_FIELDS)
        app = v.check_app_name(app)
        return await self.agent.autoscaling_put(app, v.check_policy_fields(params))

    @endpoint("/<app>/autoscaling/", "GET")
    async def autoscaling_get(self, params: dict[str, Any], app: str) -> Reply:
        v.only(params, ())
        return await self.agent.autoscaling_get(v.check_app_name(app))

    @endpoint("/<app>/autoscaling/", "DELETE")
    async def autoscaling_delete(self, params: dict[str, Any], app: str) -> Reply:
        v.only(params, ())
        return await self.agent.autoscaling_delete(v.check_app_name(app))

    def _instance_settings(self, params: dict[str, Any]) -> dict[str, Any]:
        v.only(
            params,
            ("max_concurrency", "min_concurrency", "queues", "broker", "arguments", "nowait"),
        )
        settings: dict[str, Any] = {}
        if "min_concurrency" in params:
            settings["min_concurrency"] = v.check_concurrency(params["min_concurrency"], "min_concurrency")
        if "max_concurrency" in params:
            settings["max_concurrency"] = v.check_concurrency(params["max_concurrency"], "max_concurrency")
        else:
            # Asking only for a minimum raises the default maximum with it.
            settings["max_concurrency"] = max(1, settings.get("min_concurrency", 1))
        settings.setdefault("min_concurrency", 1)
        v.check_concurrency_range(settings["max_concurrency"], settings["min_concurrency"])
        if "queues" in params:
            settings["queues"] = list(v.check_queue_list(params["queues"]))
        if "broker" in params:
            settings["broker"] = v.check_broker_url(params["broker"])
        if "arguments" in params:
            settings["arguments"] = list(v.check_arguments(params["arguments"]))
        if "nowait" in params:
            settings["nowait"] = v.check_bool(params["nowait"], "nowait")
        return settings

    @endpoint("/<app>/instances/", "PUT", "POST", own_nowait=True)
    async def instance_create(self, params: dict[str, Any], app: str) -> Reply:
        app = v.check_app_name(app)
        return await self.agent.instance_create(app, None, **self._instance_settings(params))

    @endpoint("/<app>/instances/", "GET")
    async def instance_list(self, params: dict[str, Any], app: str) -> Reply:
        v.only(params, ("details",))
        if v.check_bool(params.get("details", "0"), "details"):
            return await self.agent.instance_list_details(v.check_app_name(app))
        return await self.agent.instance_list(v.check_app_name(app))

    @endpoint("/<app>/instances/<name>/", "PUT", "POST", own_nowait=True)
    async def instance_create_named(self, params: dict[str, Any], app: str, name: str) -> Reply:
        app = v.check_app_name(app)
        name = v.check_instance_name(name)
        return await self.agent.instance_create(app, name, **self._instance_settings(params))

    async def _on_instance(
        self, params: dict[str, Any], operation: str, app: str | None, name: str, **extra: Any
    ) -> Reply:
        v.only(params, ())
        return await self.agent.instance_operation(
            operation,
            v.check_instance_name(name),
            None if app is None else v.check_app_name(app),
            **extra,
        )

    @endpoint("/<app>/instances/<name>/", "GET")
    async def instance_get(self, params: dict[str, Any], app: str, name: str) -> Reply:
        return await self._on_instance(params, "instance_get", app, name)

    @endpoint("/<app>/instances/<name>/", "DELETE")
    async def instance_delete(self, params: dict[str, Any], app: str, name: str) -> Reply:
        return await self._on_instance(params, "instance_delete", app, name)

    # The introduction deletes an instance without naming its app.
    @endpoint("/instances/<name>/", "DELETE")
    async def instance_delete_any_app(self, params: dict[str, Any], name: str) -> Reply:
        return await self._on_instance(params, "instance_delete", None, name)

    @endpoint("/instances/<name>/", "GET")
    async def instance_get_any_app(self, params: dict[str, Any], name: str) -> Reply:
        return await self._on_instance(params, "instance_get", None, name)

    @endpoint("/<app>/instances/<name>/enable/", "POST", "PUT")
    async def instance_enable(self, params: dict[str, Any], app: str, name: str) -> Reply:
        return await self._on_instance(params, "instance_enable", app, name)

    @endpoint("/<app>/instances/<name>/disable/", "POST", "PUT")
    async def instance_disable(self, params: dict[str, Any], app: str, name: str) -> Reply:
        return await self._on_instance(params, "instance_disable", app, name)

    @endpoint("/<app>/instances/<name>/restart/", "POST", "PUT")
    async def instance_restart(self, params: dict[str, Any], app: str, name: str) -> Reply:
        return await self._on_instance(params, "instance_restart", app, name)

    @endpoint("/<app>/instances/<name>/autoscale/", "GET")
    async def autoscale_get(self, params: dict[str, Any], app: str, name: str) -> Reply:
        return await self._on_instance(params, "autoscale_get", app, name)

    @endpoint("/<app>/instances/<name>/autoscale/", "POST", "PUT")
    async def autoscale_set(self, params: dict[str, Any], app: str, name: str) -> Reply:
        v.only(params, ("max", "min"))
        if not params:
            raise BadParameter("give max, min or both", parameter="max")
        extra = {}
        if "max" in params:
            extra["max"] = v.check_concurrency(params["max"], "max")
        if "min" in params:
            extra["min"] = v.check_concurrency(params["min"], "min")
        if "max" in extra and "min" in extra:
            v.check_concurrency_range(extra["max"], extra["min"])
        return await self._on_instance({}, "autoscale_set", app, name, **extra)

    @endpoint("/<app>/instances/<name>/queues/", "GET")
    async def instance_queues(self, params: dict[str, Any], app: str, name: str) -> Reply:
        return await self._on_instance(params, "queues_of", app, name)

    @endpoint("/<app>/instances/<name>/queues/<queue>/", "PUT", "POST")
    async def consume(self, params: dict[str, Any], app: str, name: str, queue: str) -> Reply:
        reply = await self._on_instance(params, "consume", app, name, queue=v.check_queue_name(queue))
        return Reply(reply.body, status=201, missing=reply.missing)

    @endpoint("/<app>/instances/<name>/queues/<queue>/", "DELETE")
    async def cancel(self, params: dict[str, Any], app: str, name: str, queue: str) -> Reply:
        return await self._on_instance(params, "cancel", app, name, queue=v.check_queue_name(queue))

    @endpoint("/<app>/instances/<name>/stats/", "GET")
    async def stats(self, params: dict[str, Any], app: str, name: str) -> Reply:
        return await self._on_instance(params, "stats", app, name)

    @endpoint("/<app>/instances/<name>/log/", "GET")
    async def instance_log(self, params: dict[str, Any], app: str, name: str) -> Reply:
        v.only(params, ("lines",))
        lines = v.check_lines(params["lines"]) if "lines" in params else v.DEFAULT_LOG_LINES
        return await self._on_instance({}, "instance_log", app, name, lines=lines)

    @endpoint("/<app>/queues/", "GET")
    async def queue_list(self, params: dict[str, Any], app: str) -> Reply:
        v.only(params, ())
        return await self.agent.queue_list(v.check_app_name(app))

    @endpoint("/<app>/queues/<name>/", "PUT", "POST")
    async def queue_declare(self, params: dict[str, Any], app: str, name: str) -> Reply:
        v.only(params, ("exchange", "routing_key", "exchange_type", "options"))
        return await self.agent.queue_declare(v.check_app_name(app), v.queue_binding(name, params))

    @endpoint("/<app>/queues/<name>/", "GET")
    async def queue_get(self, params: dict[str, Any], app: str, name: str) -> Reply:
        v.only(params, ())
        return await self.agent.queue_operation("queue_get", v.check_app_name(app), v.check_queue_name(name))

    @endpoint("/<app>/queues/<name>/", "DELETE")
    async def queue_delete(self, params: dict[str, Any], app: str, name: str) -> Reply:
        v.only(params, ())
        return await self.agent.queue_operation("queue_delete", v.check_app_name(app), v.check_queue_name(name))

    @endpoint("/<app>/queues/<name>/purge/", "POST", "PUT")
    async def queue_purge(self, params: dict[str, Any], app: str, name: str) -> Reply:
        v.only(params, ())
        return await self.agent.queue_operation("queue_purge", v.check_app_name(app), v.check_queue_name(name))


def _method_not_allowed(allowed: set[str]) -> Callable[..., bytes]:
    def handler(self: API, request: IRequest, **_: Any) -> bytes:
        request.setHeader(b"Allow", ", ".join(sorted(allowed)).encode())
        error = MethodNotAllowed(
            f"method {request.method.decode('latin-1')} not allowed here",
            allowed=sorted(allowed),
        )
        return write_error(request, error)

    return handler


for _index, (_path, _allowed) in enumerate(sorted(_METHODS.items())):
    _others = [m for m in ALL_METHODS if m not in _allowed and not (m == "HEAD" and "GET" in _allowed)]
    API.app.route(_path, methods=_others, strict_slashes=False, endpoint=f"405-{_index}")(_method_not_allowed(_allowed))


@API.app.handle_errors(HTTPException)
def _routing_error(self: API, request: IRequest, failure: Failure) -> bytes:
    """Werkzeug's routing errors (no rule for "/", a redirect) as JSON, not HTML."""
    error: HTTPException = failure.value
    location = getattr(error, "new_url", None)
    if location:
        # "/admin" -> "/admin/": a redirect, not an error.  Werkzeug builds
        # an absolute URL from the request's Host; send the path alone, so
        # that the answer never echoes what the client claimed to reach.
        location = _relative(location)
        request.setHeader(b"Location", location.encode("utf-8"))
        return write_json(request, {"location": location}, error.code or 308)
    return write_json(request, {"error": error.description or error.name}, error.code or 500)


def _relative(url: str) -> str:
    """The path and query of ``url``, never read as another host's
    (a leading "//" is a network path: collapse it)."""
    parts = urlsplit(url)
    path = "/" + (parts.path or "/").lstrip("/")
    return path + ("?" + parts.query if parts.query else "")


@API.app.route("/<path:rest>", methods=list(ALL_METHODS), endpoint="not-found")
def _not_found(self: API, request: IRequest, rest: str) -> bytes:
    return write_error(request, NotFound("no such resource", path="/" + rest))
