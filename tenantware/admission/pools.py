"""Which seat pool a request queues for, and the per-tenant parameters of its ticket.

Built once per gateway from ``AdmissionSettings``: a global pool (``seats``) and one pool per
upstream listed in ``upstream_seats``. Pools live in memory, or in Redis when the gateway has
a Redis client (then ``running()`` renews this process's seat leases). In memory, with
``gateway.replicas`` processes, each process guards ``seats // replicas`` seats.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

from tenantware.admission.base import SeatStore
from tenantware.admission.core import BAND_INDEX, BANDS
from tenantware.admission.memory import MemorySeatStore
from tenantware.backends.redis_support import RedisClient, ScriptHost
from tenantware.config import AdmissionSettings
from tenantware.registry import TenantView

__all__ = ["AdmissionPools", "TenantTerms"]


class TenantTerms:
    """Seat reservation and cap of one tenant, derived once per tenant view."""

    __slots__ = ("cap", "max_band", "reserved", "view")

    def __init__(self, view: TenantView, settings: AdmissionSettings) -> None:
        self.view = view
        self.reserved = settings.tenant_reserved_seats.get(
            view.id, settings.tier_reserved_seats.get(view.tier, 0)
        )
        self.cap = settings.tier_max_seats.get(view.tier, settings.max_seats_per_tenant or 0)
        self.max_band = BAND_INDEX[view.max_priority]


class AdmissionPools:
    """The seat stores of one gateway process, by pool name (``*`` is the global pool)."""

    def __init__(
        self,
        settings: AdmissionSettings,
        *,
        redis: RedisClient | None = None,
        scripts: ScriptHost | None = None,
        prefix: str = "",
        stores: dict[str, SeatStore] | None = None,
        on_failure: str = "open",
        replicas: int = 1,
    ) -> None:
        self.settings = settings
        self._replicas = 1 if redis is not None else replicas
        shares = tuple(settings.band_shares.get(band, 1.0) for band in BANDS)
        wanted: dict[str, int] = dict(settings.upstream_seats)
        if settings.seats is not None:
            wanted["*"] = settings.seats
        self.stores: dict[str, SeatStore] = {}
        if stores is not None:
            self.stores.update(stores)
        rates: dict[str, int] = dict(settings.upstream_tokens_per_second)
        if settings.tokens_per_second is not None:
            rates["*"] = settings.tokens_per_second
        # Protected seats only make sense between tenants (FIFO has one queue, one "tenant").
        headroom = settings.headroom_seats if settings.scheduler == "fair" else 0
        for name, seats in wanted.items():
            if name in self.stores:
                continue
            rate = rates.get(name)
            if redis is not None:
                from tenantware.admission.redis import RedisSeatStore

                self.stores[name] = RedisSeatStore(
                    redis,
                    pool=name,
                    seats=seats,
                    prefix=prefix,
                    band_shares=shares,
                    max_queue=settings.max_queue_per_tenant,
                    tokens_per_s=rate,
                    burst_s=settings.rate_burst_s,
                    lease_s=settings.lease_s,
                    poll_min_s=settings.poll_min_s,
                    poll_max_s=settings.poll_max_s,
                    on_failure="closed" if on_failure == "closed" else "open",
                    scripts=scripts,
                    headroom=headroom,
                    short_s=settings.short_request_s,
                )
            else:
                # Without a shared store each of ``replicas`` processes guards its part.
                self.stores[name] = MemorySeatStore(
                    max(1, seats // replicas),
                    band_shares=shares,
                    max_queue=settings.max_queue_per_tenant,
                    tokens_per_s=rate,
                    burst_s=settings.rate_burst_s,
                    headroom=headroom,
                    short_s=settings.short_request_s,
                )
        self.global_store = self.stores.get("*")
        self._terms: dict[str, TenantTerms] = {}
        #: Per tenant: moving average of the output tokens its requests actually produced.
        self._output_avg: dict[str, float] = {}

    def reconfigure(self, settings: AdmissionSettings) -> None:
        """Apply a reloaded configuration: seat counts of existing pools, reservations, caps.

        Adding or removing pools, rates, band shares and queue limits need a restart.
        """
        self.settings = settings
        self._terms = {}
        wanted: dict[str, int] = dict(settings.upstream_seats)
        if settings.seats is not None:
            wanted["*"] = settings.seats
        for name, seats in wanted.items():
            store = self.stores.get(name)
            if store is not None:
                store.resize(max(1, seats // self._replicas))

    def output_estimate(self, tenant_id: str, cap: int) -> float:
        """Output tokens to charge at dispatch: the tenant's recent average, at most ``cap``.

        Most clients send no ``max_tokens``; charging the default cap (1024) for answers of
        100 tokens would swing the counters by 10x at every completion.
        """
        average = self._output_avg.get(tenant_id)
        return cap if average is None or average > cap else average

    def observe_output(self, tenant_id: str, tokens: int) -> None:
        average = self._output_avg.get(tenant_id)
        self._output_avg[tenant_id] = (
            float(tokens) if average is None else average + 0.1 * (tokens - average)
        )

    def store_for(self, upstream: str | None) -> tuple[str, SeatStore] | None:
        """The pool of an upstream: its own if configured, else the global one (or none)."""
        if upstream is not None:
            store = self.stores.get(upstream)
            if store is not None:
                return upstream, store
        if self.global_store is not None:
            return "*", self.global_store
        return None

    def terms(self, view: TenantView) -> TenantTerms:
        terms = self._terms.get(view.id)
        if terms is None or terms.view is not view:
            terms = self._terms[view.id] = TenantTerms(view, self.settings)
        return terms

    async def state(self) -> dict[str, Any]:
        """Per pool: seats, seats in use, requests waiting, per-tenant counters and queues."""
        return {name: await store.state() for name, store in self.stores.items()}

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Redis upkeep for the gateway's lifetime: renew this process's leases, grant notices."""
        renewers = [s for s in self.stores.values() if hasattr(s, "run_forever")]
        if not renewers:
            yield
            return
        async with anyio.create_task_group() as group:
            for store in renewers:
                group.start_soon(store.run_forever)
            try:
                yield
            finally:
                group.cancel_scope.cancel()
