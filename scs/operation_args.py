"""The arguments of each operation a peer may run here, checked.

A request arriving over SRS names a ``LocalAgent`` method and its keyword
arguments.  Before anything runs, ``check_operation`` passes them through
the same validators (``scs.validation``) the HTTP API applies to the same
values, with the same errors: a peer (or anyone who can publish on the
broker of an unsigned cluster) can ask for nothing the API would refuse.
Unknown operations and unknown arguments are refused; the result is a
fresh dict of clean values, never the caller's objects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from scs import validation as v
from scs.errors import BadParameter, NotFound
from scs.replica import MAX_DOCUMENTS, check_document


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else check(value)


def _concurrency(what: str) -> Callable[[Any], int]:
    return lambda value: v.check_concurrency(value, what)


def _queue_list(value: Any) -> list[str]:
    return list(v.check_queue_list(value))


def _arguments(value: Any) -> list[str]:
    return list(v.check_arguments(value))


def _binding(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise BadParameter("binding must be an object", parameter="binding")
    v.only(value, ("name", "exchange", "routing_key", "exchange_type", "options"))
    name = value.get("name")
    return v.queue_binding(name, value).to_json()


def _instance_names(value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_NAMES:
        raise BadParameter(f"names must be a list of at most {MAX_NAMES} instance names", parameter="names")
    return [v.check_instance_name(name) for name in value]


# At most this many names in one request (a failover asks about a dead
# agent's instances at once: as many as a copy holds).
MAX_NAMES = MAX_DOCUMENTS


def _nowait(value: Any) -> bool:
    return v.check_bool(value, "nowait")


_APP = v.check_app_name
_MAYBE_APP = _optional(v.check_app_name)
_INSTANCE = v.check_instance_name
_QUEUE = v.check_queue_name

# operation -> {argument: (required, check)}
_OPERATIONS: dict[str, dict[str, tuple[bool, Callable[[Any], Any]]]] = {
    "app_put": {
        "app": (True, _APP),
        "broker": (False, _optional(v.check_broker_url)),
        "celery_app": (False, v.check_celery_app),
        "arguments": (False, _optional(_arguments)),
        # A peer's app: the paths are checked for their form only; a worker
        # whose workdir or python is missing here is failed at its spawn.
        "env": (False, v.check_env),
        "workdir": (False, lambda value: v.check_workdir(value, on_this_machine=False)),
        "python": (False, lambda value: v.check_python(value, on_this_machine=False)),
        "task_events": (False, _optional(lambda value: v.check_bool(value, "task_events"))),
        "roll": (False, lambda value: v.check_bool(value, "roll")),
        # Given by the agent that took the change (scs.app_sync).
        "revision": (False, v.check_revision),
    },
    "app_get": {"app": (True, _APP)},
    "app_export": {},
    "app_state": {},
    "app_names": {},
    "app_delete": {"app": (True, _APP), "revision": (False, v.check_revision)},
    "instance_export": {},
    "instance_adopt": {
        "document": (True, check_document),
        "moved_from": (True, lambda value: v.check_name(value, "moved_from")),
        "wait": (False, lambda value: v.check_bool(value, "wait")),
    },
    "instance_adopt_once": {
        "target": (True, lambda value: v.check_name(value, "target")),
        "document": (True, check_document),
        "moved_from": (True, lambda value: v.check_name(value, "moved_from")),
    },
    "agent_drain": {},
    "agent_undrain": {},
    "app_enable": {"app": (True, _APP)},
    "app_disable": {"app": (True, _APP)},
    "app_restart": {"app": (True, _APP)},
    "instance_owned": {"name": (True, _INSTANCE)},
    "instances_owned": {"names": (True, _instance_names)},
    "instance_create": {
        "app": (True, _APP),
        "name": (False, _optional(_INSTANCE)),
        "max_concurrency": (False, _concurrency("max_concurrency")),
        "min_concurrency": (False, _concurrency("min_concurrency")),
        "queues": (False, _optional(_queue_list)),
        "broker": (False, _optional(v.check_broker_url)),
        "arguments": (False, _optional(_arguments)),
        "nowait": (False, _nowait),
    },
    "instance_list": {"app": (False, _MAYBE_APP)},
    "instance_details": {"app": (False, _MAYBE_APP)},
    "autoscale_set": {
        "name": (True, _INSTANCE),
        "app": (False, _MAYBE_APP),
        "max": (False, _optional(_concurrency("max"))),
        "min": (False, _optional(_concurrency("min"))),
    },
    "instance_log": {"name": (True, _INSTANCE), "app": (False, _MAYBE_APP), "lines": (False, v.check_lines)},
    "consume": {"name": (True, _INSTANCE), "queue": (True, _QUEUE), "app": (False, _MAYBE_APP)},
    "cancel": {"name": (True, _INSTANCE), "queue": (True, _QUEUE), "app": (False, _MAYBE_APP)},
    "queue_declare": {"app": (True, _APP), "binding": (True, _binding)},
    "queue_get": {"app": (True, _APP), "name": (True, _QUEUE)},
    "queue_list": {"app": (True, _APP)},
    "queue_delete": {"app": (True, _APP), "name": (True, _QUEUE)},
    "queue_purge": {"app": (True, _APP), "name": (True, _QUEUE)},
    # Autoscaling policies (scs.autoscaling): a whole policy, checked as the
    # API checks it (v.check_policy, below); the revision as an app's.
    "autoscaling_put": {
        "app": (True, _APP),
        **{field: (True, lambda value: value) for field in v.POLICY_FIELDS},
        "revision": (False, v.check_revision),
    },
    "autoscaling_delete": {"app": (True, _APP), "revision": (False, v.check_revision)},
    "autoscaling_get": {"app": (True, _APP)},
    "autoscaling_export": {},
    "autoscaling_status": {"app": (True, _APP)},
}
for _operation in (
    "instance_get",
    "instance_delete",
    "instance_enable",
    "instance_disable",
    "instance_restart",
    "instance_restart_ready",
    "autoscale_get",
    "queues_of",
    "stats",
):
    _OPERATIONS[_operation] = {"name": (True, _INSTANCE), "app": (False, _MAYBE_APP)}

OPERATIONS = frozenset(_OPERATIONS)


def check_operation(operation: Any, arguments: Any) -> dict[str, Any]:
    """Clean keyword arguments for ``operation``, or BadParameter/NotFound."""
    if not isinstance(operation, str) or operation not in _OPERATIONS:
        raise NotFound(f"unknown operation {str(operation)[:64]!r}")
    if not isinstance(arguments, Mapping):
        raise BadParameter("operation arguments must be an object")
    schema = _OPERATIONS[operation]
    v.only(arguments, schema)
    clean: dict[str, Any] = {}
    for name, (required, check) in schema.items():
        if name in arguments:
            clean[name] = check(arguments[name])
        elif required:
            raise BadParameter(f"missing parameter {name}", parameter=name)
    if operation == "instance_create" and {"max_concurrency", "min_concurrency"} <= clean.keys():
        v.check_concurrency_range(clean["max_concurrency"], clean["min_concurrency"])
    if operation == "autoscale_set" and clean.get("max") is not None and clean.get("min") is not None:
        v.check_concurrency_range(clean["max"], clean["min"])
    if operation == "autoscaling_put":
        revision = {"revision": clean["revision"]} if "revision" in clean else {}
        clean = {"app": clean["app"], **v.check_policy(clean), **revision}
    return clean
