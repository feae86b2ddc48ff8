"""The reports' SQL (SQLite, PostgreSQL) gives exactly the Python aggregation's figures on the
same records: every period, every grouping, a tenant filter and a time window."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tenantware.context import Outcome
from tenantware.metering.ledger import Ledger, SqliteLedger, UsageRecord
from tenantware.metering.ledger.postgres import PostgresLedger
from tenantware.metering.ledger.tally import (
    DIMENSIONS,
    PERIODS,
    SHADOW,
    ReportQuery,
    bucket_start,
    tally_records,
)

pytestmark = pytest.mark.anyio

#: Late October to early December: month, day and hour boundaries are crossed.
START = datetime(2026, 10, 30, 22, tzinfo=UTC).timestamp()
OUTCOMES = [
    Outcome.OK,
    Outcome.OK,
    Outcome.OK,
    Outcome.CLIENT_DISCONNECTED,
    Outcome.UPSTREAM_ERROR,
    Outcome.UPSTREAM_TIMEOUT,
    Outcome.ERROR,
    Outcome.REJECTED_AUTH,
    Outcome.REJECTED_QUOTA,
    Outcome.REJECTED_BUDGET,
    Outcome.REJECTED_QUEUE,
    Outcome.BREAKER_OPEN,
    SHADOW,
]


def mixed_records(n: int, seed: int = 20) -> list[UsageRecord]:
    """Records over five weeks with ties, missing time-to-first-token, records exactly on
    period boundaries and a microsecond before them."""
    rng = random.Random(seed)
    boundary = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
    records = []
    for i in range(n):
        if i % 50 == 0:
            ts = boundary + rng.choice([0.0, -1e-6, 3600.0, 3600.0 - 1e-6, 86_400.0 - 0.0004])
        else:
            ts = START + rng.uniform(0, 35 * 86_400)
        outcome = rng.choice(OUTCOMES)
        streamed = rng.random() < 0.5
        billed = outcome in (Outcome.OK, Outcome.CLIENT_DISCONNECTED, Outcome.UPSTREAM_ERROR)
        records.append(
            UsageRecord(
                record_id=f"rec-{seed}-{i}",
                request_id=f"req-{i}",
                ts=ts,
                tenant=rng.choice(["acme", "beta", "<script>x</script>", "zeta"]),
                cost_center=rng.choice(["", "research", "sales"]),
                model_requested=rng.choice(["gpt-4.1", "gpt-4.1-mini", "claude"]),
                outcome=outcome,
                status=200 if billed else 429,
                input_tokens=rng.randrange(0, 5000) if billed else 0,
                output_tokens=rng.randrange(0, 900) if billed else 0,
                cached_tokens=rng.randrange(0, 100),
                cost_nanousd=rng.randrange(0, 10**9) if billed else 0,
                charged_nanousd=rng.randrange(0, 2 * 10**9) if billed else 0,
                queue_wait_s=rng.choice([0.0, 0.0, rng.random()]),
                # Few distinct values: ties decide nothing about which record is picked.
                latency_s=rng.choice([0.05, 0.1, 0.2, 0.4, rng.random() * 3]),
                ttft_s=rng.choice([0.01, 0.02, rng.random()]) if streamed else None,
                stream=streamed,
            )
        )
    return records


@pytest.fixture(params=["sqlite", "postgres"])
async def sql_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    backend: Ledger
    if request.param == "sqlite":
        backend = SqliteLedger(tmp_path / "ledger.db")
    else:
        url = request.getfixturevalue("postgres_url")
        schema = request.getfixturevalue("postgres_schema")
        backend = PostgresLedger(url, schema=schema)
    await backend.open()
    yield backend
    await backend.aclose()


async def test_sql_and_python_give_the_same_figures(sql_ledger: Ledger) -> None:
    records = mixed_records(3000)
    await sql_ledger.write(records)
    queries = [ReportQuery(period=p, by=by) for p in PERIODS for by in DIMENSIONS]
    queries += [
        ReportQuery(tenant="acme", since=START + 3 * 86_400, until=START + 9.5 * 86_400),
        ReportQuery(tenant="<script>x</script>", period="hour", by="model"),
        ReportQuery(since=START + 86_400, period="all", by="cost_center"),
        ReportQuery(tenant="nobody"),
    ]
    for query in queries:
        expected = tally_records(records, query)
        assert await sql_ledger.tally(query) == expected, query
    day = await sql_ledger.tally(ReportQuery(period="day"))
    # The figures are not trivially empty: percentiles and every counter were exercised;
    # shadow copies (a migration trial's) are the operator's cost, never in a report.
    shadows = sum(r.outcome == SHADOW for r in records)
    assert shadows > 0
    assert sum(t.requests for t in day) == len(records) - shadows
    assert all(t.latency_p99_s is not None for t in day if t.requests > 20)
    assert sum(t.breaker_rejections for t in day) > 0
    assert any(t.ttft_p50_s is not None for t in day)


def test_periods_start_on_whole_utc_seconds() -> None:
    nov = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
    assert bucket_start(nov - 1e-6, "month") == datetime(2026, 10, 1, tzinfo=UTC).timestamp()
    assert bucket_start(nov + 59.9, "minute") == nov
    assert bucket_start(nov + 3 * 3600 + 1, "hour") == nov + 3 * 3600
    assert bucket_start(nov + 5, "all") == 0
