"""One failure-policy implementation for every layer that keeps state in a shared store.

A layer asks ``available`` before calling the shared store, reports ``failed`` or
``succeeded`` after, and while the store is not available applies its policy:

- ``closed``: refuse what the store would have decided;
- ``local``: decide in this process with its share of the limit (each layer keeps its own
  in-memory store for that: the quota fallback limiter, an admission pool, local circuits);
- ``open``: let the request through unchecked.

Every degraded decision is counted (``tenantware_store_failures_total{layer, policy}``) and
the switch is logged once per outage, not once per request. After a failure the store is
left alone for ``retry_after_s`` so an outage costs requests nothing; then calls try it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

import structlog

from tenantware import metrics
from tenantware.config import FailurePolicy

__all__ = ["POLICIES", "Failover"]

#: Every policy, least strict first.
POLICIES: Final[tuple[FailurePolicy, ...]] = ("open", "local", "closed")


class Failover:
    """The shared store's health as one layer sees it: ``Failover("quota")``."""

    def __init__(
        self,
        layer: str,
        *,
        retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.layer = layer
        self.retry_after_s = retry_after_s
        self.clock = clock
        self.log = structlog.get_logger(f"tenantware.{layer}")
        self._down_until = 0.0
        #: An outage has been logged and its end has not been seen yet.
        self.down = False
        self._counters = {
            policy: metrics.STORE_FAILURES.labels(layer, policy) for policy in POLICIES
        }

    @property
    def available(self) -> bool:
        """``False`` while the store is left alone after a failure."""
        return self._down_until == 0.0 or self.clock() >= self._down_until

    def failed(self, exc: BaseException, call: str, **fields: Any) -> None:
        """A call failed: leave the store alone for a while; log the outage once."""
        self._down_until = self.clock() + self.retry_after_s
        if not self.down:
            self.down = True
            self.log.warning(
                f"{self.layer} store unavailable; failure policies in force",
                call=call,
                error=type(exc).__name__,
                retry_in_s=self.retry_after_s,
                **fields,
            )

    def succeeded(self) -> None:
        """A call was answered: the outage, if any, is over."""
        if self.down:
            self.down = False
            self._down_until = 0.0
            self.log.info(f"{self.layer} store available again")

    def degraded(self, policy: FailurePolicy) -> None:
        """Count one decision taken by ``policy`` instead of the store."""
        self._counters[policy].inc()
