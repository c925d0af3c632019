"""GET /openapi.json: a valid OpenAPI 3.1 document that cannot drift from the
routes (scs.http.openapi), checked on the fake API through StubTreq."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator

from scs.http.api import API, WRITE_METHODS
from scs.http.openapi import (
    MOUNTED,
    api_routes,
    documented_parameters,
    documented_routes,
    openapi_document,
    openapi_path,
)
from tests.test_api import Client, RecordingSupervisor

# A value for each path parameter that names something the probe's store has.
PROBE_VALUES = {"app": "shop", "instance": "seed", "queue": "orders", "agent": "agent1"}
UNKNOWN = "zz_not_a_parameter"
MOUNTED_ROUTES = {(entry["path"], entry["method"]) for entry in MOUNTED}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return openapi_document()


@pytest.fixture
def client() -> Client:
    client = Client(RecordingSupervisor())
    assert client.request("PUT", "/shop/")[0] == 201
    assert client.request("PUT", "/shop/instances/seed/")[0] == 201
    assert client.request("PUT", "/shop/queues/orders/")[0] == 201
    return client


def concrete(path: str, values: dict[str, str] | None = None) -> str:
    values = values or PROBE_VALUES
    return re.sub(r"\{([^}]+)\}", lambda m: values[m.group(1)], path)


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    OpenAPIV31SpecValidator(document).validate()


def test_get_openapi_json_serves_the_document(client: Client, document: dict[str, Any]) -> None:
    for path in ("/openapi.json", "/openapi.json/"):
        status, body, headers = client.request("GET", path)
        assert status == 200
        assert body == json.loads(json.dumps(document))
    assert client.request("GET", f"/openapi.json?{UNKNOWN}=1")[0] == 400
    assert client.request("POST", "/openapi.json")[0] == 405


def test_openapi_json_is_not_an_app_name(client: Client) -> None:
    status, body, _ = client.request("PUT", "/openapi.json/instances/")
    assert (status, body["parameter"]) == (400, "app")


def test_every_route_is_documented_and_every_documented_operation_is_a_route(document: dict[str, Any]) -> None:
    routes = api_routes(API.app.url_map)
    documented = documented_routes(document)
    assert routes - documented == set(), "routes missing from scs/http/openapi.py OPERATIONS"
    assert documented - routes == set(), "operations documented that no route serves"
    # The catch-all and 405 answers are not routes; the mounted surfaces are.
    assert MOUNTED_ROUTES <= routes
    assert ("/{app}/instances/{instance}/queues/{queue}/", "DELETE") in routes


def test_openapi_path_names_the_route_variables() -> None:
    assert openapi_path("/<app>/instances/<name>/queues/<queue>/") == "/{app}/instances/{instance}/queues/{queue}/"
    assert openapi_path("/<app>/queues/<name>/purge/") == "/{app}/queues/{queue}/purge/"
    assert openapi_path("/instances/<name>/") == "/instances/{instance}/"
    assert openapi_path("/agents/<string:id>/drain/") == "/agents/{id}/drain/"


@pytest.mark.parametrize(
    ("path", "method"),
    sorted(documented_routes(openapi_document()) - MOUNTED_ROUTES),
    ids=lambda value: str(value),
)
def test_each_route_accepts_exactly_the_documented_parameters(
    client: Client, document: dict[str, Any], path: str, method: str
) -> None:
    """A route's 400 for an unknown parameter lists the ones it accepts
    (``allowed``); every write route takes ``nowait`` besides."""
    status, body, _ = client.request(method, f"{concrete(path)}?{UNKNOWN}=1")
    assert status == 400 and body.get("parameter") == UNKNOWN, (
        f"{method} {path} must refuse an unknown parameter with a 400 naming it and listing `allowed`: {body}"
    )
    accepted = set(body["allowed"])
    if method in WRITE_METHODS:
        accepted.add("nowait")
    assert documented_parameters(path, method, document) == accepted


def test_every_operation_documents_its_errors(document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            codes = set(operation["responses"])
            assert {"400", "401"} <= codes or (path, method.upper()) in MOUNTED_ROUTES, (path, method)
            if method.upper() in WRITE_METHODS:
                assert {"202", "403"} <= codes, (path, method)
            for code, response in operation["responses"].items():
                if code.startswith(("4", "5")):
                    assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}


# -- answers conform to the document ------------------------------------------------


def conforms(document: dict[str, Any], path: str, method: str, status: int, body: Any) -> None:
    responses = document["paths"][path][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {path} answered {status}, not documented: {body}"
    schema = responses[str(status)]["content"]["application/json"]["schema"]
    validator = Draft202012Validator({"components": document["components"], **schema})
    errors = [error.message for error in validator.iter_errors(body)]
    assert errors == [], f"{method} {path} {status}: {errors}"


def test_the_answers_of_a_session_conform(client: Client, document: dict[str, Any]) -> None:
    seen: set[tuple[str, str]] = set()

    def call(method: str, path: str, expected: int, concrete_path: str | None = None, **kwargs: Any) -> Any:
        status, body, _ = client.request(method, concrete_path or concrete(path), **kwargs)
        assert status == expected, (method, path, status, body)
        conforms(document, path, method, status, body)
        seen.add((path, method))
        return body

    call("GET", "/", 200)
    call("GET", "/ping/", 200)
    call("GET", "/agents/", 200)
    call("GET", "/openapi.json", 200)
    call("PUT", "/{app}/", 200, json={"celery_app": "proj.celery:app", "env": {"A": "1"}, "task_events": True})
    call("POST", "/{app}/", 201, concrete_path="/other/")
    call("GET", "/{app}/", 200)
    call("PUT", "/{app}/instances/", 201, json={"max_concurrency": 3, "queues": ["orders"]})
    call("POST", "/{app}/instances/", 202, data={"nowait": "1"})
    call("PUT", "/{app}/instances/{instance}/", 200)
    call("POST", "/{app}/instances/{instance}/", 409, json={"max_concurrency": 9})
    call("GET", "/{app}/instances/", 200)
    call("GET", "/{app}/instances/", 200, concrete_path="/shop/instances/?details=1")
    call("GET", "/{app}/instances/{instance}/", 200)
    call("GET", "/instances/{instance}/", 200)
    for action in ("disable", "enable", "restart"):
        call("POST", f"/{{app}}/instances/{{instance}}/{action}/", 200)
        call("PUT", f"/{{app}}/{action}/", 200)
    call("POST", "/{app}/restart/", 200, json={"rolling": True})
    call("POST", "/{app}/enable/", 202, json={"nowait": True})
    call("GET", "/{app}/instances/{instance}/autoscale/", 200)
    call("PUT", "/{app}/instances/{instance}/autoscale/", 200, data={"max": "4"})
    call("POST", "/{app}/instances/{instance}/autoscale/", 400, data={"min": "9"})
    call("PUT", "/{app}/instances/{instance}/queues/{queue}/", 201)
    call("GET", "/{app}/instances/{instance}/queues/", 200)
    call("DELETE", "/{app}/instances/{instance}/queues/{queue}/", 200)
    call("GET", "/{app}/instances/{instance}/stats/", 200)
    call("GET", "/{app}/instances/{instance}/log/", 200, concrete_path="/shop/instances/seed/log/?lines=5")
    call("POST", "/{app}/queues/{queue}/", 201, json={"exchange_type": "topic", "options": {"durable": True}})
    call("GET", "/{app}/queues/", 200)
    call("GET", "/{app}/queues/{queue}/", 200)
    call("POST", "/{app}/queues/{queue}/purge/", 503)  # no broker control on the fake
    call("DELETE", "/{app}/queues/{queue}/", 200)
    call("GET", "/{app}/queues/{queue}/", 404)
    call("POST", "/agents/{agent}/drain/", 200)
    call("PUT", "/agents/{agent}/undrain/", 200)
    call("POST", "/agents/{agent}/drain/", 404, concrete_path="/agents/elsewhere/drain/")
    call("DELETE", "/{app}/instances/{instance}/", 200)
    call("DELETE", "/instances/{instance}/", 404)
    call("DELETE", "/{app}/", 200)
    call("GET", "/{app}/", 404)
    assert len(seen) >= 30
