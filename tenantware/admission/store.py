"""The seat store protocol: where seats and fair-share counters live (memory or Redis)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Final, Protocol

from tenantware.admission.core import Ticket

__all__ = ["UNAVAILABLE", "PoolSpec", "SeatStore", "SeatStoreFactory"]

#: ``acquire``'s answer when the shared store cannot decide and its failure policy is
#: ``closed`` (besides ``core.GRANTED``, ``QUEUED`` and ``QUEUE_FULL``).
UNAVAILABLE: Final = 3


class SeatStore(Protocol):
    """One pool of upstream seats shared by every tenant, with its fair queue.

    ``acquire`` answers at once: ``GRANTED``, ``QUEUED``, ``QUEUE_FULL`` or ``UNAVAILABLE``.
    A queued ticket is granted later by some ``release`` or ``cancel`` (of this process or,
    with Redis, of any process); ``wait`` returns when that happened. Every granted ticket is
    released exactly once (``release`` with its actual weighted cost and raw tokens, or
    ``cancel``).
    """

    #: State lives outside this process (shared by replicas): a failure policy applies, and
    #: the pool's seats are not divided among replicas.
    remote: bool
    #: ``release`` awaits I/O, so it must be shielded from cancellation.
    yields: bool

    async def acquire(self, ticket: Ticket) -> int: ...

    async def wait(self, ticket: Ticket) -> None: ...

    async def cancel(self, ticket: Ticket) -> None: ...

    async def release(
        self, ticket: Ticket, actual_cost: float, actual_tokens: float | None = None
    ) -> None: ...

    def start_release(
        self, ticket: Ticket, actual_cost: float, actual_tokens: float | None = None
    ) -> Awaitable[None]:
        """``release``, sent now: on a pipelined connection its call leaves in the same
        write as every other call made in this event-loop turn (the quota settle); await
        the answer exactly once."""
        ...

    async def charge(self, ticket: Ticket, extra_cost: float) -> None:
        """A granted request costs more than charged so far (a long stream): charge it now."""

    async def state(self) -> dict[str, Any]: ...

    def resize(self, seats: int) -> None:
        """Change the number of seats (config reload); waiters that now fit are admitted."""

    def running(self) -> AbstractAsyncContextManager[None]:
        """The store's background work (lease renewal, wake-ups) for the gateway's lifetime."""
        ...


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """What a seat store is built from: one pool's share of ``AdmissionSettings``."""

    name: str
    seats: int
    band_shares: Sequence[float]
    max_queue: int
    tokens_per_s: float | None
    burst_s: float
    lease_s: float
    poll_min_s: float
    poll_max_s: float
    #: Seats kept free for tenants below their seat share (``fair`` scheduler only).
    headroom: int = 0
    #: Requests expected to hold a seat at most this long may borrow reserved seats.
    short_s: float = 0.0


#: Builds the store of one pool (memory, or the shared backend's): ``stores.seat_store``.
SeatStoreFactory = Callable[[PoolSpec], SeatStore]
