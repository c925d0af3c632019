"""The OpenAPI 3.1 description of the HTTP API, served as ``GET /openapi.json``.

The document is built here, in code, from one table (``OPERATIONS``): each
route and method with the parameters it accepts, where they go (the query
string for reads, a JSON object or form body for writes) and what it
answers, errors included.  ``tests/test_openapi.py`` keeps it honest: every
route of ``scs.http.api`` (``api_routes``) must be described and every
description must be a route, and each route's parameters must be the ones
it accepts (the ``allowed`` list of its 400 for an unknown parameter).  A
route added without its line here fails that test.
"""

from __future__ import annotations

import copy
import re
from functools import lru_cache
from typing import Any

from scs import validation as v
from scs.records import STATES

OPENAPI_VERSION = "3.1.0"
# Werkzeug's "<name>" or "<converter:name>" in a route.
_CONVERTER = re.compile(r"<(?:[a-z]+:)?([A-Za-z_][A-Za-z0-9_]*)>")
# Klein's endpoints that are not routes of their own: the 405 answers of the
# known paths and the catch-all 404.
_NOT_ROUTES = ("not-found",)
_NOT_ROUTE_PREFIXES = ("405-",)

WRITE_METHODS = ("PUT", "POST", "DELETE", "PATCH")

_NAME_PATTERN = r"^\w[\w.\-]*$"
_ERRORS = {
    400: "Bad parameter (names it in ``parameter``), bad Host header or bad URL path",
    401: "Missing or wrong bearer token (agents started with --auth-token-file)",
    403: "A state-changing request from another origin (Origin or Sec-Fetch-Site)",
    404: "No such app, instance, queue or resource",
    409: "Conflict: the instance exists with other settings, or on another agent",
    413: "Body larger than the limit (64 KiB)",
    431: "Request head too large",
    502: "The instance was created but its worker cannot start (the error carries the instance)",
    503: "The cluster, the instance's owner or the broker cannot be reached",
    504: "An agent or worker did not answer in time",
}
# Errors any route can answer: the request reader and the guards' own.
_COMMON_ERRORS = (400, 401, 413, 431)
# Operations that ask the cluster (SRS) or the broker.
_CLUSTER_ERRORS = (503, 504)


# -- parameters ----------------------------------------------------------------


def _string(description: str, **schema: Any) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string", **schema}}


def _boolean(description: str) -> dict[str, Any]:
    return {
        "description": description + " (JSON true/false; in a query or form: 1/0, true/false, yes/no, on/off).",
        "schema": {"type": "boolean"},
        "form": {"type": "string", "enum": ["1", "0", "true", "false", "yes", "no", "on", "off"]},
    }


def _integer(description: str, low: int, high: int) -> dict[str, Any]:
    return {
        "description": f"{description} ({low} to {high}).",
        "schema": {"type": "integer", "minimum": low, "maximum": high},
        "form": {"type": "string", "pattern": r"^[+-]?[0-9]{1,12}$"},
    }


def _name_schema(max_length: int) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": max_length, "pattern": _NAME_PATTERN}


_ROUTING = {
    "type": "string",
    "maxLength": v.MAX_QUEUE_NAME_LENGTH,
    "pattern": r"^[\w.\-:*#]*$",
}

# Every body or query parameter of the API: its description and JSON
# schema, and ``form``: its schema as a query or form field (a string) when
# that differs from the JSON one.
PARAMETERS: dict[str, dict[str, Any]] = {
    "broker": _string(
        "AMQP broker URL, amqp://user:password@host:port/vhost (amqps:// for TLS).",
        minLength=1,
        maxLength=v.MAX_BROKER_URL_LENGTH,
        pattern=r"^(amqp|amqps|pyamqp)://\S*$",
    ),
    "celery_app": {
        "description": "The -A target, a Python import path such as 'proj.celery:app'; null or '' clears it.",
        "schema": {"type": ["string", "null"], "maxLength": 255},
        "form": {"type": "string", "maxLength": 255},
    },
    "arguments": {
        "description": (
            "Extra `celery worker` arguments: a JSON list of strings, or one string split like a "
            f"command line; checked against an allow-list (at most {v.MAX_ARGUMENTS})."
        ),
        "schema": {
            "type": "array",
            "maxItems": v.MAX_ARGUMENTS,
            "items": {"type": "string", "minLength": 1, "maxLength": v.MAX_ARGUMENT_LENGTH},
        },
        "form": {"type": "string"},
    },
    "env": {
        "description": (
            "Environment variables of the app's workers, merged over the agent's: a JSON object of "
            "names to strings (or its JSON text); {} clears them."
        ),
        "schema": {
            "type": "object",
            "maxProperties": v.MAX_ENV_VARIABLES,
            "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$", "maxLength": v.MAX_ENV_NAME_LENGTH},
            "additionalProperties": {"type": "string", "maxLength": v.MAX_ENV_VALUE_LENGTH},
        },
        "form": {"type": "string"},
    },
    "workdir": {
        "description": (
            "The workers' working directory, an absolute normalised path on this agent; 'default': the agent's."
        ),
        "schema": {"type": ["string", "null"], "maxLength": v.MAX_PATH_LENGTH},
        "form": {"type": "string", "maxLength": v.MAX_PATH_LENGTH},
    },
    "python": {
        "description": "The interpreter that runs `-m celery`, an absolute path on this agent; 'default': the agent's.",
        "schema": {"type": ["string", "null"], "maxLength": v.MAX_PATH_LENGTH},
        "form": {"type": "string", "maxLength": v.MAX_PATH_LENGTH},
    },
    "task_events": _boolean("Start the workers with -E, so that monitors see tasks"),
    "nowait": _boolean("Answer 202 at once; the operation goes on and its outcome is in the agent's log"),
    "rolling": _boolean("Restart one instance at a time, each once the previous one's new worker answered a ping"),
    "details": _boolean("List every instance object instead of the names"),
    "max_concurrency": _integer("Most worker processes", 1, v.MAX_CONCURRENCY),
    "min_concurrency": _integer("Fewest worker processes", 0, v.MAX_CONCURRENCY),
    "max": _integer("Most worker processes", 1, v.MAX_CONCURRENCY),
    "min": _integer("Fewest worker processes", 0, v.MAX_CONCURRENCY),
    "lines": _integer("How many of the last lines of the worker's log", 1, v.MAX_LOG_LINES),
    "queues": {
        "description": f"Queues to consume: a JSON list of names or a comma-separated string (at most {v.MAX_QUEUES}).",
        "schema": {"type": "array", "maxItems": v.MAX_QUEUES, "items": _name_schema(v.MAX_QUEUE_NAME_LENGTH)},
        "form": {"type": "string"},
    },
    "exchange": {"description": "The exchange (default: the queue's name).", "schema": _ROUTING},
    "routing_key": {"description": "The routing key (default: the queue's name).", "schema": _ROUTING},
    "exchange_type": {
        "description": "The exchange's type.",
        "schema": {"type": "string", "enum": list(v.EXCHANGE_TYPES)},
    },
    "options": {
        "description": "Declaration options: a JSON object (or its JSON text).",
        "schema": {"type": ["object", "null"]},
        "form": {"type": "string", "maxLength": v.MAX_OPTIONS_LENGTH},
    },
    # An app's autoscaling policy (DESIGN §9.5).
    "queue": {
        "description": (
            "The queue whose depth (ready messages) decides, and that new instances consume: declared for "
            "the app, consumed by one of its instances, or on its broker. Required for a first policy."
        ),
        "schema": _name_schema(v.MAX_QUEUE_NAME_LENGTH),
    },
    "min_instances": _integer("Fewest instances (default 1)", 1, v.MAX_INSTANCES),
    "max_instances": _integer("Most instances; required for a first policy", 1, v.MAX_INSTANCES),
    "messages_per_instance": _integer(
        "Ready messages per instance: the target is ceil(messages / this) (default 10)",
        1,
        v.MAX_MESSAGES_PER_INSTANCE,
    ),
    "scale_down_after": {
        "description": (
            "Seconds the depth must stay low before an instance is removed, one per interval (default 60; "
            f"0 to {v.MAX_SCALE_DOWN_AFTER:g})."
        ),
        "schema": {"type": "number", "minimum": 0, "maximum": v.MAX_SCALE_DOWN_AFTER},
        "form": {"type": "string", "pattern": r"^[+-]?([0-9]{1,12}(\.[0-9]*)?|\.[0-9]+)$"},
    },
}

PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    "app": {
        "description": (
            "An app's name: letters and digits of any script, '_', '.' and '-', starting with a letter, "
            f"digit or '_', at most {v.MAX_NAME_LENGTH} characters, in NFC; not one of "
            f"{', '.join(sorted(v.RESERVED_APP_NAMES))}."
        ),
        "schema": _name_schema(v.MAX_NAME_LENGTH),
    },
    "agent": {"description": "An agent's id (the rules of app names).", "schema": _name_schema(v.MAX_NAME_LENGTH)},
    "instance": {
        "description": "An instance's name (the rules of app names).",
        "schema": _name_schema(v.MAX_NAME_LENGTH),
    },
    "queue": {
        "description": (
            f"A queue's name (the rules of app names, at most {v.MAX_QUEUE_NAME_LENGTH} characters); "
            "names starting with amq. or dq. are reserved."
        ),
        "schema": _name_schema(v.MAX_QUEUE_NAME_LENGTH),
    },
}


# -- answers -----------------------------------------------------------------

_NULLABLE_STRING = {"type": ["string", "null"]}
_STRINGS = {"type": "array", "items": {"type": "string"}}

SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "parameter": {"type": "string", "description": "The parameter at fault (400)."},
            "allowed": {"description": "The accepted parameters or methods (400, 405)."},
        },
    },
    "Broker": {
        "type": "object",
        "required": ["hostname", "port", "userid", "password", "virtual_host"],
        "properties": {
            "hostname": {"type": "string"},
            "port": {"type": "integer"},
            "userid": {"type": "string"},
            "password": {"type": "string", "description": "Always masked."},
            "virtual_host": {"type": "string"},
        },
    },
    "Instance": {
        "type": "object",
        "required": [
            "name",
            "is_enabled",
            "queues",
            "broker",
            "max_concurrency",
            "min_concurrency",
            "app",
            "agent",
            "state",
            "pid",
            "restarts",
            "arguments",
            "node",
        ],
        "properties": {
            "name": {"type": "string"},
            "is_enabled": {"type": "boolean"},
            "queues": _STRINGS,
            "broker": {"$ref": "#/components/schemas/Broker"},
            "max_concurrency": {"type": "integer"},
            "min_concurrency": {"type": "integer"},
            "app": {"type": "string"},
            "agent": {"type": "string", "description": "The id of the agent that owns it."},
            "state": {"type": "string", "enum": sorted({*STATES, "orphaned"})},
            "pid": {"type": ["integer", "null"]},
            "restarts": {"type": "integer"},
            "arguments": _STRINGS,
            "node": {"type": "string", "description": "The Celery node name its worker answers to."},
        },
    },
    "App": {
        "type": "object",
        "required": ["name", "broker", "celery_app", "arguments", "env", "workdir", "python", "task_events"],
        "properties": {
            "name": {"type": "string"},
            "broker": {"$ref": "#/components/schemas/Broker"},
            "celery_app": _NULLABLE_STRING,
            "arguments": _STRINGS,
            "env": {"type": "object", "additionalProperties": {"type": "string"}},
            "workdir": _NULLABLE_STRING,
            "python": _NULLABLE_STRING,
            "task_events": {"type": "boolean"},
            "restarted": {
                "$ref": "#/components/schemas/AppInstances",
                "description": "Changed settings reach the app's workers by a rolling restart: its outcome.",
            },
        },
    },
    "AppDeleted": {
        "type": "object",
        "required": ["ok", "app", "instances"],
        "properties": {"ok": {"const": "ok"}, "app": {"type": "string"}, "instances": _STRINGS},
    },
    "AppInstances": {
        "type": "object",
        "required": ["instances", "failed"],
        "properties": {
            "instances": _STRINGS,
            "failed": {"type": "object", "additionalProperties": {"type": "string"}},
            "skipped": _STRINGS,
        },
    },
    "Queue": {
        "type": "object",
        "required": ["name", "exchange", "routing_key", "exchange_type", "options"],
        "properties": {
            "name": {"type": "string"},
            "exchange": {"type": "string"},
            "routing_key": {"type": "string"},
            "exchange_type": _NULLABLE_STRING,
            "options": {"type": ["object", "null"]},
        },
    },
    "QueueWithFigures": {
        "allOf": [
            {"$ref": "#/components/schemas/Queue"},
            {
                "type": "object",
                "required": ["messages", "consumers"],
                "properties": {
                    "messages": {"type": ["integer", "null"]},
                    "consumers": {"type": ["integer", "null"]},
                },
            },
        ],
        "description": "The broker's figures are null when the broker cannot be asked or has no such queue yet.",
    },
    "InstanceQueues": {
        "type": "object",
        "required": ["queues", "declared", "active"],
        "properties": {
            "queues": _STRINGS,
            "declared": {"type": "array", "items": {"$ref": "#/components/schemas/Queue"}},
            "active": {"type": ["array", "null"], "items": {"type": "string"}},
        },
    },
    "Autoscale": {
        "type": "object",
        "required": ["max", "min"],
        "properties": {"max": {"type": "integer"}, "min": {"type": "integer"}},
    },
    "Log": {
        "type": "object",
        "required": ["name", "agent", "lines"],
        "properties": {"name": {"type": "string"}, "agent": {"type": "string"}, "lines": _STRINGS},
    },
    "Purged": {
        "type": "object",
        "required": ["purged"],
        "properties": {"purged": {"type": "integer", "minimum": 0}},
    },
    "Ok": {"type": "object", "required": ["ok"], "properties": {"ok": {"const": "ok"}}},
    "Pong": {"type": "object", "required": ["ok"], "properties": {"ok": {"const": "pong"}}},
    "Accepted": {
        "type": "object",
        "required": ["accepted"],
        "properties": {"accepted": {"const": True}},
        "description": "nowait: the request was checked and the operation goes on.",
    },
    "Member": {
        "type": "object",
        "required": ["id", "url", "alive", "last_seen", "instances"],
        "properties": {
            "id": {"type": "string"},
            "url": {"type": "string"},
            "alive": {"type": "boolean"},
            "last_seen": {"type": ["number", "null"]},
            "instances": {"type": ["integer", "null"]},
            "requires_token": {"type": "boolean"},
            "draining": {"type": "boolean", "description": "It takes no placements."},
        },
    },
    "Drain": {
        "type": "object",
        "required": ["agent", "draining", "instances", "failed"],
        "properties": {
            "agent": {"type": "string"},
            "draining": {"type": "boolean"},
            "instances": {**_STRINGS, "description": "The instances moved."},
            "failed": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "Stats": {"type": "object", "description": "The worker's Celery `stats()`, as Celery answers it."},
    "Names": _STRINGS,
    "AutoscalingPolicy": {
        "type": "object",
        "required": ["app", "queue", "min_instances", "max_instances", "messages_per_instance", "scale_down_after"],
        "properties": {
            "app": {"type": "string"},
            "queue": {"type": "string"},
            "min_instances": {"type": "integer"},
            "max_instances": {"type": "integer"},
            "messages_per_instance": {"type": "integer"},
            "scale_down_after": {"type": "number"},
            "decision": {
                "description": (
                    "GET only: the last decision of the agent that decides (null when none yet): "
                    "agent, at, queue, messages, consumers, instances, target, direction (up, down, hold), "
                    "changed (instances created or deleted), reason, low_since."
                ),
                "type": ["object", "null"],
            },
        },
    },
    "AutoscalingDeleted": {
        "type": "object",
        "required": ["ok", "app"],
        "properties": {"ok": {"const": "ok"}, "app": {"type": "string"}},
    },
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _list_of(name: str) -> dict[str, Any]:
    return {"type": "array", "items": _ref(name)}


# -- the operations ----------------------------------------------------------------

# (path, method) -> operationId, summary, parameters, answers {status: schema},
# the errors it may answer beyond the common ones.  Paths are the routes'
# canonical (trailing-slash) form; "{instance}" and "{queue}" stand for the
# routes' "<name>" where that name is an instance's or a queue's.
_INSTANCE = "/{app}/instances/{instance}/"
_QUEUE = "/{app}/queues/{queue}/"
OPERATIONS: list[dict[str, Any]] = [
    {
        "path": "/",
        "method": "GET",
        "id": "app_list",
        "summary": "Names of the apps known to the cluster",
        "answers": {200: _ref("Names")},
        "errors": (503, 504),
    },
    {"path": "/ping/", "method": "GET", "id": "ping", "summary": "Health", "answers": {200: _ref("Pong")}},
    {
        "path": "/agents/",
        "method": "GET",
        "id": "agents",
        "summary": "The cluster's members",
        "answers": {200: _list_of("Member")},
    },
    *[
        {
            "path": f"/agents/{{agent}}/{action}/",
            "method": method,
            "id": f"agent_{action}_{method.lower()}",
            "summary": summary,
            "answers": {200: _ref("Drain")},
            "errors": (404, *_CLUSTER_ERRORS),
        }
        for action, summary in (
            ("drain", "Move every instance off an agent (each replacement answers a ping first)"),
            ("undrain", "Let a drained agent take placements again"),
        )
        for method in ("POST", "PUT")
    ],
    {
        "path": "/openapi.json",
        "method": "GET",
        "id": "openapi",
        "summary": "This document",
        "answers": {200: {"type": "object"}},
    },
    *[
        {
            "path": "/{app}/",
            "method": method,
            "id": f"app_put_{method.lower()}",
            "summary": "Create or update an app (201 created, 200 updated)",
            "parameters": ("broker", "celery_app", "arguments", "env", "workdir", "python", "task_events"),
            "answers": {201: _ref("App"), 200: _ref("App")},
            "errors": (404, *_CLUSTER_ERRORS),
        }
        for method in ("PUT", "POST")
    ],
    {
        "path": "/{app}/",
        "method": "GET",
        "id": "app_get",
        "summary": "Read an app",
        "answers": {200: _ref("App")},
        "errors": (404, *_CLUSTER_ERRORS),
    },
    {
        "path": "/{app}/",
        "method": "DELETE",
        "id": "app_delete",
        "summary": "Delete an app and its instances",
        "answers": {200: _ref("AppDeleted")},
        "errors": (404, *_CLUSTER_ERRORS),
    },
    *[
        {
            "path": f"/{{app}}/{action}/",
            "method": method,
            "id": f"app_{action}_{method.lower()}",
            "summary": f"{action.capitalize()} every instance of the app, cluster-wide",
            "parameters": ("rolling",) if action == "restart" else (),
            "answers": {200: _ref("AppInstances")},
            "errors": (404, *_CLUSTER_ERRORS),
        }
        for action in ("restart", "enable", "disable")
        for method in ("POST", "PUT")
    ],
    *[
        {
            "path": "/{app}/autoscaling/",
            "method": method,
            "id": f"autoscaling_put_{method.lower()}",
            "summary": (
                "Set the app's queue-depth autoscaling policy (201 new, 200 changed); fields left out keep "
                "their stored value (or the default)"
            ),
            "parameters": v.POLICY_FIELDS,
            "answers": {201: _ref("AutoscalingPolicy"), 200: _ref("AutoscalingPolicy")},
            "errors": (404, *_CLUSTER_ERRORS),
        }
        for method in ("PUT", "POST")
    ],
    {
        "path": "/{app}/autoscaling/",
        "method": "GET",
        "id": "autoscaling_get",
        "summary": "The app's autoscaling policy, with the current decision",
        "answers": {200: _ref("AutoscalingPolicy")},
        "errors": (404, *_CLUSTER_ERRORS),
    },
    {
        "path": "/{app}/autoscaling/",
        "method": "DELETE",
        "id": "autoscaling_delete",
        "summary": "Drop the app's autoscaling policy (its instances stay as they are)",
        "answers": {200: _ref("AutoscalingDeleted")},
        "errors": (404, *_CLUSTER_ERRORS),
    },
    *[
        {
            "path": path,
            "method": method,
            "id": f"{operation_id}_{method.lower()}",
            "summary": summary,
            "parameters": ("max_concurrency", "min_concurrency", "queues", "broker", "arguments"),
            "answers": {201: _ref("Instance"), 200: _ref("Instance")},
            "accepted": _ref("Instance"),
            "errors": (404, 409, 502, *_CLUSTER_ERRORS),
        }
        for path, operation_id, summary in (
            ("/{app}/instances/", "instance_create", "New instance with a random name, on a live agent"),
            (_INSTANCE, "instance_create_named", "New instance with this name (200 when it exists, identical)"),
        )
        for method in ("PUT", "POST")
    ],
    {
        "path": "/{app}/instances/",
        "method": "GET",
        "id": "instance_list",
        "summary": "Names (or, with details, objects) of the app's instances on every agent",
        "parameters": ("details",),
        "answers": {200: {"oneOf": [_ref("Names"), _list_of("Instance")]}},
        "errors": (404, *_CLUSTER_ERRORS),
    },
    {
        "path": _INSTANCE,
        "method": "GET",
        "id": "instance_get",
        "summary": "One instance, from its owner",
        "answers": {200: _ref("Instance")},
        "errors": (404, *_CLUSTER_ERRORS),
    },
    {
        "path": _INSTANCE,
        "method": "DELETE",
        "id": "instance_delete",
        "summary": "Delete an instance; its worker is shut down",
        "answers": {200: _ref("Instance")},
        "errors": (404, *_CLUSTER_ERRORS),
    },
    {
        "path": "/instances/{instance}/",
        "method": "GET",
        "id": "instance_get_any_app",
        "summary": "One instance, whatever its app",
        "answers": {200: _ref("Instance")},
        "errors": (404, *_CLUSTER_ERRORS),
    },
    {
        "path": "/instances/{instance}/",
        "method": "DELETE",
        "id": "instance_delete_any_app",
        "summary": "Delete an instance, whatever its app",
        "answers": {200: _ref("Instance")},
        "errors": (404, *_CLUSTER_ERRORS),
    },
    *[
        {
            "path": f"{_INSTANCE}{action}/",
            "method": method,
            "id": f"instance_{action}_{method.lower()}",
            "summary": summary,
            "answers": {200: _ref("Instance")},
            "errors": (404, *_CLUSTER_ERRORS),
        }
        for action, summary in (
            ("enable", "Desired state: running"),
            ("disable", "Desired state: stopped"),
            ("restart", "Forced restart of its worker"),
        )
        for method in ("POST", "PUT")
    ],
    {
        "path": f"{_INSTANCE}autoscale/",
        "method": "GET",
        "id": "autoscale_get",
        "summary": "Its concurrency range",
        "answers": {200: _ref("Autoscale")},
        "errors": (404, *_CLUSTER_ERRORS),
    },
    *[
        {
            "path": f"{_INSTANCE}autoscale/",
            "method": method,
            "id": f"autoscale_set_{method.lower()}",
            "summary": "Set max, min or both (either alone keeps the other)",
            "parameters": ("max", "min"),
            "answers": {200: _ref("Autoscale")},
            "errors": (404, *_CLUSTER_ERRORS),
        }
        for method in ("POST", "PUT")
    ],
    {
        "path": f"{_INSTANCE}queues/",
        "method": "GET",
        "id": "instance_queues",
        "summary": "The queues it should consume and (active, null if it cannot say) does consume",
        "answers": {200: _ref("InstanceQueues")},
        "errors": (404, *_CLUSTER_ERRORS),
    },
    *[
        {
            "path": f"{_INSTANCE}queues/{{queue}}/",
            "method": method,
            "id": f"consume_{method.lower()}",
            "summary": "Consume from a queue",
            "answers": {201: _ref("Ok")},
            "errors": (404, *_CLUSTER_ERRORS),
        }
        for method in ("PUT", "POST")
    ],
    {
        "path": f"{_INSTANCE}queues/{{queue}}/",
        "method": "DELETE",
        "id": "cancel",
        "summary": "Stop consuming from a queue",
        "answers": {200: _ref("Ok")},
        "errors": (404, *_CLUSTER_ERRORS),
    },
    {
        "path": f"{_INSTANCE}stats/",
        "method": "GET",
        "id": "stats",
        "summary": "The worker's Celery stats (404 when it has no running worker)",
        "answers": {200: _ref("Stats")},
        "errors": (404, *_CLUSTER_ERRORS),
    },
    {
        "path": f"{_INSTANCE}log/",
        "method": "GET",
        "id": "instance_log",
        "summary": "The last lines of its worker's log, from its owner",
        "parameters": ("lines",),
        "answers": {200: _ref("Log")},
        "errors": (404, *_CLUSTER_ERRORS),
    },
    {
        "path": "/{app}/queues/",
        "method": "GET",
        "id": "queue_list",
        "summary": "The app's queue names on every agent",
        "answers": {200: _ref("Names")},
        "errors": (404, *_CLUSTER_ERRORS),
    },
    *[
        {
            "path": _QUEUE,
            "method": method,
            "id": f"queue_declare_{method.lower()}",
            "summary": "Declare a queue (exchange and routing key default to its name)",
            "parameters": ("exchange", "routing_key", "exchange_type", "options"),
            "answers": {201: _ref("Queue")},
            "errors": (404, *_CLUSTER_ERRORS),
        }
        for method in ("PUT", "POST")
    ],
    {
        "path": _QUEUE,
        "method": "GET",
        "id": "queue_get",
        "summary": "A queue, with the broker's figures",
        "answers": {200: _ref("QueueWithFigures")},
        "errors": (404, *_CLUSTER_ERRORS),
    },
    {
        "path": _QUEUE,
        "method": "DELETE",
        "id": "queue_delete",
        "summary": "Delete a queue's declaration",
        "answers": {200: _ref("Queue")},
        "errors": (404, *_CLUSTER_ERRORS),
    },
    *[
        {
            "path": f"{_QUEUE}purge/",
            "method": method,
            "id": f"queue_purge_{method.lower()}",
            "summary": "Drop the queue's ready messages on the broker",
            "answers": {200: _ref("Purged")},
            "errors": (404, *_CLUSTER_ERRORS),
        }
        for method in ("POST", "PUT")
    ],
]

# The surfaces mounted beside the API: described, not specified.
MOUNTED: list[dict[str, Any]] = [
    {
        "path": "/admin/",
        "method": "GET",
        "id": "admin",
        "summary": "The admin page of this agent (HTML, for browsers; its forms are not part of the API)",
        "content": "text/html",
    },
    {
        "path": "/metrics",
        "method": "GET",
        "id": "metrics",
        "summary": "Prometheus metrics (404 when this agent serves none)",
        "content": "text/plain",
    },
]


DESCRIPTION = """\
The REST API of an SCS agent, answering for its whole cluster.

Every route answers with and without its trailing slash (this document
spells the canonical form).  Parameters come as a query string, form
fields or a JSON object body: reads are described with query parameters,
writes with a body, and either may be sent in the other place as well.
An empty query or form field means "not given".  In a JSON body the form
spellings are accepted too (numbers and booleans as strings, lists as a
comma-separated or command-line string, objects as JSON text).  A
parameter given twice, or one a route does not know, is a 400 that names
it (``parameter``; ``allowed`` lists the route's parameters).

Every write route takes ``nowait``: once the request is checked it answers
202 at once ({"accepted": true}, or the answer itself when it is already
there) and the operation goes on.  A known path asked with another method
answers 405.  Errors are JSON {"error": "...", ...}.  When a cluster answer
lacks agents, X-SCS-Missing-Agents names (up to 20 of) them and
X-SCS-Missing-Agents-Count says how many.  Bad input never changes the
store.
"""


def _error_responses(codes: Any) -> dict[str, Any]:
    return {
        str(code): {
            "description": _ERRORS[code],
            "content": {"application/json": {"schema": _ref("Error")}},
        }
        for code in sorted(codes)
    }


def _answer(status: int, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": {200: "OK", 201: "Created", 202: "Accepted (nowait)"}.get(status, "OK"),
        "headers": {
            "X-SCS-Missing-Agents": {"$ref": "#/components/headers/MissingAgents"},
            "X-SCS-Missing-Agents-Count": {"$ref": "#/components/headers/MissingAgentsCount"},
        },
        "content": {"application/json": {"schema": schema}},
    }


def _path_parameters(path: str) -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "path", "required": True, **copy.deepcopy(PATH_PARAMETERS[name])}
        for name in re.findall(r"\{([^}]+)\}", path)
    ]


def _operation(entry: dict[str, Any]) -> dict[str, Any]:
    method = entry["method"]
    names = list(entry.get("parameters", ()))
    write = method in WRITE_METHODS
    if write:
        names.append("nowait")
    operation: dict[str, Any] = {
        "operationId": entry["id"],
        "summary": entry["summary"],
        "parameters": _path_parameters(entry["path"]),
    }
    if names and (not write or method == "DELETE"):
        for name in names:
            parameter = PARAMETERS[name]
            operation["parameters"].append(
                {
                    "name": name,
                    "in": "query",
                    "required": False,
                    "description": parameter["description"],
                    "schema": copy.deepcopy(parameter.get("form", parameter["schema"])),
                }
            )
    elif names:
        properties = {
            name: {"description": PARAMETERS[name]["description"], **PARAMETERS[name]["schema"]} for name in names
        }
        form = {name: {**PARAMETERS[name].get("form", PARAMETERS[name]["schema"])} for name in names}
        operation["requestBody"] = {
            "required": False,
            "content": {
                "application/json": {
                    "schema": {"type": "object", "properties": copy.deepcopy(properties), "additionalProperties": False}
                },
                "application/x-www-form-urlencoded": {
                    "schema": {"type": "object", "properties": copy.deepcopy(form), "additionalProperties": False}
                },
            },
        }
    responses = {str(status): _answer(status, schema) for status, schema in entry["answers"].items()}
    if write:
        accepted = entry.get("accepted") or next(iter(entry["answers"].values()))
        responses["202"] = _answer(202, {"anyOf": [_ref("Accepted"), accepted]})
    errors = {*_COMMON_ERRORS, *entry.get("errors", ())}
    if write:
        errors.add(403)
    responses.update(_error_responses(errors))
    operation["responses"] = dict(sorted(responses.items()))
    return operation


def _mounted_operation(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "operationId": entry["id"],
        "summary": entry["summary"],
        "responses": {
            "200": {"description": "OK", "content": {entry["content"]: {"schema": {"type": "string"}}}},
            **_error_responses((401, 404)),
        },
    }


@lru_cache(maxsize=1)
def _document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for entry in OPERATIONS:
        paths.setdefault(entry["path"], {})[entry["method"].lower()] = _operation(entry)
    for entry in MOUNTED:
        paths.setdefault(entry["path"], {})[entry["method"].lower()] = _mounted_operation(entry)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "SCS agent", "version": "1", "description": DESCRIPTION},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "headers": {
                "MissingAgents": {
                    "description": "The agents (URL-escaped ids, comma-separated) this answer lacks",
                    "schema": {"type": "string"},
                },
                "MissingAgentsCount": {
                    "description": "How many agents this answer lacks",
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                },
            },
            "securitySchemes": {
                "token": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Only for agents started with --auth-token-file.",
                }
            },
        },
        "security": [{}, {"token": []}],
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document (a fresh copy: callers may change it)."""
    return copy.deepcopy(_document())


# -- the routes themselves, for the drift test -----------------------------------------


def openapi_path(rule: str) -> str:
    """A Werkzeug rule as an OpenAPI path: ``<app>`` -> ``{app}``, and a
    ``<name>`` after ``instances/`` or ``queues/`` -> ``{instance}`` or
    ``{queue}``."""
    parts = rule.split("/")
    out = []
    for index, part in enumerate(parts):
        match = _CONVERTER.fullmatch(part)
        if match is None:
            out.append(part)
            continue
        name = match.group(1)
        if name == "name" and index > 0:
            name = {"instances": "instance", "queues": "queue"}.get(parts[index - 1], name)
        out.append("{" + name + "}")
    return "/".join(out)


def api_routes(url_map: Any) -> set[tuple[str, str]]:
    """(OpenAPI path, method) of every route of a Klein app's ``url_map``
    (the API's: ``API.app.url_map``): those of ``endpoint`` with their
    methods, the mounted surfaces (any method: described as GET).  Given
    the map, not importing the API: the API imports this module."""
    routes: set[tuple[str, str]] = set()
    for rule in url_map.iter_rules():
        endpoint = str(rule.endpoint)
        if endpoint in _NOT_ROUTES or endpoint.startswith(_NOT_ROUTE_PREFIXES) or "<path:" in rule.rule:
            continue
        methods = set(rule.methods or {"GET"}) - {"HEAD", "OPTIONS"}
        routes.update((openapi_path(rule.rule), method) for method in methods)
    return routes


def documented_routes(document: dict[str, Any] | None = None) -> set[tuple[str, str]]:
    document = document if document is not None else _document()
    return {(path, method.upper()) for path, item in document["paths"].items() for method in item}


def documented_parameters(path: str, method: str, document: dict[str, Any] | None = None) -> set[str]:
    """The names of the query and body parameters an operation documents."""
    document = document if document is not None else _document()
    operation = document["paths"][path][method.lower()]
    names = {p["name"] for p in operation.get("parameters", ()) if p["in"] != "path"}
    body = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if body:
        names.update(body["schema"].get("properties", {}))
    return names
