"""The quota decision inside a burst: four gateway processes, one private Redis.

Each of 4 gateway processes (``tests/burst_worker.py``, the full middleware stack around an
inner app) sends its share of a 1,000-request burst at the same instant, against one tenant
limited to ``requests_per_minute = 100`` (burst 1). Printed per run:

* p50 / p99 / max of the quota decision (the store's ``reserve`` as the quota layer awaits
  it: Redis queueing, the pipelined connection, this process's event-loop lag);
* Redis CPU (``INFO cpu``, user + sys) and script time (``INFO commandstats``, EVALSHA)
  per decision and per admitted request;
* degraded decisions (``tenantware_store_failures_total``; must be 0 on a healthy Redis).

Runs on an idle host and with 2 CPU-hog processes (one per core here).

Usage: ``PYTHONPATH=. python benchmarks/bench_burst.py [--runs 3] [--requests 1000]``
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from typing import Any

import redis

from tests.burst_worker import REPORTS, Job, Load, cpu_hogs, workers
from tests.servers import throwaway_redis

PROCESSES = 4
LIMITS = {"requests_per_minute": 100, "burst_multiplier": 1.0}


def redis_cpu(client: redis.Redis) -> tuple[float, int, int]:
    """Redis's CPU seconds so far, and EVALSHA calls and microseconds."""
    cpu: dict[str, Any] = client.info("cpu")
    stats: dict[str, Any] = client.info("commandstats")
    evalsha = stats.get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    return (
        float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        int(evalsha["calls"]),
        int(evalsha["usec"]),
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one_run(url: str, requests: int, hogs: int) -> dict[str, float]:
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    jobs = [
        Job(
            redis_url=url,
            prefix=prefix,
            tenants={"rate": Load(limits=LIMITS, requests=requests // PROCESSES)},
            time_decisions=True,
        )
        for _ in range(PROCESSES)
    ]
    client = redis.Redis.from_url(url)
    with workers(jobs) as go, cpu_hogs(30, hogs):
        time.sleep(0.5 if hogs else 0.0)
        before = redis_cpu(client)
        go()
        # The block's end waits for every process's report; Redis is read right after.
    after = redis_cpu(client)
    client.close()
    decisions = [d for report in REPORTS for d in report.decisions]
    admitted = sum(1 for report in REPORTS for call in report.calls if call[3] == 200)
    degraded = sum(sum(report.failures[-1][1].values()) for report in REPORTS)
    cpu_s = after[0] - before[0]
    calls = after[1] - before[1]
    return {
        "decisions": len(decisions),
        "admitted": admitted,
        "degraded": degraded,
        "p50_ms": percentile(decisions, 0.50) * 1000,
        "p99_ms": percentile(decisions, 0.99) * 1000,
        "max_ms": max(decisions) * 1000,
        "redis_cpu_us_per_decision": cpu_s * 1e6 / len(decisions),
        "redis_cpu_us_per_admitted": cpu_s * 1e6 / max(1, admitted),
        "evalsha_calls": calls,
        "evalsha_us_per_call": (after[2] - before[2]) / max(1, calls),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    with throwaway_redis() as server:
        for hogs in (0, 2):
            results = [one_run(server.url, args.requests, hogs) for _ in range(args.runs)]
            print(f"-- {args.requests} requests from {PROCESSES} processes, {hogs} CPU hogs")
            for result in results:
                print("   " + "  ".join(f"{k}={v:.1f}" for k, v in result.items()))
            for key in ("p50_ms", "p99_ms", "redis_cpu_us_per_admitted"):
                print(f"   median {key}: {statistics.median(r[key] for r in results):.1f}")


if __name__ == "__main__":
    main()
