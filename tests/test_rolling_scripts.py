"""A rolling restart mixes script versions: the previous release's quota and admission scripts
(``tests/data/scripts_before_leanlua``, as they were before the leaner scripts) and the
current ones share every key, so a request reserved by an old process and settled by a new
one (or the other way round) leaves every counter, slot and seat exact, and no key without
its expiry. So do the joint calls (reserve + acquire, settle + release: ``tenantware.joint``),
which run the same scripts' bodies. The key names, types and value formats did not change;
only the argument layout did, and each process calls its own script by its own digest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tenantware.admission.core import GRANTED, QUEUED, Ticket
from tenantware.admission.redis import RedisSeatStore
from tenantware.backends.multiplex import MultiplexedRedis
from tenantware.backends.redis_support import connect_redis
from tenantware.joint.redis import RedisReserveAcquire
from tenantware.quota.failover import FailoverQuotaStore
from tenantware.quota.redis import RedisQuotaStore
from tests.quota_support import plan_for

pytestmark = pytest.mark.anyio

_BEFORE = Path(__file__).parent / "data" / "scripts_before_leanlua"
_COMMON = (_BEFORE / "quota_common.lua").read_text()
_OLD_RESERVE = _COMMON + "\n" + (_BEFORE / "quota_reserve.lua").read_text()
_OLD_SETTLE = _COMMON + "\n" + (_BEFORE / "quota_settle.lua").read_text()
_OLD_ADMISSION = (_BEFORE / "admission.lua").read_text()
_NOW_S = 1_764_547_200.5  # mid-window for every limit below


async def test_old_and_new_quota_scripts_reserve_and_settle_the_same_counters(
    redis_url: str, redis_prefix: str
) -> None:
    plan = plan_for(
        redis_prefix,
        "acme",
        requests_per_minute=1000,
        tokens_per_minute=1_000_000,
        tokens_per_day=10_000_000,
        concurrent_requests=50,
        daily_budget_usd=1000,
        monthly_budget_usd=10_000,
    )
    now_us = int(_NOW_S * 1_000_000)
    async with connect_redis(redis_url, timeout_s=5.0) as client:
        new = RedisQuotaStore(client, clock=lambda: _NOW_S)

        async def old_reserve(ticket: str) -> Any:
            args = (now_us, 100, 1000, ticket, *plan.args, 0, 1000)
            return await client.eval(_OLD_RESERVE, len(plan.keys), *plan.keys, *args)

        async def old_settle(ticket: str) -> None:
            args = (now_us, -20, -200, ticket, 0, *plan.args, 200)
            await client.eval(_OLD_SETTLE, len(plan.keys), *plan.keys, *args)

        async def new_reserve(ticket: str) -> None:
            assert (await new.reserve(plan, 100, 1000, ticket)).allowed

        async def new_settle(ticket: str) -> None:
            await new.settle(plan, now_us, ticket, -20, -200)

        for mix, (reserve, settle) in enumerate(
            (
                (old_reserve, new_settle),
                (new_reserve, old_settle),
                (new_reserve, new_settle),
                (old_reserve, old_settle),
            )
        ):
            for i in range(3):
                ticket = f"{mix}-{i}"
                await reserve(ticket)
                assert (await new.usage(plan))[3] == 1  # the slot is held, whoever took it
                await settle(ticket)

        requests, tokens_m, tokens_d, slots, daily, monthly = await new.usage(plan)
        assert requests == 12
        assert tokens_m == tokens_d == 12 * 80
        assert slots == 0
        assert daily == monthly == 12 * 800
        for key in plan.keys:
            if await client.exists(key):
                assert await client.pttl(key) > 0, key  # nothing left without an expiry


def _old_head(seats: int) -> list[Any]:
    """The pool terms as the previous script took them: shares, not steps."""
    return [seats, 0.0, 0.0, 3, 16.0, 4.0, 1.0, 1, 0.0, 1.0]


async def test_old_and_new_admission_scripts_share_one_pool(
    redis_url: str, redis_prefix: str
) -> None:
    async with connect_redis(redis_url, timeout_s=5.0) as client:
        pool = RedisSeatStore(client, seats=1, prefix=redis_prefix, headroom=1)
        keys = pool.keys

        async def old(op: str, *args: Any) -> Any:
            return await client.eval(_OLD_ADMISSION, 1, *keys, op, *_old_head(1), *args)

        def old_acquire(ticket: str) -> Any:
            # ticket, tenant, band, cost, weight, reserved, cap, max_queue, lease_ms,
            # heartbeat_ms, tokens, hold, deadline
            return old("acquire", ticket, "beta", 2, 100.0, 1.0, 0, 0, 16, 30_000, 5000, 0, 0, 0)

        def old_release(ticket: str) -> Any:
            return old("release", ticket, "beta", 2, 100.0, 1.0, 80.0, 30_000, 0.0, 0.0)

        # A new process holds the only seat; an old one queues behind it.
        mine = Ticket("acme", 1.0, 100.0)
        assert await pool.acquire(mine) == GRANTED
        status, *_ = await old_acquire("old-1")
        assert status == QUEUED
        # The new release hands the seat to the old process's queued ticket.
        await pool.release(mine, 80.0)
        state = await pool.state()
        assert state["in_use"] == 1
        assert state["waiting"] == 0
        assert state["tenants"]["beta"]["held"] == 1
        # The old process releases it; the new one takes it again and an old release of a
        # ticket the new script granted frees it.
        await old_release("old-1")
        again = Ticket("acme", 1.0, 100.0)
        assert await pool.acquire(again) == GRANTED
        await old("release", again.id, "acme", 2, 100.0, 1.0, 80.0, 30_000, 0.0, 0.0)
        # And a seat the old script granted is released by the new one.
        status, *_ = await old_acquire("old-2")
        assert status == GRANTED
        taken = Ticket("beta", 1.0, 100.0, id="old-2")
        taken.lease = "old-2"
        await pool.release(taken, 80.0)
        state = await pool.state()
        assert state["in_use"] == 0
        assert state["waiting"] == 0
        assert {name: t["held"] for name, t in state["tenants"].items()} == {"acme": 0, "beta": 0}


async def test_the_joint_calls_share_counters_and_seats_with_the_previous_release(
    redis_url: str, redis_prefix: str
) -> None:
    # A new process reserves and asks for a seat in one call and settles and releases in
    # one call; an old one makes the four calls of the previous release: either may take
    # what the other gave, and settle or release what the other reserved or acquired.
    plan = plan_for(redis_prefix, "acme", tokens_per_minute=1_000_000, concurrent_requests=50)
    now_us = int(_NOW_S * 1_000_000)
    scripts = MultiplexedRedis(redis_url, timeout_s=5.0)
    async with connect_redis(redis_url, timeout_s=5.0) as client:
        primary = RedisQuotaStore(scripts, clock=lambda: _NOW_S)
        joint = RedisReserveAcquire(FailoverQuotaStore(primary, timeout_s=5.0), primary)
        pool = RedisSeatStore(client, seats=4, prefix=redis_prefix, scripts=scripts)
        joint.add(pool)
        keys = pool.keys

        async def old_pool(op: str, *args: Any) -> Any:
            return await client.eval(_OLD_ADMISSION, 1, *keys, op, *_old_head(4), *args)

        async def old_reserve(ticket: str, seat: Ticket) -> None:
            args = (now_us, 100, 1000, ticket, *plan.args, 0, 1000)
            assert (await client.eval(_OLD_RESERVE, len(plan.keys), *plan.keys, *args))[0] == 1
            seat.id = seat.lease = ticket
            acquire = (ticket, "acme", 2, 10.0, 1.0, 0, 0, 16, 30_000, 5000, 0, 0, 0)
            assert (await old_pool("acquire", *acquire))[0] == GRANTED

        async def old_settle(ticket: str, seat: Ticket) -> None:
            args = (now_us, -20, -200, ticket, 0, *plan.args, 200)
            await client.eval(_OLD_SETTLE, len(plan.keys), *plan.keys, *args)
            await old_pool("release", seat.id, "acme", 2, 10.0, 1.0, 8.0, 30_000, 0.0, 0.0)

        async def new_reserve(ticket: str, seat: Ticket) -> None:
            decision, status = await joint.reserve_acquire(
                plan, 100, 1000, ticket, None, pool, seat
            )
            assert (decision.allowed, status) == (True, GRANTED)

        async def new_settle(ticket: str, seat: Ticket) -> None:
            await joint.settle_release(plan, now_us, ticket, -20, -200, -200, pool, seat, 8.0, 8.0)

        try:
            for mix, (reserve, settle) in enumerate(
                ((old_reserve, new_settle), (new_reserve, old_settle), (new_reserve, new_settle))
            ):
                for i in range(3):
                    ticket, seat = f"{mix}-{i}", Ticket("acme", 1.0, 10.0)
                    await reserve(ticket, seat)
                    assert (await primary.usage(plan))[1] == 1  # the slot, whoever took it
                    assert (await pool.state())["in_use"] == 1  # and the seat
                    await settle(ticket, seat)
            tokens, slots = await primary.usage(plan)
            state = await pool.state()
        finally:
            await scripts.aclose()
        assert (tokens, slots) == (9 * 80, 0)
        assert (state["in_use"], state["waiting"]) == (0, 0)
        assert state["tenants"]["acme"]["held"] == 0
        for key in plan.keys:
            if await client.exists(key):
                assert await client.pttl(key) > 0, key
