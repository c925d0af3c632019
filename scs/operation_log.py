"""The two log lines of every operation the cluster façade answers.

Every operation of ``scs.agent.Agent``, and of the parts split out of it
(``scs.custody``, ``scs.autoscaling_policies``, ``scs.app_wide``), runs
between a ``-->`` line with its arguments and a ``<--`` line with its
outcome, both with one request id (``<agent>:<n>``, counted per agent).
The second is the ``event="operation"`` line that metrics count.  One
:class:`OperationLog` per agent is shared by all of them, so that the
request ids stay one sequence.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from scs.errors import SCSError
from scs.reply import Reply

# The façade's log lines, wherever its code now lives.
log = Logger(namespace="scs.agent")


def _env_names_only(body: Any) -> Any:
    """An app object as the log shows it: its ``env`` by names alone (the
    values may be credentials; the API answers them, the log does not)."""
    if isinstance(body, dict) and isinstance(body.get("env"), dict):
        return {**body, "env": sorted(body["env"])}
    return body


def _log_body(body: Any) -> Any:
    """An answer as its ``<--`` log line shows it: env values left out, a
    worker log's lines counted rather than copied into the agent's log."""
    body = _env_names_only(body)
    if isinstance(body, dict) and isinstance(body.get("app"), dict):
        body = {**body, "app": _env_names_only(body["app"])}  # a peer's app_put answer
    if isinstance(body, dict) and isinstance(body.get("lines"), list):
        return {**body, "lines": f"<{len(body['lines'])} lines>"}
    return body


class OperationLog:
    """Runs operations between their log lines; see the module docstring."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self._calls = 0

    async def __call__(self, operation: str, arguments: dict[str, Any], run: Any) -> Reply:
        """Run an operation between its two log lines, ``-->`` with the
        arguments and ``<--`` with the outcome; the second is the one
        ``event="operation"`` (with ``operation`` and ``status``) that
        metrics count."""
        self._calls += 1
        request = f"{self.agent_id}:{self._calls}"
        log.info(
            "{{{request}}} --> {operation}({arguments})",
            request=request,
            operation=operation,
            arguments=arguments,
            event="operation.start",
        )
        try:
            reply = await run
        except SCSError as e:
            log.info(
                "{{{request}}} <-- error={error}",
                request=request,
                operation=operation,
                error=e.to_json(),
                status=e.status,
                event="operation",
            )
            raise
        log.info(
            "{{{request}}} <-- ok={body}",
            request=request,
            operation=operation,
            body=_log_body(reply.body),
            status=reply.status,
            event="operation",
        )
        return reply
