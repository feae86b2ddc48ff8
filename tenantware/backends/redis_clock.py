"""Deadlines in Redis time, so Redis itself refuses a call its caller has given up on.

A script call can wait in Redis's socket buffer (a paused or stalled server) long after the
caller stopped waiting for it and let the failure policy answer; run late, an acquiring call
would take a seat or a concurrency slot for a request that is gone. So every acquiring call
carries an absolute deadline and the script grants nothing when Redis ``TIME`` is past it.

The deadline cannot come from this host's wall clock (replicas' clocks differ from Redis's),
nor can the script tell when a call was sent. Instead each store keeps an offset between
Redis time and this process's monotonic clock, refreshed from every reply that carries
Redis's time: Redis now is estimated as ``monotonic + offset``, and the deadline is that
estimate plus the caller's give-up budget plus a slack. The assumption: Redis's clock does
not jump between two replies by more than the slack (a replica promoted after a failover
with another clock is re-learned from its first reply). A reply's time was read before the
reply travelled, so the estimate errs early by one reply's latency, which the slack covers.
Before the first reply there is no estimate and calls carry no deadline (0).

A call the caller gave up on but that Redis ran before its deadline is undone afterwards:
the stores queue its ticket and release it once Redis answers again (``GivenUp``).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["DEADLINE_SLACK_S", "GivenUp", "RedisClock", "budget_of"]

#: Added to the give-up budget: covers reply latency and a loaded event loop late to read.
DEADLINE_SLACK_S = 1.0

T = TypeVar("T")


class RedisClock:
    """``RedisClock(units_per_s=1000)``: Redis time in the unit the scripts use (ms or µs)."""

    def __init__(self, units_per_s: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.units_per_s = units_per_s
        self.clock = clock
        self._offset: float | None = None

    def observe(self, redis_now: int) -> None:
        """A reply carried Redis's time (``redis_now``, in this clock's unit)."""
        if redis_now > 0:
            self._offset = redis_now - self.clock() * self.units_per_s

    def deadline(self, budget_s: float) -> int:
        """Redis time after which a call sent now must not be run; 0 before any reply."""
        if self._offset is None:
            return 0
        return int((self.clock() + budget_s) * self.units_per_s + self._offset)


class GivenUp(Generic[T]):
    """Calls whose caller gave up, to be undone once the store answers again (bounded:
    beyond ``limit`` the oldest are dropped and left to their leases)."""

    def __init__(self, limit: int = 10_000) -> None:
        self._items: deque[T] = deque(maxlen=limit)

    def add(self, item: T) -> None:
        self._items.append(item)

    def __bool__(self) -> bool:
        return bool(self._items)

    def take(self) -> list[T]:
        """Everything queued, emptying the queue (what fails is added back by the caller)."""
        items = list(self._items)
        self._items.clear()
        return items


def budget_of(client: object, default_s: float = 0.25) -> float:
    """How long after sending a call may still run: twice the client's outage bound (the
    pipelined connection's ``timeout_s``, a redis-py client's progress watch, else
    ``default_s``; a late check of a busy event loop may give Redis one more bound) plus
    ``DEADLINE_SLACK_S``."""
    bound = getattr(client, "timeout_s", None)
    if not isinstance(bound, int | float):
        # Imported here: a gateway in memory never loads redis (it imports ``GivenUp``).
        from tenantware.backends.progress import watch_of

        bound = watch_of(client).bound_s
    if not math.isfinite(bound):
        bound = default_s
    return 2 * bound + DEADLINE_SLACK_S
