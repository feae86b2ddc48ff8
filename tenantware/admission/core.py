"""The fair-share scheduler: virtual token counters (VTC) over priority bands and seats.

Synchronous and clock-free on purpose: the memory backend drives it from the event loop, the
tests drive it from a deterministic discrete-event simulation, and the Redis Lua script
implements the same rules (``lua/admission.lua``), so both are checked by one test suite.

Rules, in the order a free seat is given away:

1. protected seats: a tenant's unused reserved seats are kept for it, and the last
   ``headroom`` free seats for tenants below their seat share (``held < seats x weight / sum
   of the weights of the active tenants``); other requests may borrow them only if expected
   to end within ``short_s``. So a long request of a tenant at or above its share never
   delays a tenant below it (the README states the bound and its preconditions);
2. guaranteed seats: a backlogged tenant holding fewer seats than it has reserved goes first;
3. bands: the backlogged band with the smallest band counter goes next; a dispatch adds
   ``1 / share`` to it (weighted round robin by count, lifted like the tenant counters);
4. tenants: inside the band, the backlogged tenant with the smallest virtual counter goes
   next; a dispatch adds ``estimated cost / weight``, completion adds the correction
   ``(actual - estimated) / weight``;
5. lifting: a tenant (or band) that becomes backlogged is lifted to the minimum counter of the
   backlogged ones (or, with none, to the system virtual time): idling banks no credit;
6. work conservation: apart from protected seats, a seat never stays free while a request
   that may take it waits.

A long stream is charged as it goes (``charge``), so its tenant's counter is not stale until
it ends.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from typing import Any, Final

__all__ = ["BANDS", "GRANTED", "LINGER_S", "QUEUED", "QUEUE_FULL", "FairCore", "Ticket"]

#: Band names, highest first; a band's index is its rank.
BANDS: Final = ("critical", "normal", "bulk")
BAND_INDEX: Final = {name: i for i, name in enumerate(BANDS)}

#: An idle tenant still counts in the seat shares this long (a client between two requests).
LINGER_S: Final = 1.0

GRANTED: Final = 0
QUEUED: Final = 1
QUEUE_FULL: Final = 2


class Ticket:
    """One request asking for a seat; ``cost`` is its estimated weighted token cost."""

    __slots__ = (
        "band",
        "cap",
        "cost",
        "enqueued_at",
        "granted",
        "handle",
        "hold",
        "id",
        "lease",
        "reserved",
        "tenant",
        "tokens",
        "weight",
    )

    def __init__(
        self,
        tenant: str,
        weight: float,
        cost: float,
        *,
        band: int = 1,
        reserved: int = 0,
        cap: int = 0,
        tokens: float = 0.0,
        hold: float = 0.0,
        id: str = "",
    ) -> None:
        self.tenant = tenant
        #: Expected seconds the request holds its seat (0: unknown, counted as long).
        self.hold = hold
        #: Raw tokens (input + output) estimated, for the optional tokens/second rate.
        self.tokens = tokens
        self.weight = weight
        self.cost = cost
        self.band = band
        #: Seats guaranteed to the tenant, and its seat cap (0: none).
        self.reserved = reserved
        self.cap = cap
        self.id = id
        self.granted = False
        self.enqueued_at = 0.0
        #: Backend data: the memory backend's wake-up event, the Redis lease id.
        self.handle: Any = None
        self.lease: str = ""


class _Tenant:
    __slots__ = ("counter", "held", "left", "lingers", "queued", "queues", "reserved", "weight")

    def __init__(self, counter: float, bands: int) -> None:
        self.counter = counter
        self.held = 0
        self.queued = 0
        self.reserved = 0
        #: The weight counted in ``FairCore.active_weight`` (0: not counted).
        self.weight = 0.0
        #: When it last went idle (held and waited for nothing); -1 while active.
        self.left = -1.0
        #: Whether it has an entry in ``FairCore._lingering``.
        self.lingers = False
        self.queues: list[deque[Ticket]] = [deque() for _ in range(bands)]


class FairCore:
    """The scheduling state of one pool of ``seats``; see the module docstring for the rules.

    ``lifting=False`` exists only to show, in a test, what the lifting rule prevents.
    """

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
        linger_s: float = LINGER_S,
    ) -> None:
        if seats < 1:
            raise ValueError("seats must be >= 1")
        self.seats = seats
        #: Seats kept for tenants below their seat share (borrowed only by short requests).
        self.headroom = headroom
        #: Requests expected to hold their seat at most this long may use protected seats.
        self.short_s = short_s
        #: Sum of the weights of the active tenants: holding or waiting for a seat, or idle
        #: for less than ``linger_s`` (a client between two requests is still there).
        self.active_weight = 0.0
        self.linger_s = linger_s
        #: Heap of (since, tenant) of the idle tenants still counted.
        self._lingering: list[tuple[float, str]] = []
        #: Optional token bucket: a dispatch needs a positive level (and may take it below
        #: zero); completion refunds or charges the difference between estimate and actual.
        self.rate = tokens_per_s
        self.burst = (tokens_per_s or 0.0) * burst_s
        self.level = self.burst
        self._refilled: float | None = None
        self.max_queue = max_queue
        self.lifting = lifting
        self.in_use = 0
        self.waiting = 0
        #: System virtual time: the largest counter a dispatch started from.
        self.vt = 0.0
        self.tenants: dict[str, _Tenant] = {}
        self._band_step = [1.0 / share for share in band_shares]
        self._band_counter = [0.0] * len(band_shares)
        self._band_vt = 0.0
        #: Per band: tenants with requests waiting in that band.
        self._backlog: list[set[str]] = [set() for _ in band_shares]
        #: Tenants with a reservation (scanned first at each dispatch).
        self._reserving: set[str] = set()

    # -- requests -------------------------------------------------------------------------

    def submit(self, ticket: Ticket, now: float = 0.0) -> tuple[int, list[Ticket]]:
        """Grant at once, queue, or refuse (queue full); also returns tickets granted now."""
        state = self.tenants.get(ticket.tenant)
        if state is None:
            state = self.tenants[ticket.tenant] = _Tenant(self._floor(), len(self._backlog))
        if ticket.reserved != state.reserved:
            state.reserved = ticket.reserved
            if ticket.reserved:
                self._reserving.add(ticket.tenant)
            else:
                self._reserving.discard(ticket.tenant)
        headroom = self.headroom
        if headroom:
            # Seat shares are only needed for the headroom.
            if self._lingering:
                self._expire(now)
            if ticket.weight != state.weight:
                self.active_weight += ticket.weight - state.weight
                state.weight = ticket.weight
            state.left = -1.0
        if (
            not self.waiting
            and self.in_use < self.seats
            and _may_hold(state, ticket)
            and (not (headroom or self._reserving) or self._fits(state, ticket, ticket.tenant))
            and (self.rate is None or self._room(now))
        ):
            # The fast path: free capacity and nobody waiting.
            if self.lifting and state.counter < self.vt:
                state.counter = self.vt
            self._grant(ticket, state)
            return GRANTED, []
        if state.queued >= self.max_queue:
            return QUEUE_FULL, []
        if not state.queued and self.lifting:
            floor = self._floor()
            if state.counter < floor:
                state.counter = floor
        band = ticket.band
        backlog = self._backlog[band]
        if not backlog and self.lifting:
            floor = min(
                (self._band_counter[b] for b, other in enumerate(self._backlog) if other),
                default=self._band_vt,
            )
            if self._band_counter[band] < floor:
                self._band_counter[band] = floor
        backlog.add(ticket.tenant)
        ticket.enqueued_at = now
        state.queues[band].append(ticket)
        state.queued += 1
        self.waiting += 1
        granted = self._dispatch(now)
        return (GRANTED if ticket.granted else QUEUED), granted

    def release(
        self,
        ticket: Ticket,
        actual_cost: float,
        actual_tokens: float | None = None,
        now: float = 0.0,
    ) -> list[Ticket]:
        """A granted request finished: free its seat, correct its charge, dispatch."""
        state = self.tenants[ticket.tenant]
        state.held -= 1
        self.in_use -= 1
        if self.headroom and not (state.held or state.queued):
            self._idle(state, ticket.tenant, now)
        state.counter += (actual_cost - ticket.cost) / ticket.weight
        ticket.granted = False
        if self.rate is not None:
            used = ticket.tokens if actual_tokens is None else actual_tokens
            self.level = min(self.burst, self.level + ticket.tokens - used)
        return self._dispatch(now)

    def cancel(self, ticket: Ticket, now: float = 0.0) -> list[Ticket]:
        """The client left: a waiting ticket leaves the queue; a granted one is refunded."""
        if ticket.granted:
            return self.release(ticket, 0.0, 0.0, now)
        state = self.tenants.get(ticket.tenant)
        if state is None:
            return []
        queue = state.queues[ticket.band]
        try:
            queue.remove(ticket)
        except ValueError:
            return []
        state.queued -= 1
        self.waiting -= 1
        if not queue:
            self._backlog[ticket.band].discard(ticket.tenant)
        if self.headroom and not (state.held or state.queued):
            self._idle(state, ticket.tenant, now)
        return self._dispatch(now)

    def charge(self, ticket: Ticket, extra_cost: float) -> None:
        """A granted request turned out costlier than charged so far (a long stream, counted
        as it goes): charge the difference now; ``release`` corrects from the new charge."""
        if ticket.granted and extra_cost > 0:
            self.tenants[ticket.tenant].counter += extra_cost / ticket.weight
            ticket.cost += extra_cost

    def pump(self, now: float) -> list[Ticket]:
        """Dispatch what the token bucket (or an expired linger) now allows."""
        return self._dispatch(now)

    def retry_in(self, now: float) -> float:
        """Seconds until the token bucket is positive again (0 without a rate)."""
        if self.rate is None or self._room(now):
            return 0.0
        return -self.level / self.rate + 0.001

    def linger_in(self, now: float) -> float:
        """Seconds until an idle tenant may stop counting in the seat shares (which may let
        a waiter take the headroom): when a waiter with nobody releasing should ``pump``."""
        if not self._lingering:
            return self.linger_s
        return max(0.001, self._lingering[0][0] + self.linger_s - now + 0.001)

    # -- inspection -------------------------------------------------------------------------

    def snapshot(self, now: float = 0.0) -> dict[str, dict[str, float]]:
        """Per tenant: counter, seats held, requests waiting, age of its oldest waiter."""
        out: dict[str, dict[str, float]] = {}
        for name, s in self.tenants.items():
            heads = [queue[0].enqueued_at for queue in s.queues if queue]
            out[name] = {
                "counter": s.counter,
                "held": s.held,
                "queued": s.queued,
                "oldest_wait_s": now - min(heads) if heads else 0.0,
            }
        return out

    # -- internals ------------------------------------------------------------------------

    def _floor(self) -> float:
        """Where a newly backlogged tenant starts: min backlogged counter, else virtual time."""
        best = None
        for backlog in self._backlog:
            for name in backlog:
                counter = self.tenants[name].counter
                if best is None or counter < best:
                    best = counter
        return self.vt if best is None else best

    def _idle(self, state: _Tenant, name: str, now: float) -> None:
        """The tenant holds and waits for nothing: its weight leaves after ``linger_s``.

        One entry per tenant at most in ``_lingering`` (a busy tenant goes idle at every
        release): an entry found out of date when it comes due is pushed back."""
        if not state.lingers:
            state.lingers = True
            heapq.heappush(self._lingering, (now, name))
        state.left = now

    def _expire(self, now: float) -> None:
        lingering = self._lingering
        linger = self.linger_s
        while lingering and lingering[0][0] + linger <= now:
            _since, name = heapq.heappop(lingering)
            state = self.tenants[name]
            if state.left < 0.0:  # active again
                state.lingers = False
            elif state.left + linger <= now:
                state.lingers = False
                self.active_weight -= state.weight
                state.weight = 0.0
                state.left = -1.0
            else:
                heapq.heappush(lingering, (state.left, name))
        if not lingering and not self.in_use and not self.waiting:
            self.active_weight = 0.0  # no float drift survives an idle pool

    def _fits(self, state: _Tenant, ticket: Ticket, name: str) -> bool:
        """Whether the ticket may take a free seat now, given the protected seats.

        Protected: the unused reserved seats of other tenants, plus ``headroom`` unless the
        tenant is below its seat share. A tenant under its own reservation, and a request
        expected to end within ``short_s``, may take any free seat.
        """
        if not (self.headroom or self._reserving) or state.held < state.reserved:
            return True
        if 0.0 < ticket.hold <= self.short_s:
            return True
        protected = 0
        for other in self._reserving:
            if other != name:
                owner = self.tenants[other]
                if owner.held < owner.reserved:
                    protected += owner.reserved - owner.held
        if self.headroom and not self._below_share(state):
            # One seat at least stays open to everyone.
            protected += min(self.headroom, self.seats - 1)
        return self.seats - self.in_use > protected

    def _below_share(self, state: _Tenant) -> bool:
        """Fewer seats held than its seat share, ``seats x weight / active weight`` (with a
        margin: the running weight sum drifts, and an exact share is not below it)."""
        return state.held * self.active_weight < self.seats * state.weight * (1.0 - 1e-9)

    def _grant(self, ticket: Ticket, state: _Tenant) -> None:
        if state.counter > self.vt:
            self.vt = state.counter
        state.counter += ticket.cost / ticket.weight
        state.held += 1
        self.in_use += 1
        self.level -= ticket.tokens
        ticket.granted = True

    def _room(self, now: float) -> bool:
        """Refill the token bucket to ``now``; whether a dispatch may take from it."""
        assert self.rate is not None
        if self._refilled is not None and now > self._refilled:
            self.level = min(self.burst, self.level + (now - self._refilled) * self.rate)
        if self._refilled is None or now > self._refilled:
            self._refilled = now
        return self.level > 0

    def _dispatch(self, now: float) -> list[Ticket]:
        if self._lingering:
            self._expire(now)
        granted: list[Ticket] = []
        while self.waiting and self.in_use < self.seats and (self.rate is None or self._room(now)):
            ticket = self._pick()
            if ticket is None:
                break
            granted.append(ticket)
        return granted

    def _pick(self) -> Ticket | None:
        tenants = self.tenants
        # Guaranteed seats first: a tenant under its reservation waits one release at most.
        best_name = None
        best_counter = 0.0
        for name in self._reserving:
            state = tenants[name]
            if (
                state.queued
                and state.held < state.reserved
                and (best_name is None or state.counter < best_counter)
            ):
                best_name, best_counter = name, state.counter
        if best_name is not None:
            state = tenants[best_name]
            band = next(b for b, q in enumerate(state.queues) if q)
            return self._take(state, best_name, band, charge_band=False)
        # Then bands by their counters, tenants inside a band by theirs.
        order = sorted(
            (self._band_counter[b], b) for b, backlog in enumerate(self._backlog) if backlog
        )
        for _counter, band in order:
            best_name = None
            for name in self._backlog[band]:
                state = tenants[name]
                head = state.queues[band][0]
                if not _may_hold(state, head) or not self._fits(state, head, name):
                    continue
                if best_name is None or state.counter < best_counter:
                    best_name, best_counter = name, state.counter
            if best_name is not None:
                return self._take(tenants[best_name], best_name, band, charge_band=True)
        return None

    def _take(self, state: _Tenant, name: str, band: int, *, charge_band: bool) -> Ticket:
        queue = state.queues[band]
        ticket = queue.popleft()
        state.queued -= 1
        self.waiting -= 1
        if not queue:
            self._backlog[band].discard(name)
        if charge_band:
            counter = self._band_counter[band]
            if counter > self._band_vt:
                self._band_vt = counter
            self._band_counter[band] = counter + self._band_step[band]
        self._grant(ticket, state)
        return ticket


def _may_hold(state: _Tenant, ticket: Ticket) -> bool:
    return not ticket.cap or state.held < ticket.cap
