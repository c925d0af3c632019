"""Access control (issue 5): the bearer token on the API and /metrics, the
admin page's login form, basic auth and session cookie; refused requests
change nothing."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from surfaces_support import TOKEN, Surfaces

from scs.http.auth import SESSION_LIFETIME, TokenAuth, TokenFileError, read_token_file
from scs.tap import Options

# Requests that would change the store if they got through.
MUTATIONS = [
    ("PUT", "/foo/", b""),
    ("PUT", "/foo/instances/w2/", b""),
    ("POST", "/foo/instances/", b""),
    ("DELETE", "/foo/instances/w1/", b""),
    ("DELETE", "/instances/w1/", b""),
    ("POST", "/foo/instances/w1/disable", b""),
    ("POST", "/foo/instances/w1/autoscale/", b"max=5&min=2"),
    ("PUT", "/foo/instances/w1/queues/q9/", b""),
    ("DELETE", "/foo/instances/w1/queues/tasks/", b""),
    ("POST", "/foo/queues/q9/", b""),
    ("DELETE", "/foo/queues/tasks/", b""),
    ("DELETE", "/foo/", b""),
]
READS = ["/ping/", "/agents/", "/foo/instances/", "/foo/instances/w1/", "/foo/queues/", "/metrics", "/nothing/here/"]
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def site() -> Surfaces:
    site = Surfaces(token=TOKEN)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert site.request("PUT", "/foo/instances/w1/?queues=tasks", headers=bearer).code == 201
    assert site.request("POST", "/foo/queues/tasks/", headers=bearer).code == 201
    return site


def basic(password: str, user: str = "admin") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


WRONG = [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": f"Token {TOKEN}"},
    {"Authorization": f"Bearer {TOKEN.upper()}"},
    basic(TOKEN),  # basic auth is for the admin page only
    {"Authorization": "Bearer tökén"},
]


@pytest.mark.parametrize("headers", WRONG)
def test_without_the_token_everything_is_401_and_nothing_changes(site: Surfaces, headers: dict[str, str]) -> None:
    before = site.store.dump()
    for method, path, body in MUTATIONS:
        response = site.request(method, path, body or None, {**FORM, **headers})
        assert response.code == 401, (method, path)
        assert response.header("content-type") == "application/json"
        assert json.loads(response.body) == {"error": "missing or wrong bearer token"}
        assert response.header("www-authenticate").startswith("Bearer")
    for path in READS:
        assert site.request("GET", path, headers=headers).code == 401, path
    assert site.store.dump() == before


def test_with_the_token_the_api_and_metrics_answer(site: Surfaces) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert site.request("GET", "/ping/", headers=bearer).code == 200
    assert site.request("GET", "/metrics", headers=bearer).code == 200
    assert site.request("GET", "/foo/instances/", headers={"Authorization": f"bearer  {TOKEN} "}).code == 200
    assert site.request("POST", "/foo/instances/w1/disable", headers=bearer).code == 200
    assert site.store.get_node("w1").is_enabled is False


def test_refused_requests_are_counted_as_401(site: Surfaces) -> None:
    site.request("DELETE", "/foo/instances/w1/")
    site.request("GET", "/metrics")
    counted = site.metrics.registry.get_sample_value(
        "scs_http_requests_total", {"route": "instance_delete", "method": "DELETE", "status": "401"}
    )
    assert counted == 1.0
    assert (
        site.metrics.registry.get_sample_value(
            "scs_http_requests_total", {"route": "metrics", "method": "GET", "status": "401"}
        )
        == 1.0
    )


def test_a_percent_encoded_admin_path_is_not_a_way_around(site: Surfaces) -> None:
    before = site.store.dump()
    assert site.request("DELETE", "/%61dmin/../foo/instances/w1/").code in (401, 404, 405)
    assert site.request("DELETE", "/%66oo/instances/w1/").code == 401
    assert site.store.dump() == before


# -- the admin page ------------------------------------------------------------------------


def test_admin_page_asks_for_the_token(site: Surfaces) -> None:
    response = site.page()
    assert response.code == 401
    assert response.header("content-type") == "text/html; charset=utf-8"
    assert 'name="token"' in response.text
    assert "w1" not in response.text  # nothing of the agent before logging in
    # No basic-auth challenge: the browser shows the login form, not a dialog.
    assert not response.header("www-authenticate").lower().startswith("basic")


def test_admin_forms_are_refused_before_login_and_change_nothing(site: Surfaces) -> None:
    before = site.store.dump()
    response = site.submit("instance/delete", {"app": "foo", "name": "w1"})
    assert response.code == 401
    assert site.store.dump() == before


def test_admin_login_form_sets_a_session_cookie(site: Surfaces) -> None:
    assert site.submit("login", {"token": "wrong"}).code == 401
    assert "scs_session" not in site.cookies
    response = site.submit("login", {"token": TOKEN})
    assert response.code == 303
    cookie = [c for c in response.headers.getRawHeaders("set-cookie") if c.startswith("scs_session=")][0]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/admin/" in cookie
    assert TOKEN not in cookie  # the cookie is a signed session, not the token
    page = site.page()
    assert page.code == 200 and 'id="instance-w1"' in page.text
    assert site.submit("instance/disable", {"app": "foo", "name": "w1"}).code == 303
    assert site.store.get_node("w1").is_enabled is False
    # Logging in does not open the API: it takes the bearer token only.
    assert site.request("GET", "/foo/instances/").code == 401
    assert site.submit("logout", {}).code == 303
    assert "scs_session" not in site.cookies
    assert site.page().code == 401


def test_login_needs_the_anti_forgery_token_too(site: Surfaces) -> None:
    assert site.submit("login", {"token": TOKEN}, csrf=False).code == 403
    assert "scs_session" not in site.cookies


def test_admin_takes_basic_auth_and_bearer(site: Surfaces) -> None:
    assert site.page(headers=basic(TOKEN)).code == 200
    assert site.page(headers=basic(TOKEN, user="")).code == 200
    assert site.page(headers=basic("nope")).code == 401
    assert site.page(headers={"Authorization": f"Bearer {TOKEN}"}).code == 200
    response = site.submit("instance/disable", {"app": "foo", "name": "w1"}, headers=basic(TOKEN))
    assert response.code == 303


def test_forged_or_expired_sessions_are_refused(site: Surfaces) -> None:
    for value in ["1", "9999999999.abc", "x.y", ""]:
        site.cookies = {"scs_session": value}
        assert site.page().code == 401
    now = [1_000_000.0]
    auth = TokenAuth(TOKEN, clock=lambda: now[0])
    session = auth.new_session()
    assert auth.check_session(session)
    assert not TokenAuth(TOKEN + "-other").check_session(session)
    now[0] += SESSION_LIFETIME + 1
    assert not auth.check_session(session)


# -- the token file --------------------------------------------------------------------------


def test_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    assert read_token_file(str(path)) == TOKEN
    for content, problem in [("", "empty"), ("\n \n", "empty"), ("short", "too short"), ("tö" * 10, "ASCII")]:
        path.write_text(content)
        with pytest.raises(TokenFileError, match=problem):
            read_token_file(str(path))
    with pytest.raises(TokenFileError, match="cannot read"):
        read_token_file(str(tmp_path / "missing"))


def test_options_refuse_a_bad_token_file(tmp_path: Path) -> None:
    from twisted.python import usage

    options = Options()
    with pytest.raises(usage.UsageError, match="--auth-token-file"):
        options.parseOptions(["--auth-token-file", os.fspath(tmp_path / "missing")])
    path = tmp_path / "token"
    path.write_text(TOKEN)
    options = Options()
    options.parseOptions(["0.0.0.0:8001", "--auth-token-file", os.fspath(path)])
    assert options["http-endpoint"].endswith("0.0.0.0")
