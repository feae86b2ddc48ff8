"""Concurrency slots are leases, renewed while their requests run.

A slot expires ``quota.lease_s`` after it was taken or last renewed. Short leases make a slot
lost by a crashed process, or by a request whose settle never reached Redis, come back soon;
renewing every third of the lease keeps the slot of a stream that runs far longer. The
gateway runs ``renewing`` for its lifetime; an app that builds ``QuotaMiddleware`` itself
runs it in its lifespan.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

import anyio
import structlog

from tenantware.backends.errors import STORE_UNAVAILABLE
from tenantware.quota.store import QuotaStore

__all__ = ["RENEWALS_PER_LEASE", "renew_forever", "renewing"]

#: Renewals per lease: a slot survives two missed renewals (a loaded host, one slow call).
RENEWALS_PER_LEASE: Final = 3

log = structlog.get_logger("tenantware.quota")


async def renew_forever(store: QuotaStore, lease_s: Callable[[], float]) -> None:
    """Renew ``store``'s slots every third of ``lease_s()`` (read each time: a reload may
    change it)."""
    while True:
        await anyio.sleep(lease_s() / RENEWALS_PER_LEASE)
        try:
            await store.renew()
        except STORE_UNAVAILABLE as exc:
            # A bare shared store (``FailoverQuotaStore`` reports its own): the next
            # renewal may succeed before the lease runs out.
            log.warning("quota slot renewal failed", error=type(exc).__name__)


@asynccontextmanager
async def renewing(store: QuotaStore, lease_s: Callable[[], float]) -> AsyncIterator[None]:
    """``renew_forever`` in the background for the ``async with`` block."""
    async with anyio.create_task_group() as group:
        group.start_soon(renew_forever, store, lease_s)
        try:
            yield
        finally:
            group.cancel_scope.cancel()
