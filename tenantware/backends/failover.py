"""One failure-policy implementation for every layer that keeps state in a shared store.

A layer asks ``available`` before calling the shared store, reports ``failed`` or
``succeeded`` after, and while the store is not available applies its policy:

- ``closed``: refuse what the store would have decided;
- ``local``: decide in this process with its share of the limit (each layer keeps its own
  in-memory store for that: the quota fallback limiter, an admission pool, local circuits);
- ``open``: let the request through unchecked.

The store reports an outage only on evidence (``StoreUnavailable``: refused or reset
connections, or no reply for the bound while calls were outstanding; see
``backends/multiplex.py``), never because one call was slow. Every degraded decision is
counted (``tenantware_store_failures_total{layer, policy}``) and the switch is logged once
per outage, not once per request. During an outage the store is probed by one call per
``probe_interval_s`` (every other call gets the policy at once), and traffic returns to the
store as soon as a probe is answered.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

import structlog

from tenantware import metrics
from tenantware.config import FailurePolicy

__all__ = ["POLICIES", "Failover", "StoreHealth"]

#: Every policy, least strict first.
POLICIES: Final[tuple[FailurePolicy, ...]] = ("open", "local", "closed")


class StoreHealth:
    """Whether one shared store (one Redis) is up, as every layer of a process sees it.

    Shared by the layers on the same store, so an outage is declared once, probed by one call
    per interval for the whole process (a request is never the probe of several layers), and
    over for every layer as soon as any call is answered.
    """

    def __init__(
        self,
        *,
        probe_interval_s: float = 0.25,
        bound_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.probe_interval_s = probe_interval_s
        #: How long a probe may take before another one may go (one whose caller was
        #: cancelled never reports).
        self.bound_s = bound_s
        self.clock = clock
        #: When the next probe may go (during an outage).
        self._probe_at = 0.0
        #: An outage has been declared and no call has been answered since.
        self.down = False

    @property
    def available(self) -> bool:
        """Whether a call should go to the store: always while it is up; during an outage
        for one call (the probe) per ``probe_interval_s``."""
        if not self.down:
            return True
        now = self.clock()
        if now < self._probe_at:
            return False
        self._probe_at = now + self.probe_interval_s + self.bound_s
        return True

    def failed(self) -> bool:
        """A call ended with outage evidence; ``True`` when this starts the outage."""
        self._probe_at = self.clock() + self.probe_interval_s
        if self.down:
            return False
        self.down = True
        return True

    def succeeded(self) -> bool:
        """A call was answered; ``True`` when this ends an outage."""
        if not self.down:
            return False
        self.down = False
        return True


class Failover:
    """One layer's view of a store's health, with its counters and logs:
    ``Failover("quota", health)`` (a health of its own when none is shared)."""

    def __init__(
        self,
        layer: str,
        health: StoreHealth | None = None,
        *,
        probe_interval_s: float = 0.25,
        bound_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.layer = layer
        self.health = health or StoreHealth(
            probe_interval_s=probe_interval_s, bound_s=bound_s, clock=clock
        )
        self.log = structlog.get_logger(f"tenantware.{layer}")
        self._counters = {
            policy: metrics.STORE_FAILURES.labels(layer, policy) for policy in POLICIES
        }

    @property
    def down(self) -> bool:
        """An outage has been declared and no call has been answered since."""
        return self.health.down

    @property
    def available(self) -> bool:
        """Whether this call should go to the store (see ``StoreHealth.available``)."""
        return self.health.available

    def failed(self, exc: BaseException, call: str, **fields: Any) -> None:
        """A call ended with outage evidence: policies in force, probe again after an
        interval; the outage is logged once (by the layer that saw it first)."""
        if self.health.failed():
            self.log.warning(
                f"{self.layer} store unavailable; failure policies in force",
                call=call,
                error=type(exc).__name__,
                detail=str(exc)[:200],
                probe_every_s=self.health.probe_interval_s,
                **fields,
            )

    def succeeded(self) -> None:
        """A call was answered: the outage, if any, is over."""
        if self.health.succeeded():
            self.log.info(f"{self.layer} store available again")

    def degraded(self, policy: FailurePolicy) -> None:
        """Count one decision taken by ``policy`` instead of the store."""
        self._counters[policy].inc()
