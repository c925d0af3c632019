"""How the supervisor supervises: one frozen record of timings and limits,
and the pure backoff function that goes with it."""

from __future__ import annotations

import attrs

PING_TIMEOUTS = (0.1, 0.5, 0.9)
"""A wake-up's ping timeouts, backing off; only the nodes still silent are
pinged again."""


@attrs.frozen
class SupervisionPolicy:
    """Every timing and limit of the supervisor (seconds unless said).

    - ``interval``: between two periodic wake-ups.
    - ``ping_timeouts``: a wake-up's batched ping, retried with each timeout
      for the nodes that stay silent.
    - ``max_missed_pings``: silent wake-ups before a running worker is
      killed and replaced.
    - ``start_timeout``: how long a new worker has to answer its first ping.
    - ``probe_interval``/``probe_timeout``: the start probe, which pings
      starting workers between wake-ups so that readiness is seen at once.
    - ``min_uptime``: a worker that dies younger has failed to start;
      ``max_rapid_failures`` such deaths in a row make it ``failed``.
    - ``backoff_base``/``backoff_cap``/``backoff_jitter``: see
      :func:`backoff_delay`.
    - ``kill_timeout``: TERM, then KILL after this long.
    - ``wait_after_broker_revived``: silent workers are not blamed while
      their broker is down nor for this long after it is back.
    - ``control_timeout``: Celery remote-control calls (stats, queues...).
    - ``leftover_poll``/``leftover_kill_wait``: how often a leftover worker
      of a previous run is looked for after a signal, and how long after
      KILL before giving up on it.
    - ``worker_log_max_bytes``/``worker_log_backups``: at each wake-up a
      live worker's ``worker.log`` larger than this is rotated, keeping
      this many older files (:func:`scs.worker_log.rotate`).
    """

    interval: float = 5.0
    ping_timeouts: tuple[float, ...] = attrs.field(default=PING_TIMEOUTS, converter=tuple)
    max_missed_pings: int = 3
    start_timeout: float = 60.0
    probe_interval: float = 0.02
    probe_timeout: float = 0.05
    min_uptime: float = 10.0
    max_rapid_failures: int = 5
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    backoff_jitter: float = 0.5
    kill_timeout: float = 10.0
    wait_after_broker_revived: float = 30.0
    control_timeout: float = 1.0
    leftover_poll: float = 0.05
    leftover_kill_wait: float = 10.0
    worker_log_max_bytes: int = 10 * 1024 * 1024
    worker_log_backups: int = 3


def backoff_delay(policy: SupervisionPolicy, failures: int, random_value: float) -> float:
    """Delay before the next spawn after ``failures`` young deaths in a row.

    The first restarts at once (one crash may be bad luck); then base,
    2*base, 4*base... capped at ``backoff_cap``, each scaled by a factor in
    ``[1 - jitter, 1]`` picked by ``random_value`` (in ``[0, 1)``) so that
    instances crashing together do not restart in lockstep."""
    if failures <= 1:
        return 0.0
    delay = min(policy.backoff_cap, policy.backoff_base * 2 ** (failures - 2))
    return delay * (1.0 - policy.backoff_jitter * random_value)


__all__ = ["PING_TIMEOUTS", "SupervisionPolicy", "backoff_delay"]
