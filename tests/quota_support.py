"""Builders for the quota tests: plans from limits, a controllable clock, both stores."""

from __future__ import annotations

from typing import Any

from tenantware.backends.multiplex import MultiplexedRedis
from tenantware.backends.redis_support import RedisClient, connect_redis
from tenantware.config import Limits
from tenantware.quota import MemoryQuotaStore, Plan, QuotaStore, RedisQuotaStore, build_plan
from tests.support import make_config

#: 2026-11-23 12:00:00 UTC: far from any day or month boundary.
NOON = 1_795_435_200.0


class Clock:
    """A clock the test moves by hand (Unix seconds)."""

    def __init__(self, start: float = NOON) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def plan_for(
    prefix: str = "", tenant: str = "acme", model: str | None = None, **limits: Any
) -> Plan:
    """The tenant plan of ``Limits(**limits)`` (no tier defaults)."""
    config = make_config()
    plan, _ = build_plan(config, tenant, Limits(**limits), model, prefix)
    assert plan is not None
    return plan


def make_store(
    kind: str, clock: Clock | None, *, redis_url: str = "", prefix: str = ""
) -> tuple[QuotaStore, RedisClient | MultiplexedRedis | None]:
    """A store of ``kind`` on ``clock`` (Redis TIME when ``None``): ``memory``, ``redis``
    (redis-py) or ``multiplexed`` (the pipelined connection the gateway uses)."""
    if kind == "memory":
        return MemoryQuotaStore(prefix=prefix, clock=clock or Clock()), None
    client: RedisClient | MultiplexedRedis
    if kind == "multiplexed":
        client = MultiplexedRedis(redis_url, timeout_s=5.0)
    else:
        client = connect_redis(redis_url, timeout_s=5.0)
    return RedisQuotaStore(client, prefix=prefix, clock=clock), client


def hammer_process(
    results: Any, worker: int, url: str, prefix: str, frozen_now: float, requests: int, start: Any
) -> None:
    """One OS process of the multi-process proof: ``requests`` concurrent reservations.

    Puts how many were admitted by 100/min (frozen clock), by 100/hour (Redis TIME), by
    100,000 tokens/min (1,000 each), by the same limit with settles refunding part of each
    reservation at once, and the tokens those settled as actually used.
    """
    import asyncio

    import redis.asyncio as aioredis

    async def run() -> list[int]:
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=32, timeout=20)
        client = aioredis.Redis(connection_pool=pool)
        frozen = RedisQuotaStore(client, prefix=prefix, clock=Clock(frozen_now))
        timed = RedisQuotaStore(client, prefix=prefix)
        per_minute = plan_for(prefix, requests_per_minute=100, burst_multiplier=1.0)
        per_hour = plan_for(prefix, tenant="other", requests_per_hour=100)
        tokens = plan_for(prefix, tenant="third", tokens_per_minute=100_000)
        refunded = plan_for(prefix, tenant="fourth", tokens_per_minute=100_000)
        counts = [0, 0, 0, 0, 0]

        async def one(i: int) -> None:
            ticket = f"w{worker}-{i}"
            a, b, c, d = await asyncio.gather(
                frozen.reserve(per_minute, 0, 0, ticket),
                timed.reserve(per_hour, 0, 0, ticket),
                frozen.reserve(tokens, 1_000, 0, ticket),
                frozen.reserve(refunded, 1_000, 0, ticket),
            )
            counts[0] += a.allowed
            counts[1] += b.allowed
            counts[2] += c.allowed
            if d.allowed:
                actual = 1_000 - (i % 7) * 100
                await frozen.settle(refunded, d.now_us, ticket, actual - 1_000, 0)
                counts[3] += 1
                counts[4] += actual

        start.wait(60)
        await asyncio.gather(*(one(i) for i in range(requests)))
        await client.aclose()
        await pool.aclose()
        return counts

    results.put(asyncio.run(run()))
