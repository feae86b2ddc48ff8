"""The in-process seat store: ``FairCore`` driven from the event loop (one process)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio

from tenantware.admission.core import QUEUED, FairCore, Ticket
from tenantware.admission.store import PoolSpec

__all__ = ["MemorySeatStore"]


class MemorySeatStore:
    """Fast path: a free seat with nobody waiting costs one method call (no task, no event).

    Only a queued ticket gets an ``anyio.Event``, set by whichever release grants it.
    """

    remote = False
    #: ``release`` never suspends: nothing to shield (a cancel scope per request saved).
    yields = False

    def __init__(
        self,
        seats: int,
        *,
        band_shares: Sequence[float] = (16.0, 4.0, 1.0),
        max_queue: int = 256,
        lifting: bool = True,
        tokens_per_s: float | None = None,
        burst_s: float = 1.0,
        headroom: int = 0,
        short_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.core = FairCore(
            seats,
            band_shares=band_shares,
            max_queue=max_queue,
            lifting=lifting,
            tokens_per_s=tokens_per_s,
            burst_s=burst_s,
            headroom=headroom,
            short_s=short_s,
        )
        self.clock = clock

    @classmethod
    def from_spec(cls, spec: PoolSpec, *, replicas: int = 1) -> MemorySeatStore:
        """The pool of ``spec``; with ``replicas`` processes, this one's share of its seats."""
        return cls(
            max(1, spec.seats // replicas),
            band_shares=spec.band_shares,
            max_queue=spec.max_queue,
            tokens_per_s=spec.tokens_per_s,
            burst_s=spec.burst_s,
            headroom=spec.headroom,
            short_s=spec.short_s,
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Nothing runs in the background: waiters are woken by releases."""
        yield

    async def acquire(self, ticket: Ticket) -> int:
        status, granted = self.core.submit(ticket, self.clock())
        if status == QUEUED:
            ticket.handle = anyio.Event()
        _wake(granted)
        return status

    async def wait(self, ticket: Ticket) -> None:
        event = ticket.handle
        if ticket.granted or event is None:
            return
        core = self.core
        if core.rate is None:
            if not core.headroom:
                await event.wait()
                return
            # With headroom, an idle tenant's weight leaving the shares (no release) may
            # let this ticket in: re-check when the next one is due.
            while not ticket.granted:
                with anyio.move_on_after(core.linger_in(self.clock())):
                    await event.wait()
                if not ticket.granted:
                    _wake(core.pump(self.clock()))
            return
        # With a token rate nobody may release while the bucket refills: re-check on time.
        while not ticket.granted:
            with anyio.move_on_after(max(0.001, core.retry_in(self.clock()))):
                await event.wait()
            if not ticket.granted:
                _wake(core.pump(self.clock()))

    async def cancel(self, ticket: Ticket) -> None:
        _wake(self.core.cancel(ticket, self.clock()))

    async def release(
        self, ticket: Ticket, actual_cost: float, actual_tokens: float | None = None
    ) -> None:
        granted = self.core.release(ticket, actual_cost, actual_tokens, self.clock())
        if granted:
            _wake(granted)

    def start_release(
        self, ticket: Ticket, actual_cost: float, actual_tokens: float | None = None
    ) -> Awaitable[None]:
        return self.release(ticket, actual_cost, actual_tokens)

    async def charge(self, ticket: Ticket, extra_cost: float) -> None:
        self.core.charge(ticket, extra_cost)

    def resize(self, seats: int) -> None:
        self.core.seats = seats
        _wake(self.core.pump(self.clock()))

    async def state(self) -> dict[str, Any]:
        core = self.core
        return {
            "seats": core.seats,
            "in_use": core.in_use,
            "waiting": core.waiting,
            "tenants": core.snapshot(self.clock()),
        }


def _wake(granted: list[Ticket]) -> None:
    for ticket in granted:
        if ticket.handle is not None:
            ticket.handle.set()
