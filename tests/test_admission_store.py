"""One suite for every seat store: memory (``FairCore``) and Redis (the Lua script)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from tenantware.admission.core import GRANTED, QUEUE_FULL, QUEUED, Ticket
from tenantware.admission.memory import MemorySeatStore
from tenantware.admission.redis import RedisSeatStore
from tenantware.admission.store import SeatStore
from tenantware.backends.multiplex import MultiplexedRedis
from tenantware.backends.redis_support import connect_redis

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "redis", "multiplexed"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[object]:
    clients: list[Any] = []

    def build(seats: int, **options: object) -> SeatStore:
        if request.param == "memory":
            return MemorySeatStore(seats, **options)  # type: ignore[arg-type]
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
        client = connect_redis(url, timeout_s=2.0)
        clients.append(client)
        scripts = None
        if request.param == "multiplexed":
            scripts = MultiplexedRedis(url, timeout_s=2.0)
            clients.append(scripts)
        return RedisSeatStore(client, seats=seats, prefix=prefix, scripts=scripts, **options)  # type: ignore[arg-type]

    yield build
    for client in clients:
        await client.aclose()


def _t(tenant: str, cost: float = 100.0, weight: float = 1.0, **options: int) -> Ticket:
    return Ticket(tenant, weight, cost, **options)


async def _granted_within(store: SeatStore, ticket: Ticket, seconds: float = 2.0) -> bool:
    with anyio.move_on_after(seconds):
        await store.wait(ticket)
        return True
    return False


async def test_free_seats_grant_at_once_then_requests_queue(make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store(2)
    first, second, third = _t("a"), _t("a"), _t("a")
    assert await store.acquire(first) == GRANTED
    assert await store.acquire(second) == GRANTED
    assert await store.acquire(third) == QUEUED
    await anyio.sleep(0.05)
    state = await store.state()
    assert state["in_use"] == 2
    assert state["waiting"] == 1
    assert state["tenants"]["a"]["queued"] == 1
    assert 0.04 <= state["tenants"]["a"]["oldest_wait_s"] < 1.0
    await store.release(first, 100.0)
    assert await _granted_within(store, third)
    await store.release(second, 100.0)
    await store.release(third, 100.0)
    state = await store.state()
    assert state["in_use"] == 0
    assert state["waiting"] == 0


async def test_the_tenant_with_the_smallest_counter_goes_next(make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store(1)
    holder = _t("light", cost=10.0)
    assert await store.acquire(holder) == GRANTED
    heavy = _t("heavy", cost=1000.0)
    light = _t("light", cost=10.0)
    assert await store.acquire(heavy) == QUEUED
    assert await store.acquire(light) == QUEUED
    # "heavy" has been served nothing yet (counter 0 < 10): it goes first.
    await store.release(holder, 10.0)
    assert await _granted_within(store, heavy)
    heavy_again = _t("heavy", cost=1000.0)
    assert await store.acquire(heavy_again) == QUEUED
    # Now "light" (10) is far below "heavy" (1000), although "heavy" queued more recently.
    await store.release(heavy, 1000.0)
    assert await _granted_within(store, light)
    assert not heavy_again.granted
    await store.release(light, 10.0)
    assert await _granted_within(store, heavy_again)
    await store.release(heavy_again, 1000.0)


async def test_weights_scale_the_counter(make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store(1)
    holder = _t("x")
    assert await store.acquire(holder) == GRANTED
    big = [_t("big", weight=3.0) for _ in range(6)]
    small = [_t("small", weight=1.0) for _ in range(6)]
    for ticket in [*big, *small]:
        assert await store.acquire(ticket) == QUEUED
    order: list[str] = []
    current = holder
    for _ in range(8):
        await store.release(current, current.cost)
        current = next(t for t in [*big, *small] if t.granted)
        order.append(current.tenant)
    # Weight 3 vs 1 at equal costs: three "big" grants for each "small" one.
    assert order.count("big") == 6
    assert order.count("small") == 2
    await store.release(current, current.cost)


async def test_queue_limit_rejects(make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store(1, max_queue=2)
    holder = _t("a")
    assert await store.acquire(holder) == GRANTED
    queued = [_t("a"), _t("a")]
    for ticket in queued:
        assert await store.acquire(ticket) == QUEUED
    assert await store.acquire(_t("a")) == QUEUE_FULL
    # Another tenant has its own queue.
    other = _t("b")
    assert await store.acquire(other) == QUEUED
    for ticket in [*queued, other]:
        await store.cancel(ticket)
    await store.release(holder, 100.0)


async def test_a_cancelled_waiter_leaves_and_costs_nothing(make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store(1)
    holder = _t("a")
    assert await store.acquire(holder) == GRANTED
    gone = _t("b", cost=500.0)
    assert await store.acquire(gone) == QUEUED
    before = (await store.state())["tenants"]["b"]["counter"]
    await store.cancel(gone)
    state = await store.state()
    assert state["waiting"] == 0
    assert state["tenants"]["b"]["counter"] == before
    await store.release(holder, 100.0)
    state = await store.state()
    assert state["in_use"] == 0
    assert state["tenants"]["b"]["held"] == 0


async def test_a_cancelled_grant_is_refunded(make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store(1)
    ticket = _t("a", cost=400.0)
    assert await store.acquire(ticket) == GRANTED
    charged = (await store.state())["tenants"]["a"]["counter"]
    await store.cancel(ticket)
    state = await store.state()
    assert state["tenants"]["a"]["counter"] == pytest.approx(charged - 400.0)
    assert state["in_use"] == 0


async def test_completion_corrects_the_estimate(make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store(1)
    ticket = _t("a", cost=400.0, weight=0.5)
    assert await store.acquire(ticket) == GRANTED
    assert (await store.state())["tenants"]["a"]["counter"] == pytest.approx(800.0)
    await store.release(ticket, 1000.0)
    assert (await store.state())["tenants"]["a"]["counter"] == pytest.approx(2000.0)


async def test_reserved_seats_go_first_and_are_lent_while_unused(make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store(2)
    # "vip" reserves one seat but is idle: "bulk" may use both seats.
    a, b = _t("bulk"), _t("bulk")
    assert await store.acquire(a) == GRANTED
    assert await store.acquire(b) == GRANTED
    waiting = _t("bulk")
    assert await store.acquire(waiting) == QUEUED
    vip = _t("vip", reserved=1)
    assert await store.acquire(vip) == QUEUED
    # Make "bulk" look cheap so that plain VTC would pick it: the reservation wins anyway.
    await store.release(a, 0.0)
    assert await _granted_within(store, vip)
    assert not waiting.granted
    for ticket in (b, vip):
        await store.release(ticket, 100.0)
    assert await _granted_within(store, waiting)
    await store.release(waiting, 100.0)


async def test_reserved_seats_are_lent_only_to_short_requests(make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store(2, short_s=0.5)
    # The pool learns "vip"'s reservation from its first request.
    first = _t("vip", reserved=1)
    assert await store.acquire(first) == GRANTED
    await store.release(first, 100.0)
    # Its seat is kept: a long request (or one of unknown length) of another tenant waits...
    long_one = Ticket("bulk", 1.0, 100.0)
    assert await store.acquire(long_one) == GRANTED
    waiting = Ticket("bulk", 1.0, 100.0, hold=5.0)
    assert await store.acquire(waiting) == QUEUED
    # ... a short one borrows it.
    short = Ticket("other", 1.0, 100.0, hold=0.2)
    assert await store.acquire(short) == GRANTED
    vip = _t("vip", reserved=1)
    assert await store.acquire(vip) == QUEUED
    # The borrowed seat comes back to its owner, not to the long request queued earlier.
    await store.release(short, 100.0)
    assert await _granted_within(store, vip)
    assert not waiting.granted
    await store.release(vip, 100.0)
    assert not waiting.granted
    await store.release(long_one, 100.0)
    assert await _granted_within(store, waiting)
    await store.release(waiting, 100.0)


async def test_headroom_is_kept_for_tenants_below_their_seat_share(make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store(4, headroom=1)
    light = _t("light")
    assert await store.acquire(light) == GRANTED
    # Two active tenants of equal weight: a seat share of 2 each.
    heavy = [_t("heavy") for _ in range(3)]
    assert await store.acquire(heavy[0]) == GRANTED
    assert await store.acquire(heavy[1]) == GRANTED
    # At its share, "heavy" may not take the last free seat...
    assert await store.acquire(heavy[2]) == QUEUED
    # ... which "light", below its share, gets at once.
    light_again = _t("light")
    assert await store.acquire(light_again) == GRANTED
    await store.release(light_again, 100.0)
    state = await store.state()
    assert (state["in_use"], state["waiting"]) == (3, 1)
    assert not heavy[2].granted
    # Below its share again, "heavy" takes a free seat.
    await store.release(heavy[0], 100.0)
    assert await _granted_within(store, heavy[2])
    for ticket in (light, heavy[1], heavy[2]):
        await store.release(ticket, 100.0)


async def test_an_idle_tenant_stops_counting_in_the_shares_after_a_second(make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store(2, headroom=1)
    light, heavy = _t("light"), _t("heavy")
    assert await store.acquire(light) == GRANTED
    assert await store.acquire(heavy) == GRANTED
    await store.release(light, 100.0)
    # "light" just left and still counts: "heavy" holds its share (1 of 2 seats).
    waiting = _t("heavy")
    assert await store.acquire(waiting) == QUEUED
    # Once "light" has been idle for a second "heavy" is alone and takes the free seat,
    # with nobody releasing anything.
    assert await _granted_within(store, waiting, 5.0)
    for ticket in (heavy, waiting):
        await store.release(ticket, 100.0)


async def test_a_long_stream_is_charged_as_it_goes(make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store(1)
    ticket = _t("a", cost=100.0, weight=0.5)
    assert await store.acquire(ticket) == GRANTED
    assert (await store.state())["tenants"]["a"]["counter"] == pytest.approx(200.0)
    await store.charge(ticket, 300.0)
    assert (await store.state())["tenants"]["a"]["counter"] == pytest.approx(800.0)
    # The completion corrects from what was charged so far: 500 in all.
    await store.release(ticket, 500.0)
    assert (await store.state())["tenants"]["a"]["counter"] == pytest.approx(1000.0)


async def test_seat_cap_per_tenant_is_work_conserving(make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store(3)
    first = _t("a", cap=1)
    assert await store.acquire(first) == GRANTED
    capped = _t("a", cap=1)
    assert await store.acquire(capped) == QUEUED
    # Seats are free but "a" is at its cap; "b" still passes at once.
    other = _t("b")
    assert await store.acquire(other) == GRANTED
    await store.release(first, 100.0)
    assert await _granted_within(store, capped)
    for ticket in (capped, other):
        await store.release(ticket, 100.0)


async def test_bands_are_weighted_not_strict(make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store(1, band_shares=(3.0, 1.0, 1.0))
    holder = _t("x", band=0)
    assert await store.acquire(holder) == GRANTED
    crit = [_t("c", band=0) for _ in range(8)]
    bulk = [_t("b", band=2) for _ in range(4)]
    for ticket in [*crit, *bulk]:
        assert await store.acquire(ticket) == QUEUED
    order = []
    current = holder
    for _ in range(8):
        await store.release(current, current.cost)
        current = next(t for t in [*crit, *bulk] if t.granted)
        order.append(current.tenant)
    assert order.count("b") == 2, order
    await store.release(current, current.cost)
    for ticket in [*crit, *bulk]:
        if not ticket.granted:
            await store.cancel(ticket)


async def test_lifting_gives_no_credit_for_idling(make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store(1)
    holder = _t("busy")
    assert await store.acquire(holder) == GRANTED
    for _ in range(5):
        await store.release(holder, 100.0)
        holder = _t("busy")
        assert await store.acquire(holder) == GRANTED
    backlog = _t("busy")
    assert await store.acquire(backlog) == QUEUED
    late = _t("late")
    assert await store.acquire(late) == QUEUED
    state = await store.state()
    # "late" starts from the backlogged minimum, not from zero.
    assert state["tenants"]["late"]["counter"] >= state["tenants"]["busy"]["counter"] - 100.0
    for ticket in (backlog, late):
        await store.cancel(ticket)
    await store.release(holder, 100.0)


async def test_token_rate_holds_dispatch_until_the_bucket_refills(make_store) -> None:  # type: ignore[no-untyped-def]
    # 1000 tokens/s, 1 s of burst: a 1500-token request drives the bucket 500 into debt.
    store = make_store(10, tokens_per_s=1000.0)
    big = Ticket("a", 1.0, 100.0, tokens=1500.0)
    assert await store.acquire(big) == GRANTED
    small = Ticket("b", 1.0, 100.0, tokens=10.0)
    assert await store.acquire(small) == QUEUED
    started = time.perf_counter()
    assert await _granted_within(store, small, 3.0)
    assert 0.3 <= time.perf_counter() - started <= 2.0
    # Completion refunds what the estimate over-counted: the bucket is positive at once.
    await store.release(big, 100.0, 100.0)
    await store.release(small, 100.0, 10.0)
    quick = Ticket("c", 1.0, 100.0, tokens=10.0)
    assert await store.acquire(quick) == GRANTED
    await store.release(quick, 100.0, 10.0)


async def test_resizing_admits_waiters_that_now_fit(make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store(1)
    holder, waiter = _t("a"), _t("b")
    assert await store.acquire(holder) == GRANTED
    assert await store.acquire(waiter) == QUEUED
    store.resize(2)
    assert await _granted_within(store, waiter)
    assert (await store.state())["seats"] == 2
    for ticket in (holder, waiter):
        await store.release(ticket, 100.0)
