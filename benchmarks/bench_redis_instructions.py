#!/usr/bin/env python
"""Instructions Redis executes per request (callgrind), and commands it runs per request.

    python benchmarks/bench_redis_instructions.py [--requests 300] [--startup 100]

A private ``redis-server`` runs under ``valgrind --tool=callgrind`` (deterministic: the host's
load does not move the count). One request's Redis work is driven through the stores
directly, on the pipelined connection the gateway uses: the joint reserve + acquire script,
then the joint settle + release script (``--separate``: the seat release and the quota settle
as two calls sent together, as before), one request at a time (``--held N``: with N other
requests holding a slot and a seat throughout), for the benchmark plan
(``benchconfig.bench_config``: the tenant's seven limits and the global rate, merged into
one plan; the global pool of 256 seats with its default headroom). A run of ``--startup``
requests and a run of ``--requests`` are subtracted, so start-up, script loading and
shutdown cancel out. ``INFO commandstats`` of the same runs gives the commands per request
(``EVALSHA`` and the commands the scripts ran inside Redis).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from benchconfig import bench_config  # noqa: E402

from tenantware import parse_config  # noqa: E402
from tenantware.admission.core import Ticket  # noqa: E402
from tenantware.admission.pools import pool_specs  # noqa: E402
from tenantware.admission.redis import RedisSeatStore  # noqa: E402
from tenantware.backends.multiplex import MultiplexedRedis  # noqa: E402
from tenantware.backends.redis_support import connect_redis  # noqa: E402
from tenantware.joint.redis import RedisReserveAcquire  # noqa: E402
from tenantware.quota.failover import FailoverQuotaStore  # noqa: E402
from tenantware.quota.plan import build_plan  # noqa: E402
from tenantware.quota.redis import RedisQuotaStore  # noqa: E402
from tests.servers import find_free_port  # noqa: E402

#: Commands that are the benchmark's own, not a request's.
_OWN = {"info", "ping", "config", "shutdown", "script", "client", "hello", "select"}


async def _requests(url: str, count: int, separate_calls: bool, held: int) -> dict[str, int]:
    """``count`` requests' store calls, one at a time; the server's ``commandstats`` after."""
    config = parse_config(bench_config("http://upstream.bench/v1", backend="redis", redis_url=url))
    tenant = config.tenants[0]
    prefix = "bench:"
    plan, separate = build_plan(config, tenant.id, tenant.limits, None, prefix, merge=True)
    assert plan is not None
    assert separate is None
    scripts = MultiplexedRedis(url, timeout_s=120.0)
    async with connect_redis(url, timeout_s=120.0) as redis:
        primary = RedisQuotaStore(scripts, prefix=prefix)
        quota = FailoverQuotaStore(primary, timeout_s=120.0)
        spec = pool_specs(config.admission)["*"]
        pool = RedisSeatStore.from_spec(spec, redis, prefix=prefix, scripts=scripts)
        joint = RedisReserveAcquire(quota, primary)
        joint.add(pool)
        for i in range(held):  # other requests in flight: the pool and slot keys stay
            seat = Ticket(tenant.id, 1.0, 94.0, tokens=94.0, hold=1.5)
            decision, status = await joint.reserve_acquire(
                plan, 94, 600_000, f"held{i}", None, pool, seat
            )
            assert decision.allowed, decision
            assert status == 0, status
        for i in range(count):
            ticket = f"t{i}"
            seat = Ticket(tenant.id, 1.0, 94.0, tokens=94.0, hold=1.5)
            decision, status = await joint.reserve_acquire(
                plan, 94, 600_000, ticket, None, pool, seat
            )
            assert decision.allowed, decision
            assert status == 0, status
            if separate_calls:
                release = pool.start_release(seat, 80.0, 80.0)
                await quota.settle(plan, decision.now_us, ticket, -14, -90_000)
                await release
            else:
                await joint.settle_release(
                    plan, decision.now_us, ticket, -14, -90_000, -90_000, pool, seat, 80.0, 80.0
                )
        stats = await redis.info("commandstats")
    await scripts.aclose()
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name.removeprefix("cmdstat_") not in _OWN
    }


def _run(count: int, workdir: Path, separate_calls: bool, held: int) -> tuple[int, dict[str, int]]:
    """Instructions of a server that served ``count`` requests, and its command counts."""
    port = find_free_port()
    out = workdir / f"callgrind.{count}.out"
    proc = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            "redis-server",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                subprocess.run(
                    ["redis-cli", "-p", str(port), "ping"], check=True, capture_output=True
                )
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        commands = asyncio.run(_requests(url, count, separate_calls, held))
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1]), commands
    raise RuntimeError(f"no totals in {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--startup", type=int, default=100)
    parser.add_argument(
        "--separate",
        action="store_true",
        help="settle and release as two script calls (sent together), as before the joint one",
    )
    parser.add_argument(
        "--held",
        type=int,
        default=0,
        help="requests kept in flight throughout (at 0 the pool empties between requests, "
        "so its keys are deleted and made again every request)",
    )
    parser.add_argument(
        "--keep", metavar="DIR", help="keep the callgrind files here (for callgrind_annotate)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tw-callgrind-") as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        small, small_commands = _run(args.startup, workdir, args.separate, args.held)
        large, large_commands = _run(args.requests, workdir, args.separate, args.held)
    n = args.requests - args.startup
    print(f"instructions per request: {(large - small) / n / 1000:.0f} k")
    per_command = {
        name: (calls - small_commands.get(name, 0)) / n for name, calls in large_commands.items()
    }
    print(f"commands per request: {sum(per_command.values()):.1f}")
    for name, calls in sorted(per_command.items(), key=lambda item: -item[1]):
        if calls:
            print(f"  {name}: {calls:.2f}")
    print(f"(load average: {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
