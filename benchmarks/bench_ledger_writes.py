"""How long the PostgreSQL ledger takes to store a batch (``PostgresLedger.write``).

Writes ``--batches`` batches of ``--size`` records (5 tenants, 3 models, 4 cost centers,
timestamps spread over the last ``--span`` seconds: a live writer's batch holds the last
second or so, a replayed spill file may hold a month) into a throwaway schema and prints
the median and worst time per batch. Only the public API is used, so the same file times
another checkout of the code:

    PYTHONPATH=/path/to/other/checkout python benchmarks/bench_ledger_writes.py
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid

import anyio
import psycopg
from psycopg import sql

from tenantware.metering.ledger import UsageRecord
from tenantware.metering.ledger.postgres import PostgresLedger

END = 1_800_000_000.0


def batch(rng: random.Random, size: int, span: float) -> list[UsageRecord]:
    return [
        UsageRecord(
            record_id=uuid.uuid4().hex,
            request_id=uuid.uuid4().hex,
            ts=END - rng.random() * span,
            tenant=f"tenant-{rng.randrange(5)}",
            cost_center=rng.choice(["", "research", "sales", "support"]),
            model_requested=rng.choice(["gpt-4.1", "gpt-4.1-mini", "claude"]),
            outcome=rng.choice(["ok"] * 7 + ["upstream_error", "rejected_quota", "rejected_queue"]),
            status=200,
            input_tokens=rng.randrange(4000),
            output_tokens=rng.randrange(800),
            cost_nanousd=rng.randrange(10**7),
            charged_nanousd=rng.randrange(10**7),
            latency_s=0.05 + rng.random() * 2,
            ttft_s=rng.random() * 0.4 if rng.random() < 0.5 else None,
        )
        for _ in range(size)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--size", type=int, default=500)
    parser.add_argument("--span", type=float, default=60.0)
    args = parser.parse_args()
    schema = f"bench_writes_{uuid.uuid4().hex[:8]}"
    ledger = PostgresLedger(args.url, schema=schema, timeout_s=60)
    rng = random.Random(1)
    batches = [batch(rng, args.size, args.span) for _ in range(args.batches)]
    times = []
    try:
        anyio.run(ledger.open)
        for records in batches:
            began = time.perf_counter()
            anyio.run(ledger.write, records)
            times.append(time.perf_counter() - began)
    finally:
        anyio.run(ledger.aclose)
        with psycopg.connect(args.url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    print(
        f"{args.batches} batches of {args.size} over {args.span:g} s: "
        f"median {statistics.median(times) * 1000:.1f} ms, "
        f"worst {max(times) * 1000:.1f} ms per batch"
    )


if __name__ == "__main__":
    main()
