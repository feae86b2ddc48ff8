"""The seat store protocol: where seats and fair-share counters live (memory or Redis)."""

from __future__ import annotations

from typing import Any, Protocol

from tenantware.admission.core import Ticket

__all__ = ["SeatStore"]


class SeatStore(Protocol):
    """One pool of upstream seats shared by every tenant, with its fair queue.

    ``acquire`` answers at once: ``GRANTED``, ``QUEUED`` or ``QUEUE_FULL``. A queued ticket
    is granted later by some ``release`` or ``cancel`` (of this process or, with Redis, of
    any process); ``wait`` returns when that happened. Every granted ticket is released
    exactly once (``release`` with its actual weighted cost and raw tokens, or ``cancel``).
    """

    #: Whether ``release`` awaits I/O (and so must be shielded from cancellation).
    shield_release: bool

    async def acquire(self, ticket: Ticket) -> int: ...

    async def wait(self, ticket: Ticket) -> None: ...

    async def cancel(self, ticket: Ticket) -> None: ...

    async def release(
        self, ticket: Ticket, actual_cost: float, actual_tokens: float | None = None
    ) -> None: ...

    async def charge(self, ticket: Ticket, extra_cost: float) -> None:
        """A granted request costs more than charged so far (a long stream): charge it now."""

    async def state(self) -> dict[str, Any]: ...

    def resize(self, seats: int) -> None:
        """Change the number of seats (config reload); waiters that now fit are admitted."""
