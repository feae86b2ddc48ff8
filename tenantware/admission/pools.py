"""Which seat pool a request queues for, and the per-tenant parameters of its ticket.

Built once per gateway from ``AdmissionSettings``: a global pool (``seats``) and one pool per
upstream listed in ``upstream_seats``. Each pool's store comes from ``seat_store`` (the
gateway's backend: memory, or Redis where ``running()`` renews this process's seat leases).
In memory, with ``gateway.replicas`` processes, each process guards ``seats // replicas``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

from tenantware.admission.core import BAND_INDEX, BANDS
from tenantware.admission.holdtime import HoldTimes
from tenantware.admission.memory import MemorySeatStore
from tenantware.admission.store import PoolSpec, SeatStore, SeatStoreFactory
from tenantware.config import AdmissionSettings
from tenantware.registry import TenantView

__all__ = ["AdmissionPools", "TenantTerms", "pool_specs"]


def pool_specs(settings: AdmissionSettings) -> dict[str, PoolSpec]:
    """The pools ``settings`` asks for, by name (``*`` is the global pool)."""
    wanted: dict[str, int] = dict(settings.upstream_seats)
    if settings.seats is not None:
        wanted["*"] = settings.seats
    rates: dict[str, int] = dict(settings.upstream_tokens_per_second)
    if settings.tokens_per_second is not None:
        rates["*"] = settings.tokens_per_second
    shares = tuple(settings.band_shares.get(band, 1.0) for band in BANDS)
    # Protected seats only make sense between tenants (FIFO has one queue, one "tenant").
    headroom = settings.headroom_seats if settings.scheduler == "fair" else 0
    return {
        name: PoolSpec(
            name=name,
            seats=seats,
            band_shares=shares,
            max_queue=settings.max_queue_per_tenant,
            tokens_per_s=rates.get(name),
            burst_s=settings.rate_burst_s,
            lease_s=settings.lease_s,
            poll_min_s=settings.poll_min_s,
            poll_max_s=settings.poll_max_s,
            headroom=headroom,
            short_s=settings.short_request_s,
        )
        for name, seats in wanted.items()
    }


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
        seat_store: SeatStoreFactory | None = None,
        *,
        stores: dict[str, SeatStore] | None = None,
        replicas: int = 1,
    ) -> None:
        self.settings = settings
        self._replicas = replicas
        make = seat_store or partial(MemorySeatStore.from_spec, replicas=replicas)
        self.stores: dict[str, SeatStore] = dict(stores or {})
        for name, spec in pool_specs(settings).items():
            if name not in self.stores:
                self.stores[name] = make(spec)
        self.global_store = self.stores.get("*")
        self._terms: dict[str, TenantTerms] = {}
        #: Per tenant: moving average of the output tokens its requests actually produced.
        self._output_avg: dict[str, float] = {}
        #: Expected seat hold times per pool, learned from answered requests.
        self.holds = HoldTimes()
        #: The configuration version whose settings these pools follow (``follow``).
        self._version = -1

    def follow(self, version: int, settings: AdmissionSettings) -> None:
        """Apply the settings of configuration ``version`` if they changed: the first
        request that sees a reload applies it (whichever layer builds its seat request)."""
        if version != self._version:
            self._version = version
            if settings != self.settings:
                self.reconfigure(settings)

    def reconfigure(self, settings: AdmissionSettings) -> None:
        """Apply a reloaded configuration: seat counts of existing pools, reservations, caps,
        the output weight and default priority (read per request from ``settings``).

        Adding or removing pools, rates, band shares and queue limits need a restart.
        """
        self.settings = settings
        self._terms = {}
        for name, spec in pool_specs(settings).items():
            store = self.stores.get(name)
            if store is not None:
                # A shared store guards the whole pool; a memory one this process's share.
                share = spec.seats if store.remote else spec.seats // self._replicas
                store.resize(max(1, share))

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
        """Every pool's background work (Redis: lease renewal, grant notices) while in use."""
        async with AsyncExitStack() as stack:
            for store in self.stores.values():
                await stack.enter_async_context(store.running())
            yield
