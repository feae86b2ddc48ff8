"""Which seat pool a request asks, and with what ticket: built once per request.

The admission layer builds it, unless the quota layer already did: on a single Redis server
the quota layer asks for the seat in its own reservation call (``tenantware.joint``) and hands
the request, with the pool's answer, down in ``ctx.seat_request``, and then gives the seat
back too: the admission layer leaves what the release charges in ``SeatRequest.usage`` and the
quota layer sends the release with its settle (one script call, ``tenantware.joint``).
"""

from __future__ import annotations

from typing import Final

from tenantware.admission.core import BAND_INDEX, BANDS, Ticket
from tenantware.admission.pools import AdmissionPools
from tenantware.admission.store import SeatStore
from tenantware.config import AdmissionSettings
from tenantware.context import RequestContext
from tenantware.state import Snapshot
from tenantware.types import Scope

__all__ = ["SeatRequest", "seat_request"]

_PRIORITY_HEADER: Final = b"x-request-priority"
_BAND_OF_HEADER: Final = {name.encode(): i for i, name in enumerate(BANDS)}
#: The one queue of the ``fifo`` scheduler.
_FIFO: Final = "*"


class SeatRequest:
    """One request's ticket for one pool; ``status`` is the pool's answer once asked
    (``None``: not asked yet)."""

    __slots__ = ("pool", "priority", "settings", "status", "store", "ticket", "usage")

    def __init__(
        self,
        pool: str,
        store: SeatStore,
        ticket: Ticket,
        settings: AdmissionSettings,
        priority: str,
    ) -> None:
        self.pool = pool
        self.store = store
        self.ticket = ticket
        #: The admission settings the ticket was built with (output weight, short requests).
        self.settings = settings
        self.status: int | None = None
        #: The band's name (``ctx.priority`` once the admission layer takes the request).
        self.priority = priority
        #: What the seat's release charges (actual cost, tokens), left by the admission
        #: layer for the quota layer, which asked for the seat, to release it with its settle.
        self.usage: tuple[float, float] | None = None


def seat_request(
    pools: AdmissionPools, snapshot: Snapshot, ctx: RequestContext, scope: Scope
) -> SeatRequest | None:
    """The seat request of a decoded request of a known tenant; ``None`` when no pool
    serves its model (admission does not apply).

    The charge is the estimate (prompt + output weight x output estimate); the output
    estimate is the tenant's recent average output, capped by ``max_tokens``; the expected
    hold time (which decides whether it may borrow protected seats) comes from
    ``max_tokens`` and the pool's observed speed.
    """
    tenant = ctx.tenant
    view = ctx.view
    if tenant is None or view is None:
        return None
    pools.follow(snapshot.version, snapshot.config.admission)
    settings = pools.settings
    routes = snapshot.routes.get(ctx.model or "")
    found = pools.store_for(routes[0].name if routes else None)
    if found is None:
        return None
    pool, store = found
    terms = pools.terms(tenant)
    band = BAND_INDEX[settings.default_priority]
    for name, value in scope["headers"]:
        if name == _PRIORITY_HEADER:
            band = _BAND_OF_HEADER.get(value.strip().lower(), band)
            break
    if band < terms.max_band:
        band = terms.max_band
    max_output = view.output_cap or snapshot.config.gateway.default_max_tokens
    output = pools.output_estimate(tenant.id, max_output)
    prompt = ctx.estimated_prompt_tokens
    cost = prompt + settings.output_weight * output
    if settings.scheduler == "fifo":
        ticket = Ticket(_FIFO, 1.0, cost, tokens=prompt + output)
    else:
        ticket = Ticket(
            tenant.id,
            tenant.weight,
            cost,
            band=band,
            reserved=terms.reserved,
            cap=terms.cap,
            tokens=prompt + output,
            hold=pools.holds.estimate(pool, max_output) if settings.short_request_s else 0.0,
        )
    return SeatRequest(pool, store, ticket, settings, BANDS[band])
