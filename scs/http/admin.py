"""The admin page of one agent, served at ``/admin/``.

Server-rendered with ``twisted.web.template`` (which escapes every string
it is given), plain HTML forms that POST and redirect (303) back to the
page, so it works without JavaScript.  It lists this agent's instances with
forms to change them, the apps (with their workers' ``env``, ``workdir``,
``python`` and ``task_events``, each app with a form filled with them) and
queue declarations of this agent, and a read-only view of the other agents'
instances.  An app's settings go through ``validation.check_app_settings``,
the API's own checks; only ``env``'s ``NAME=value`` lines are read here.

Protection:

- cross-site request forgery: every form carries a token, the HMAC (with a
  per-process secret) of a random nonce kept in an HttpOnly, SameSite=Strict
  cookie (double submit, signed); a POST whose token does not match, or
  whose ``Origin`` is another site, is refused and changes nothing;
- with ``--auth-token-file``: the token as a bearer token, as the password
  of HTTP basic auth, or through the login form, which sets a signed
  session cookie (``scs.http.auth``);
- bad input is shown on the page, with what was sent, escaped; never a
  stack trace.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.template import Element, Tag, XMLFile, flattenString, renderer, tags

from scs import validation as v
from scs.errors import BadParameter, SCSError
from scs.http.auth import SESSION_COOKIE, SESSION_LIFETIME, TokenAuth
from scs.http.params import DEFAULT_MAX_BODY, request_params

log = Logger(namespace="scs.http.admin")

TEMPLATE = FilePath(__file__).sibling("templates").child("admin.xml")
ADMIN_ROOT = "/admin/"
CSRF_COOKIE = b"scs_csrf"
CSRF_FIELD = "csrf"
_NONCE = re.compile(rb"^[0-9a-f]{32}$")
# What the apps table says of a workdir or python left to the agent.
AGENTS_OWN = "default (the agent's)"
# The task_events menu: the value sent -> what it says; "" is "not given".
TASK_EVENTS_CHOICES = (("", "unchanged"), ("true", "on"), ("false", "off"))

# What a successful POST says on the page it redirects to: a fixed set, so
# the query string cannot put words on the page.
NOTICES = {
    "login": "Logged in.",
    "logout": "Logged out.",
    "app": "App saved.",
    "create": "Instance created.",
    "delete": "Instance deleted.",
    "enable": "Instance enabled.",
    "disable": "Instance disabled.",
    "restart": "Instance restarted.",
    "autoscale": "Autoscale set.",
    "consume": "Queue added to the instance.",
    "cancel": "Queue removed from the instance.",
    "declare": "Queue declared.",
    "undeclare": "Queue declaration deleted.",
    "policy": "Autoscaling policy saved.",
    "unpolicy": "Autoscaling policy deleted.",
}

SECURITY_HEADERS = {
    b"Content-Type": b"text/html; charset=utf-8",
    # No script at all; forms may only go back to this agent.
    b"Content-Security-Policy": b"default-src 'none'; style-src 'unsafe-inline'; "
    b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    b"X-Frame-Options": b"DENY",
    b"X-Content-Type-Options": b"nosniff",
    # Not "no-referrer": with it browsers send "Origin: null" on form
    # posts, and the origin check below would refuse our own forms.
    b"Referrer-Policy": b"same-origin",
    b"Cache-Control": b"no-store",
}

# The per-instance actions: form action -> (agent operation, notice key).
INSTANCE_ACTIONS = {
    "delete": "instance_delete",
    "enable": "instance_enable",
    "disable": "instance_disable",
    "restart": "instance_restart",
    "autoscale": "autoscale_set",
    "consume": "consume",
    "cancel": "cancel",
}


@attrs.frozen
class PageData:
    """Everything the page shows, gathered before rendering."""

    agent_id: str
    root: str
    csrf: str
    auth_enabled: bool
    logged_in: bool
    members: list[dict[str, Any]] = attrs.Factory(list)
    local: list[dict[str, Any]] = attrs.Factory(list)
    others: dict[str, list[dict[str, Any]]] = attrs.Factory(dict)
    missing: tuple[str, ...] = ()
    apps: list[Any] = attrs.Factory(list)
    queues: list[tuple[str, Any]] = attrs.Factory(list)
    # Autoscaling policies, each with ``decision`` (scs.autoscaling).
    policies: list[dict[str, Any]] = attrs.Factory(list)
    notice: str | None = None
    error: str | None = None
    sent: tuple[tuple[str, str], ...] = ()
    # Values to put back into the form that failed: form id -> field -> value.
    refill: dict[str, dict[str, str]] = attrs.Factory(dict)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


class AdminPage(Element):
    loader = XMLFile(TEMPLATE)

    def __init__(self, data: PageData) -> None:
        super().__init__()
        self.data = data

    # -- helpers ----------------------------------------------------------

    def form(self, action: str, *children: Any, **attributes: str) -> Tag:
        """A POST form to ``root + action`` carrying the anti-forgery token."""
        return tags.form(
            tags.input(type="hidden", name=CSRF_FIELD, value=self.data.csrf),
            *children,
            method="post",
            action=self.data.root + action,
            **attributes,
        )

    def field(self, form_id: str, name: str, label: str, default: str = "", **attributes: str) -> Tag:
        value = self.data.refill.get(form_id, {}).get(name, default)
        return tags.label(
            label,
            " ",
            tags.input(name=name, value=value, id=f"{form_id}-{name}", **attributes),
        )

    def instance_form(self, instance: dict[str, Any], action: str, *children: Any) -> Tag:
        return self.form(
            "instance/" + action,
            tags.input(type="hidden", name="app", value=instance["app"]),
            tags.input(type="hidden", name="name", value=instance["name"]),
            *children,
            **{"class": "inline", "data-action": action},
        )

    # -- renderers ----------------------------------------------------------

    @renderer
    def agent_id(self, request: IRequest, tag: Tag) -> Tag:
        return tag(self.data.agent_id)

    @renderer
    def messages(self, request: IRequest, tag: Tag) -> Any:
        out = []
        if self.data.notice:
            out.append(tags.p(self.data.notice, id="notice", **{"class": "notice", "role": "status"}))
        if self.data.error:
            box = tags.div(
                tags.p(tags.strong("Error: "), self.data.error),
                id="error",
                **{"class": "error", "role": "alert"},
            )
            if self.data.sent:
                box(
                    tags.p("You sent:"),
                    tags.dl(*[(tags.dt(k), tags.dd(tags.code(val))) for k, val in self.data.sent]),
                )
            out.append(box)
        return out

    @renderer
    def session(self, request: IRequest, tag: Tag) -> Any:
        if not self.data.auth_enabled or not self.data.logged_in:
            return ""
        return tag(self.form("logout", tags.button("Log out", type="submit")))

    @renderer
    def login(self, request: IRequest, tag: Tag) -> Any:
        if self.data.logged_in:
            return ""
        return tag(
            tags.h2("Log in"),
            tags.p("This agent needs its access token (the content of --auth-token-file)."),
            self.form(
                "login",
                tags.label(
                    "Token ",
                    tags.input(type="password", name="token", id="login-token", autocomplete="off"),
                ),
                " ",
                tags.button("Log in", type="submit"),
                id="login",
            ),
        )

    @renderer
    def body(self, request: IRequest, tag: Tag) -> Any:
        if not self.data.logged_in:
            return ""
        return tag

    @renderer
    def members(self, request: IRequest, tag: Tag) -> Any:
        rows = []
        for m in self.data.members:
            rows.append(
                tags.tr(
                    tags.td(m.get("id")),
                    tags.td(_text(m.get("url"))),
                    tags.td("yes" if m.get("alive") else "no"),
                    tags.td(_text(m.get("instances"))),
                )
            )
        return tag(*rows)

    @renderer
    def local_instances(self, request: IRequest, tag: Tag) -> Any:
        if not self.data.local:
            return tag(tags.tr(tags.td("No instances on this agent.", colspan="9")))
        return tag(*[self._instance_row(inst) for inst in self.data.local])

    def _instance_row(self, inst: dict[str, Any]) -> Tag:
        """One row of this agent's instances: its state, and its forms."""
        return tags.tr(
            tags.td(tags.code(inst["name"]), **{"class": "name"}),
            tags.td(inst["app"]),
            tags.td(inst["state"], **{"class": "state state-" + str(inst["state"])}),
            tags.td("yes" if inst["is_enabled"] else "no", **{"class": "enabled"}),
            tags.td(_text(inst["pid"]), **{"class": "pid"}),
            tags.td(str(inst["restarts"]), **{"class": "restarts"}),
            tags.td(
                f"{inst['min_concurrency']}–{inst['max_concurrency']}",
                **{"class": "concurrency"},
            ),
            tags.td(*self._queue_cell(inst)),
            tags.td(*self._settings_cell(inst)),
            id="instance-" + inst["name"],
            **{"class": "instance", "data-name": inst["name"]},
        )

    def _queue_cell(self, inst: dict[str, Any]) -> list[Any]:
        queues = [
            tags.li(
                tags.span(q, **{"class": "queue"}),
                " ",
                self.instance_form(
                    inst,
                    "cancel",
                    tags.input(type="hidden", name="queue", value=q),
                    tags.button("remove", type="submit", title=f"stop consuming {q}"),
                ),
            )
            for q in inst["queues"]
        ]
        return [
            tags.ul(*queues, **{"class": "queues"}),
            self.instance_form(
                inst,
                "consume",
                tags.input(name="queue", size="12", placeholder="queue", required=""),
                tags.button("add queue", type="submit"),
            ),
        ]

    def _settings_cell(self, inst: dict[str, Any]) -> list[Any]:
        broker = inst["broker"]
        toggle = (
            self.instance_form(inst, "disable", tags.button("Disable", type="submit"))
            if inst["is_enabled"]
            else self.instance_form(inst, "enable", tags.button("Enable", type="submit"))
        )
        return [
            tags.div(
                "broker ",
                tags.code(f"{broker['userid']}@{broker['hostname']}:{broker['port']}/{broker['virtual_host']}"),
            ),
            tags.div("arguments ", tags.code(" ".join(inst.get("arguments") or ()))) if inst.get("arguments") else "",
            self.instance_form(
                inst,
                "autoscale",
                tags.label("max ", tags.input(name="max", size="3", value=str(inst["max_concurrency"]))),
                tags.label(" min ", tags.input(name="min", size="3", value=str(inst["min_concurrency"]))),
                tags.button("set autoscale", type="submit"),
            ),
            toggle,
            self.instance_form(inst, "restart", tags.button("Restart", type="submit")),
            self.instance_form(inst, "delete", tags.button("Delete", type="submit")),
        ]

    @renderer
    def create_form(self, request: IRequest, tag: Tag) -> Tag:
        f = "create"
        return tag(
            self.form(
                "instances",
                tags.p(
                    self.field(f, "app", "app", required=""),
                    " ",
                    self.field(f, "name", "name (empty: random)"),
                ),
                tags.p(
                    self.field(f, "max_concurrency", "max concurrency", "1", size="3"),
                    " ",
                    self.field(f, "min_concurrency", "min concurrency", "1", size="3"),
                    " ",
                    self.field(f, "queues", "queues (comma list)"),
                ),
                tags.p(
                    self.field(f, "broker", "broker URL (empty: the app's)", size="40"),
                    " ",
                    self.field(f, "arguments", "extra worker arguments", size="30"),
                ),
                tags.button("Create instance", type="submit"),
                id="create-instance",
            )
        )

    @renderer
    def apps(self, request: IRequest, tag: Tag) -> Tag:
        rows = [
            tags.tr(
                tags.td(tags.code(a.name)),
                tags.td(tags.code(f"{a.broker.userid}@{a.broker.hostname}:{a.broker.port}/{a.broker.virtual_host}")),
                tags.td(_text(a.celery_app)),
                tags.td(tags.code(" ".join(a.arguments))),
                tags.td(
                    tags.ul(*[tags.li(tags.code(f"{name}={value}")) for name, value in a.env], **{"class": "env"})
                    if a.env
                    else "none",
                    **{"class": "env"},
                ),
                tags.td(tags.code(a.workdir) if a.workdir else AGENTS_OWN, **{"class": "workdir"}),
                tags.td(tags.code(a.python) if a.python else AGENTS_OWN, **{"class": "python"}),
                tags.td("yes" if a.task_events else "no", **{"class": "task-events"}),
                tags.td(self._app_edit(a)),
                **{"class": "app", "data-name": a.name},
            )
            for a in self.data.apps
        ]
        if not rows:
            rows = [tags.tr(tags.td("No apps yet.", colspan="9"))]
        return tag(*rows)

    def _app_edit(self, app: Any) -> Tag:
        """An app's settings for its workers, in a form filled with their
        current values (or with what was sent, when that was refused)."""
        sent = self.data.refill.get("app", {})
        refused = sent.get("name") == app.name
        values = (
            sent
            if refused
            else {
                "env": _env_text(app.env),
                "workdir": app.workdir or v.DEFAULT_SETTING,
                "python": app.python or v.DEFAULT_SETTING,
                "task_events": "true" if app.task_events else "false",
            }
        )
        return tags.details(
            tags.summary("edit settings"),
            self.form(
                "apps",
                tags.input(type="hidden", name="name", value=app.name),
                *self._app_settings_fields("edit-" + app.name, values),
                tags.button("Save settings", type="submit"),
                **{"class": "edit-app"},
            ),
            **({"open": ""} if refused else {}),
        )

    def _app_settings_fields(self, form_id: str, values: Mapping[str, str]) -> list[Tag]:
        """The fields of ``env``, ``workdir``, ``python`` and ``task_events``."""
        task_events = values.get("task_events", "")
        return [
            tags.p(
                tags.label(
                    "environment variables (NAME=value, one a line)",
                    tags.br(),
                    tags.textarea(
                        values.get("env", ""), name="env", id=f"{form_id}-env", rows="4", cols="48", spellcheck="false"
                    ),
                )
            ),
            tags.p(
                tags.label(
                    "workdir ",
                    tags.input(name="workdir", value=values.get("workdir", ""), id=f"{form_id}-workdir", size="30"),
                ),
                " ",
                tags.label(
                    "python ",
                    tags.input(name="python", value=values.get("python", ""), id=f"{form_id}-python", size="30"),
                ),
                " ",
                tags.label(
                    "task events (-E) ",
                    tags.select(
                        *[
                            tags.option(text, value=value, **({"selected": ""} if value == task_events else {}))
                            for value, text in TASK_EVENTS_CHOICES
                        ],
                        name="task_events",
                        id=f"{form_id}-task_events",
                    ),
                ),
            ),
            tags.p(
                "An empty field leaves the setting unchanged. ",
                tags.strong("env"),
                ": one ",
                tags.code("NAME=value"),
                " a line (or a JSON object); it replaces all the app's variables, ",
                tags.code("{}"),
                " removes them all. Values are shown here and stored in clear: keep secrets in files the app reads. ",
                tags.strong("workdir"),
                ", ",
                tags.strong("python"),
                ": an absolute path on this agent's machine, or ",
                tags.code(v.DEFAULT_SETTING),
                " for the agent's own.",
                **{"class": "help"},
            ),
        ]

    @renderer
    def app_form(self, request: IRequest, tag: Tag) -> Tag:
        f = "app"
        return tag(
            self.form(
                "apps",
                tags.p(
                    self.field(f, "name", "name", required=""),
                    " ",
                    self.field(f, "broker", "broker URL", size="40"),
                ),
                tags.p(
                    self.field(f, "celery_app", "celery app (-A)"),
                    " ",
                    self.field(f, "arguments", "extra worker arguments", size="30"),
                ),
                *self._app_settings_fields(f, self.data.refill.get(f, {})),
                tags.button("Save app", type="submit"),
                id="put-app",
            )
        )

    @renderer
    def queues(self, request: IRequest, tag: Tag) -> Tag:
        rows = []
        for app, q in self.data.queues:
            rows.append(
                tags.tr(
                    tags.td(app),
                    tags.td(tags.code(q.name)),
                    tags.td(q.exchange),
                    tags.td(q.routing_key),
                    tags.td(_text(q.exchange_type)),
                    tags.td(tags.code(_text(q.options))),
                    tags.td(
                        self.form(
                            "queues/delete",
                            tags.input(type="hidden", name="app", value=app),
                            tags.input(type="hidden", name="name", value=q.name),
                            tags.button("Delete", type="submit"),
                            **{"class": "inline"},
                        )
                    ),
                    **{"class": "queue-declaration", "data-name": q.name},
                )
            )
        if not rows:
            rows = [tags.tr(tags.td("No queues declared on this agent.", colspan="7"))]
        return tag(*rows)

    @renderer
    def queue_form(self, request: IRequest, tag: Tag) -> Tag:
        f = "declare"
        return tag(
            self.form(
                "queues",
                tags.p(
                    self.field(f, "app", "app", required=""),
                    " ",
                    self.field(f, "name", "queue", required=""),
                ),
                tags.p(
                    self.field(f, "exchange", "exchange (empty: the queue's name)"),
                    " ",
                    self.field(f, "routing_key", "routing key (empty: the queue's name)"),
                ),
                tags.p(
                    self.field(f, "exchange_type", "exchange type"),
                    " ",
                    self.field(f, "options", "options (JSON object)", size="30"),
                ),
                tags.button("Declare queue", type="submit"),
                id="declare-queue",
            )
        )

    @renderer
    def policies(self, request: IRequest, tag: Tag) -> Tag:
        rows = []
        for policy in self.data.policies:
            rows.append(
                tags.tr(
                    tags.td(tags.code(policy["app"])),
                    tags.td(tags.code(policy["queue"])),
                    tags.td(f"{policy['min_instances']}–{policy['max_instances']}"),
                    tags.td(_text(policy["messages_per_instance"])),
                    tags.td(f"{policy['scale_down_after']:g} s"),
                    tags.td(_decision_text(policy.get("decision")), **{"class": "decision"}),
                    tags.td(
                        self.form(
                            "autoscaling/delete",
                            tags.input(type="hidden", name="app", value=policy["app"]),
                            tags.button("Delete policy", type="submit"),
                            **{"class": "inline"},
                        )
                    ),
                    **{"class": "policy", "data-app": policy["app"]},
                )
            )
        if not rows:
            rows = [tags.tr(tags.td("No autoscaling policies.", colspan="7"))]
        return tag(*rows)

    @renderer
    def policy_form(self, request: IRequest, tag: Tag) -> Tag:
        f = "policy"
        return tag(
            self.form(
                "autoscaling",
                tags.p(
                    self.field(f, "app", "app", required=""),
                    " ",
                    self.field(f, "queue", "queue (empty: unchanged)"),
                ),
                tags.p(
                    self.field(f, "min_instances", "min instances", size="4"),
                    " ",
                    self.field(f, "max_instances", "max instances", size="4"),
                    " ",
                    self.field(f, "messages_per_instance", "messages per instance", size="6"),
                    " ",
                    self.field(f, "scale_down_after", "scale down after (s)", size="6"),
                ),
                tags.button("Save policy", type="submit"),
                id="put-policy",
            )
        )

    @renderer
    def others(self, request: IRequest, tag: Tag) -> Tag:
        rows = []
        for agent in sorted(self.data.others):
            for inst in self.data.others[agent]:
                rows.append(
                    tags.tr(
                        tags.td(agent),
                        tags.td(tags.code(inst.get("name"))),
                        tags.td(_text(inst.get("app"))),
                        tags.td(_text(inst.get("state"))),
                        tags.td("yes" if inst.get("is_enabled") else "no"),
                        tags.td(_text(inst.get("pid"))),
                        tags.td(_text(inst.get("restarts"))),
                        tags.td(f"{inst.get('min_concurrency')}–{inst.get('max_concurrency')}"),
                        tags.td(", ".join(str(q) for q in inst.get("queues") or ())),
                        **{"class": "other-instance"},
                    )
                )
        if not rows:
            rows = [tags.tr(tags.td("No instances on other agents.", colspan="9"))]
        return tag(*rows)

    @renderer
    def missing(self, request: IRequest, tag: Tag) -> Any:
        if not self.data.missing:
            return ""
        return tag("These agents did not answer: ", ", ".join(self.data.missing))


class Admin:
    """The admin page as a Klein app; ``resource()`` is mounted at ``root``."""

    app = Klein()

    def __init__(
        self,
        agent: Any,
        auth: TokenAuth | None = None,
        secret: bytes | None = None,
        root: str = ADMIN_ROOT,
        max_body: int = DEFAULT_MAX_BODY,
        nonce: Callable[[], bytes] = lambda: os.urandom(16).hex().encode(),
    ) -> None:
        self.agent = agent
        self.auth = auth
        # Restarting the agent invalidates open pages' tokens: a reload fixes it.
        self.secret = secret if secret is not None else os.urandom(32)
        self.root = root
        self.max_body = max_body
        self._nonce = nonce

    def resource(self) -> IResource:
        return self.app.resource()

    # -- plumbing -----------------------------------------------------------

    def _csrf_nonce(self, request: IRequest) -> bytes:
        """This browser's nonce, setting a new cookie when it has none."""
        nonce = request.getCookie(CSRF_COOKIE)
        if nonce is None or not _NONCE.match(nonce):
            nonce = self._nonce()
            request.addCookie(
                CSRF_COOKIE,
                nonce,
                path=self.root,
                httpOnly=True,
                sameSite="strict",
                secure=request.isSecure(),
            )
        return nonce

    def csrf_token(self, nonce: bytes) -> str:
        return hmac.new(self.secret, b"csrf:" + nonce, hashlib.sha256).hexdigest()

    def _csrf_ok(self, request: IRequest, params: Mapping[str, Any]) -> bool:
        nonce = request.getCookie(CSRF_COOKIE)
        sent = params.get(CSRF_FIELD)
        if nonce is None or not _NONCE.match(nonce) or not isinstance(sent, str):
            return False
        if not hmac.compare_digest(sent.encode("utf-8", "replace"), self.csrf_token(nonce).encode()):
            return False
        return _same_origin(request)

    def _logged_in(self, request: IRequest) -> bool:
        return self.auth is None or self.auth.check_admin(request)

    async def _page(
        self,
        request: IRequest,
        status: int = 200,
        error: str | None = None,
        sent: Iterable[tuple[str, str]] = (),
        refill: dict[str, dict[str, str]] | None = None,
        notice: str | None = None,
    ) -> bytes:
        logged_in = self._logged_in(request)
        nonce = self._csrf_nonce(request)
        data: dict[str, Any] = {
            "agent_id": self.agent.agent_id,
            "root": self.root,
            "csrf": self.csrf_token(nonce),
            "auth_enabled": self.auth is not None,
            "logged_in": logged_in,
            "notice": notice,
            "error": error,
            "sent": tuple(sent),
            "refill": refill or {},
        }
        if logged_in:
            data.update(await self._gather())
        else:
            status = 401 if status < 400 else status
            # Not a basic-auth challenge: a browser would show its own
            # dialog instead of the login form.
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="scs-agent admin"')
        body = await flattenString(request, AdminPage(PageData(**data)))
        request.setResponseCode(status)
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        return b"<!DOCTYPE html>\n" + body

    async def _gather(self) -> dict[str, Any]:
        local = self.agent.local
        others: dict[str, list[dict[str, Any]]] = {}
        missing: tuple[str, ...] = ()
        try:
            results, missing = await self.agent.instance_details()
            others = {a: list(r) for a, r in results.items() if a != self.agent.agent_id}
        except SCSError as e:
            log.warn("admin: listing other agents failed: {error}", error=e.message)
        except Exception:  # noqa: BLE001 - the local part of the page must still show
            log.failure("admin: listing other agents failed")
        apps = local.app_records()
        queues = [(a.name, q) for a in apps for q in local.queue_records(a.name)]
        policies = []
        for policy in local.store.policies.list_all():
            decision = None
            try:
                decision = await self.agent.autoscaling_decision(policy.app)
            except Exception:  # noqa: BLE001 - the policy shows without its decision
                log.failure("admin: reading the autoscaling decision failed")
            policies.append({**policy.to_json(), "decision": decision})
        return {
            "policies": policies,
            "members": self.agent.members(),
            "local": local.instance_details(),
            "others": others,
            "missing": tuple(missing),
            "apps": apps,
            "queues": queues,
        }

    def _redirect(self, request: IRequest, done: str) -> bytes:
        request.setResponseCode(303)
        request.setHeader(b"Location", f"{self.root}?done={done}".encode())
        request.setHeader(b"Cache-Control", b"no-store")
        return b""

    async def _post(
        self,
        request: IRequest,
        form_id: str,
        run: Callable[[dict[str, Any]], Any],
        login_required: bool = True,
    ) -> bytes:
        """The common path of every form: read, check, run, redirect; or
        show the page with the error."""
        try:
            params = request_params(request, self.max_body)
        except SCSError as e:
            return await self._page(request, e.status, error=e.message)
        sent = [
            (k, val if isinstance(val, str) else repr(val))
            for k, val in params.items()
            if k not in (CSRF_FIELD, "token")
        ]
        if not self._csrf_ok(request, params):
            log.warn("admin: refused a form without a valid anti-forgery token", event="admin.csrf")
            return await self._page(
                request,
                403,
                error="The form's anti-forgery token is missing or wrong "
                "(the page may be from before the agent restarted): reload the page and try again.",
            )
        if login_required and not self._logged_in(request):
            return await self._page(request, 401, error="Log in first.")
        fields = {k: val for k, val in params.items() if k != CSRF_FIELD}
        try:
            done = await run(fields)
        except SCSError as e:
            return await self._page(request, e.status, error=e.message, sent=sent, refill={form_id: dict(sent)})
        except Exception:  # noqa: BLE001 - never a stack trace on the page
            log.failure("admin: {form} failed", Failure(), form=form_id)
            return await self._page(request, 500, error="Internal error; see the agent's log.", sent=sent)
        return self._redirect(request, done)

    # -- routes -------------------------------------------------------------

    @app.route("/", methods=["GET", "HEAD"])
    async def page(self, request: IRequest) -> bytes:
        done = request.args.get(b"done", [b""])[0].decode("ascii", "replace")
        return await self._page(request, notice=NOTICES.get(done))

    @app.route("/login", methods=["POST"])
    async def login(self, request: IRequest) -> bytes:
        async def run(fields: dict[str, Any]) -> str:
            v.only(fields, ("token",))
            if self.auth is None:
                return "login"
            token = fields.get("token")
            if not isinstance(token, str) or not self.auth.check_token(token):
                log.warn("admin: failed login", event="admin.login.failed")
                raise _LoginFailed("wrong token")
            request.addCookie(
                SESSION_COOKIE,
                self.auth.new_session(),
                path=self.root,
                httpOnly=True,
                sameSite="strict",
                secure=request.isSecure(),
                max_age=str(int(SESSION_LIFETIME)),
            )
            return "login"

        return await self._post(request, "login", run, login_required=False)

    @app.route("/logout", methods=["POST"])
    async def logout(self, request: IRequest) -> bytes:
        async def run(fields: dict[str, Any]) -> str:
            request.addCookie(
                SESSION_COOKIE,
                b"",
                path=self.root,
                httpOnly=True,
                sameSite="strict",
                secure=request.isSecure(),
                max_age="0",
            )
            return "logout"

        return await self._post(request, "logout", run, login_required=False)

    @app.route("/apps", methods=["POST"])
    async def put_app(self, request: IRequest) -> bytes:
        async def run(fields: dict[str, Any]) -> str:
            v.only(fields, ("name", *v.APP_SETTINGS))
            name = v.check_app_name(fields.get("name", ""))
            if isinstance(fields.get("env"), str):
                env = _env_from_lines(fields.pop("env"))
                if env is not None:
                    fields["env"] = env
            _drop_unchanged_paths(fields, self.agent.store, name)
            # The API's checks, the same function (scs.validation).
            await self.agent.app_put(name, **v.check_app_settings(fields))
            return "app"

        return await self._post(request, "app", run)

    @app.route("/instances", methods=["POST"])
    async def create(self, request: IRequest) -> bytes:
        async def run(fields: dict[str, Any]) -> str:
            v.only(
                fields,
                ("app", "name", "max_concurrency", "min_concurrency", "queues", "broker", "arguments"),
            )
            app = v.check_app_name(fields.get("app", ""))
            name = v.check_instance_name(fields["name"]) if _given(fields, "name") else None
            max_c = v.check_concurrency(fields.get("max_concurrency") or "1", "max_concurrency")
            min_c = v.check_concurrency(fields.get("min_concurrency") or "1", "min_concurrency")
            v.check_concurrency_range(max_c, min_c)
            queues = list(v.check_queue_list(fields.get("queues", "")))
            broker = v.check_broker_url(fields["broker"]) if _given(fields, "broker") else None
            arguments = list(v.check_arguments(fields.get("arguments", "")))
            # This agent's page edits this agent: the instance is created
            # here, not placed at random in the cluster as the API does.
            reply = await self.agent.instance_create(
                app,
                name,
                on=self.agent.agent_id,
                max_concurrency=max_c,
                min_concurrency=min_c,
                queues=queues,
                broker=broker,
                arguments=arguments,
            )
            log.info("admin: <-- created {name}", name=reply.body["name"])
            return "create"

        return await self._post(request, "create", run)

    @app.route("/instance/<action>", methods=["POST"])
    async def instance(self, request: IRequest, action: str) -> bytes:
        operation = INSTANCE_ACTIONS.get(action)

        async def run(fields: dict[str, Any]) -> str:
            if operation is None:
                raise BadParameter(f"unknown action {action!r}", parameter="action")
            extra: dict[str, Any] = {}
            if action == "autoscale":
                v.only(fields, ("app", "name", "max", "min"))
                if _given(fields, "max"):
                    extra["max"] = v.check_concurrency(fields["max"], "max")
                if _given(fields, "min"):
                    extra["min"] = v.check_concurrency(fields["min"], "min")
                if not extra:
                    raise BadParameter("give max, min or both", parameter="max")
                if "max" in extra and "min" in extra:
                    v.check_concurrency_range(extra["max"], extra["min"])
            elif action in ("consume", "cancel"):
                v.only(fields, ("app", "name", "queue"))
                extra["queue"] = v.check_queue_name(fields.get("queue", ""))
            else:
                v.only(fields, ("app", "name"))
            name = v.check_instance_name(fields.get("name", ""))
            app = v.check_app_name(fields["app"]) if _given(fields, "app") else None
            await self.agent.instance_operation(operation, name, app, **extra)
            return action

        return await self._post(request, "instance-" + action, run)

    @app.route("/queues", methods=["POST"])
    async def declare(self, request: IRequest) -> bytes:
        async def run(fields: dict[str, Any]) -> str:
            v.only(fields, ("app", "name", "exchange", "routing_key", "exchange_type", "options"))
            app = v.check_app_name(fields.get("app", ""))
            binding = v.queue_binding(
                fields.get("name", ""), {k: val for k, val in fields.items() if k not in ("app", "name")}
            )
            await self.agent.queue_declare(app, binding)
            return "declare"

        return await self._post(request, "declare", run)

    @app.route("/queues/delete", methods=["POST"])
    async def undeclare(self, request: IRequest) -> bytes:
        async def run(fields: dict[str, Any]) -> str:
            v.only(fields, ("app", "name"))
            await self.agent.queue_operation(
                "queue_delete",
                v.check_app_name(fields.get("app", "")),
                v.check_queue_name(fields.get("name", "")),
            )
            return "undeclare"

        return await self._post(request, "undeclare", run)

    @app.route("/autoscaling", methods=["POST"])
    async def put_policy(self, request: IRequest) -> bytes:
        async def run(fields: dict[str, Any]) -> str:
            v.only(fields, ("app", *v.POLICY_FIELDS))
            app = v.check_app_name(fields.get("app", ""))
            given = {k: val for k, val in fields.items() if k != "app" and _given(fields, k)}
            await self.agent.autoscaling_put(app, v.check_policy_fields(given))
            return "policy"

        return await self._post(request, "policy", run)

    @app.route("/autoscaling/delete", methods=["POST"])
    async def delete_policy(self, request: IRequest) -> bytes:
        async def run(fields: dict[str, Any]) -> str:
            v.only(fields, ("app",))
            await self.agent.autoscaling_delete(v.check_app_name(fields.get("app", "")))
            return "unpolicy"

        return await self._post(request, "unpolicy", run)

    @app.route("/<path:rest>", methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
    async def elsewhere(self, request: IRequest, rest: str) -> bytes:
        known = {"login", "logout", "apps", "instances", "queues", "queues/delete", "autoscaling", "autoscaling/delete"}
        if rest in known or rest.startswith("instance/"):
            request.setHeader(b"Allow", b"POST")
            return await self._page(request, 405, error="This address only takes a form (POST).")
        return await self._page(request, 404, error="No such page.")


class _LoginFailed(SCSError):
    status = 401
    code = "unauthorized"


def _decision_text(decision: Mapping[str, Any] | None) -> str:
    """The last autoscaling decision, in one line."""
    if not decision:
        return "no decision yet"
    text = (
        f"{decision.get('direction')}: {decision.get('messages')} messages ready, "
        f"{decision.get('instances')} instances, target {decision.get('target')} (by {decision.get('agent')})"
    )
    if decision.get("changed"):
        text += "; " + ", ".join(str(name) for name in decision["changed"])
    if decision.get("reason"):
        text += f"; {decision['reason']}"
    return text


def _drop_unchanged_paths(fields: dict[str, Any], store: Any, name: str) -> None:
    """An app's edit form sends its ``workdir`` and ``python`` back as they
    are: those are not changes, and are not checked again on this machine
    (an app's paths may exist only on the machines that run its workers;
    saving its env from another agent's page must not be refused)."""
    try:
        app = store.get_app(name)
    except SCSError:
        return
    for setting in ("workdir", "python"):
        if fields.get(setting) == (getattr(app, setting) or v.DEFAULT_SETTING):
            del fields[setting]


def _env_text(env: Iterable[tuple[str, str]]) -> str:
    """An app's ``env`` as the form shows it: one ``NAME=value`` a line."""
    return "\n".join(f"{name}={value}" for name, value in env)


def _env_from_lines(text: str) -> str | dict[str, str] | None:
    """The form's ``env`` for ``validation.check_env``, which checks it:
    ``NAME=value`` lines (blank ones skipped) as a dict, a JSON object's
    text as it is, None (not given) when there is nothing but blanks.
    Messages never quote a value (values may be credentials)."""
    if not text.strip():
        return None
    if text.lstrip().startswith("{"):
        return text
    env: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")  # browsers send a textarea's lines with CRLF
        if not line.strip():
            continue
        name, equals, value = line.partition("=")
        name = name.strip()
        if not equals:
            raise BadParameter(f"env: line {number} is not NAME=value", parameter="env")
        if name in env:
            raise BadParameter(f"env: {name[:40]!r} is given twice", parameter="env", variable=name)
        env[name] = value
    return env


def _given(fields: Mapping[str, Any], name: str) -> bool:
    """A form sends every field; an empty one means "not given"."""
    value = fields.get(name)
    return value is not None and value != ""


def _same_origin(request: IRequest) -> bool:
    """False when the browser says the form came from another site."""
    origin = request.getHeader(b"origin")
    if origin is None:
        return True  # not a browser, or an old one: the token decides
    host = request.getHeader(b"host")
    try:
        parts = urlsplit(origin.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    return host is not None and parts.scheme in ("http", "https") and parts.netloc.encode() == host
