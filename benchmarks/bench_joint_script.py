#!/usr/bin/env python
"""Redis time of the joint reserve + acquire script against the two scripts it replaces.

    python benchmarks/bench_joint_script.py [--iterations 3000] [--block 500]

Against a private ``redis-server``, one request's store calls in a loop on the pipelined
connection, one at a time: ``two calls`` = quota reserve, then admission acquire, then
release and settle; ``joint`` = the joint script, then release and settle (the same after-
response calls, so the difference is the reserve and acquire). The two modes alternate in
blocks; per request it prints the scripts' time inside Redis (``INFO commandstats``,
EVALSHA), Redis's process CPU (``INFO cpu``) and the wall time of the loop (round trips).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

from tenantware.admission.core import Ticket  # noqa: E402
from tenantware.admission.redis import RedisSeatStore  # noqa: E402
from tenantware.backends.multiplex import MultiplexedRedis  # noqa: E402
from tenantware.backends.redis_support import connect_redis  # noqa: E402
from tenantware.joint.redis import RedisReserveAcquire  # noqa: E402
from tenantware.quota.failover import FailoverQuotaStore  # noqa: E402
from tenantware.quota.redis import RedisQuotaStore  # noqa: E402
from tests.quota_support import plan_for  # noqa: E402
from tests.servers import throwaway_redis  # noqa: E402


async def _stats(redis: Any) -> tuple[float, float, float]:
    """(EVALSHA µs, EVALSHA calls, Redis CPU µs) so far."""
    stats = await redis.info("commandstats")
    cpu = await redis.info("cpu")
    evalsha = stats.get("cmdstat_evalsha", {"usec": 0, "calls": 0})
    used = (cpu["used_cpu_user"] + cpu["used_cpu_sys"]) * 1e6
    return float(evalsha["usec"]), float(evalsha["calls"]), used


async def measure(url: str, iterations: int, block: int) -> dict[str, list[float]]:
    scripts = MultiplexedRedis(url, timeout_s=5.0)
    totals = {mode: [0.0, 0.0, 0.0, 0.0, 0.0] for mode in ("two calls", "joint")}
    async with connect_redis(url, timeout_s=5.0) as redis:
        primary = RedisQuotaStore(scripts, prefix="bench:")
        quota = FailoverQuotaStore(primary, timeout_s=5.0)
        pool = RedisSeatStore(redis, seats=64, prefix="bench:", scripts=scripts)
        joint = RedisReserveAcquire(quota, primary)
        joint.add(pool)
        plan = plan_for(
            "bench:", "acme", tokens_per_day=10**9, daily_budget_usd=1000, concurrent_requests=64
        )

        async def one(mode: str, i: int) -> None:
            ticket = f"t{i}"
            seat = Ticket("acme", 1.0, 100.0, tokens=100.0)
            if mode == "joint":
                decision, status = await joint.reserve_acquire(
                    plan, 100, 1000, ticket, None, pool, seat
                )
                assert decision.allowed, decision
                assert status == 0, status
            else:
                decision = await quota.reserve(plan, 100, 1000, ticket)
                assert decision.allowed, decision
                assert await pool.acquire(seat) == 0
            release = pool.start_release(seat, 100.0, 100.0)
            await quota.settle(plan, decision.now_us, ticket, 0, 0)
            await release

        for warm in range(50):
            await one("joint", warm)
            await one("two calls", warm)
        done = 0
        while done < iterations:
            for mode in ("two calls", "joint"):
                before = await _stats(redis)
                started = time.perf_counter()
                for i in range(block):
                    await one(mode, done + i)
                wall = time.perf_counter() - started
                after = await _stats(redis)
                total = totals[mode]
                for k in range(3):
                    total[k] += after[k] - before[k]
                total[3] += wall * 1e6
                total[4] += block
            done += block
    await scripts.aclose()
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--block", type=int, default=500)
    args = parser.parse_args()
    with throwaway_redis() as server:
        totals = asyncio.run(measure(server.url, args.iterations, args.block))
    print("| per request | EVALSHA calls | script time in Redis | Redis CPU | wall (c=1) |")
    print("|---|---|---|---|---|")
    for mode, (usec, calls, cpu, wall, n) in totals.items():
        print(
            f"| {mode} | {calls / n:.2f} | {usec / n:.0f} µs | {cpu / n:.0f} µs"
            f" | {wall / n:.0f} µs |"
        )


if __name__ == "__main__":
    main()
