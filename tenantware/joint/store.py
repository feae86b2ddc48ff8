"""What the quota layer asks of the joint calls to its store and a seat pool (``ReserveAcquire``):
the reservation with the seat request, and the settle with the seat's release."""

from __future__ import annotations

from typing import Protocol

from tenantware.admission.core import Ticket
from tenantware.admission.store import SeatStore
from tenantware.quota.plan import Plan
from tenantware.quota.store import Decision

__all__ = ["ReserveAcquire"]


class ReserveAcquire(Protocol):
    """Reserves a plan and acquires a seat in one call, and settles it and releases the seat
    in one call, for the seat stores it ``serves``."""

    def serves(self, seats: SeatStore) -> bool:
        """Whether one call reaches this seat pool and the quota store (same server)."""
        ...

    async def reserve_acquire(
        self,
        plan: Plan,
        tokens: int,
        cost: int,
        ticket: str,
        charge: int | None,
        seats: SeatStore,
        seat_ticket: Ticket,
    ) -> tuple[Decision, int | None]:
        """The quota store's ``reserve`` and, when it granted from the store, the seat
        store's ``acquire`` status; ``None`` when no seat was asked for (refused, or the
        store failed and its failure policy answered): the caller then acquires as usual."""
        ...

    async def settle_release(
        self,
        plan: Plan,
        now_us: int,
        ticket: str,
        tokens_delta: int,
        cost_delta: int,
        charge_delta: int,
        seats: SeatStore,
        seat_ticket: Ticket,
        actual_cost: float,
        actual_tokens: float,
    ) -> bool:
        """The quota store's ``settle`` of a reservation it granted and the seat store's
        ``release`` of ``seat_ticket``, each exactly once, in one call; ``False``, having sent
        nothing, when the release is not a call to the pool's server now (the caller then
        settles and releases each as alone)."""
        ...
