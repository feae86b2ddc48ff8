"""The reports' SQL (SQLite, PostgreSQL) gives exactly the Python aggregation's figures on the
same records: every period, every grouping, a tenant filter and a time window; on PostgreSQL
also through the roll-ups (written in batches, retried, backfilled by the migration),
whose percentiles follow the same bucketed rule as the Python reference."""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import psycopg
import pytest
from psycopg import sql

from tenantware.context import Outcome
from tenantware.metering.ledger import Ledger, SqliteLedger, UsageRecord
from tenantware.metering.ledger.histogram import (
    BUCKETS,
    FLOOR_S,
    RATIO,
    RELATIVE_ERROR,
    bucket_index,
    bucketed,
    sql_bucket_index,
)
from tenantware.metering.ledger.postgres import _MIGRATIONS, _ROLL_UP, PostgresLedger
from tenantware.metering.ledger.rollup import DAILY_HISTOGRAMS, HOURLY, HOURLY_HISTOGRAMS
from tenantware.metering.ledger.tally import (
    DIMENSIONS,
    PERIODS,
    SHADOW,
    ReportQuery,
    bucket_start,
    coarse_percentiles,
    coarsen,
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


#: Where ``dense_records`` are: a short range with enough records for exact percentiles.
DENSE = START + 2 * 86_400 + 17.5


def dense_records() -> list[UsageRecord]:
    """300 records 10 s apart from ``DENSE``."""
    return [
        msgspec.structs.replace(r, ts=DENSE + 10 * i)
        for i, r in enumerate(mixed_records(300, seed=21))
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


#: Long ranges whose ends are not on whole hours (the roll-ups answer for the middle: whole
#: days from the daily histograms, the other whole hours from the hourly ones; the records
#: for the partial hours at the ends), by hour over weeks, a range of exactly an hour holding
#: no whole hour, short ranges (exact percentiles) and a record-free tenant.
EDGE_QUERIES = [
    ReportQuery(tenant="acme", since=START + 3 * 86_400 + 0.25, until=START + 9.5 * 86_400),
    ReportQuery(since=START + 3 * 3600 + 5, until=START + 10 * 86_400 + 1800.5, period="day"),
    ReportQuery(since=START + 86_400 + 1234.5, until=START + 33 * 86_400 + 77.7, period="month"),
    ReportQuery(tenant="beta", since=START + 7200.5, until=START + 20 * 86_400 - 60, period="hour"),
    ReportQuery(
        since=START + 5 * 86_400 - 1, until=START + 26 * 86_400 + 1, period="hour", by="cost_center"
    ),
    ReportQuery(since=START + 0.5, until=START + 7200.5, period="hour", by="model"),
    ReportQuery(tenant="<script>x</script>", period="hour", by="model"),
    ReportQuery(since=START + 86_400 + 1234.5, period="all", by="cost_center"),
    ReportQuery(since=START + 1800.5, until=START + 5400.5, period="month", by="model"),
    ReportQuery(since=START + 5 * 3600 + 10, until=START + 12 * 3600, period="day"),
    ReportQuery(since=START + 7 * 86_400 - 5, until=START + 7 * 86_400 + 3595, period="minute"),
    ReportQuery(since=DENSE, until=DENSE + 3599, period="minute", by="model"),
    ReportQuery(tenant="zeta", since=DENSE - 60, until=DENSE + 1800, by="cost_center"),
    ReportQuery(tenant="nobody"),
]


async def test_sql_and_python_give_the_same_figures(sql_ledger: Ledger) -> None:
    records = mixed_records(3000) + dense_records()
    # In batches, one of them twice (a retry after a lost acknowledgement): nothing counts
    # twice, in the records or in the roll-ups.
    for start in range(0, len(records), 700):
        await sql_ledger.write(records[start : start + 700])
    await sql_ledger.write(records[700:1400])
    queries = [ReportQuery(period=p, by=by) for p in PERIODS for by in DIMENSIONS]
    for query in queries + EDGE_QUERIES:
        expected = coarsen(tally_records(records, query), query)
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
    if isinstance(sql_ledger, PostgresLedger):
        url = sql_ledger.url
        assert rolled_up_requests(url, sql_ledger._schema) == len(records) - shadows


def rolled_up_requests(url: str, schema: str) -> int:
    """The requests the roll-ups hold (each record counted once per grouping)."""
    with psycopg.connect(url) as conn:
        found = conn.execute(
            sql.SQL("SELECT sum(requests) FROM {} WHERE dim = 'tenant'").format(
                sql.Identifier(schema, HOURLY)
            )
        ).fetchone()
    return int(found[0]) if found and found[0] is not None else 0


def test_periods_start_on_whole_utc_seconds() -> None:
    nov = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
    assert bucket_start(nov - 1e-6, "month") == datetime(2026, 10, 1, tzinfo=UTC).timestamp()
    assert bucket_start(nov + 59.9, "minute") == nov
    assert bucket_start(nov + 3 * 3600 + 1, "hour") == nov + 3 * 3600
    assert bucket_start(nov + 5, "all") == 0


def test_short_ranges_are_exact_and_long_ones_bucketed() -> None:
    # 400 records, one each 5 seconds: most of them in the first hour.
    records = [
        msgspec.structs.replace(r, ts=START + 5 * i) for i, r in enumerate(mixed_records(400))
    ]
    short = ReportQuery(since=START, until=START + 3599.9, period="minute")
    long = ReportQuery(since=START, until=START + 3600)
    assert not coarse_percentiles(short)
    assert coarse_percentiles(long)
    assert coarse_percentiles(ReportQuery(since=START))
    values = {t.latency_p99_s for t in coarsen(tally_records(records, short), short)} - {None}
    assert values
    assert not values <= {bucketed(v) for v in values}
    for tally in coarsen(tally_records(records, long), long):
        assert tally.latency_p50_s == bucketed(tally.latency_p50_s)


def test_a_bucketed_percentile_is_within_the_stated_error() -> None:
    assert RELATIVE_ERROR < 0.05
    rng = random.Random(7)
    samples = [FLOOR_S * RATIO**k for k in range(120)] + [
        rng.uniform(FLOOR_S, 600) for _ in range(5000)
    ]
    for seconds in samples:
        reported = bucketed(seconds)
        assert reported is not None
        assert abs(reported - seconds) <= RELATIVE_ERROR * seconds * (1 + 1e-12), seconds
        assert bucket_index(seconds) < BUCKETS
    assert bucketed(0.0) == bucketed(FLOOR_S / 3) == FLOOR_S / 2
    assert bucket_index(math.nan) == 0
    assert bucket_index(1e12) == BUCKETS - 1


def test_postgresql_and_python_put_a_value_in_the_same_bucket(postgres_url: str) -> None:
    rng = random.Random(11)
    # Bucket edges (where rounding could differ) and a spread of ordinary values.
    values = [FLOOR_S * RATIO**k for k in range(BUCKETS + 2)]
    values += [0.0, FLOOR_S / 2, FLOOR_S, 1e9] + [rng.uniform(0, 30) for _ in range(3000)]
    statement = f"SELECT {sql_bucket_index('v')} FROM unnest(%s::double precision[]) AS v"
    with psycopg.connect(postgres_url) as conn:
        found = [row[0] for row in conn.execute(statement, (values,)).fetchall()]
    assert found == [bucket_index(v) for v in values]


ROLL_UPS = (HOURLY, HOURLY_HISTOGRAMS, DAILY_HISTOGRAMS)


async def test_the_roll_up_migration_counts_the_records_already_stored(
    postgres_url: str, postgres_schema: str
) -> None:
    records = mixed_records(1500, seed=3) + dense_records()
    ledger = PostgresLedger(postgres_url, schema=postgres_schema)
    await ledger.write(records)
    await ledger.aclose()
    # As if the records had been stored before the roll-ups existed: both migrations that
    # add them run again (the first fills its tables from the records, the second its hourly
    # histograms from the records and its daily ones from the first's per-bucket rows).
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for table in ROLL_UPS:
            conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(postgres_schema, table)))
        versions = sql.Identifier(postgres_schema, "tenantware_schema")
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE version > %s").format(versions),
            (_MIGRATIONS.index(_ROLL_UP),),
        )
    ledger = PostgresLedger(postgres_url, schema=postgres_schema)
    try:
        await ledger.open()
        shadows = sum(r.outcome == SHADOW for r in records)
        assert rolled_up_requests(postgres_url, postgres_schema) == len(records) - shadows
        queries = [ReportQuery(period=p, by=by) for p in ("hour", "day") for by in DIMENSIONS]
        for query in queries + EDGE_QUERIES:
            assert await ledger.tally(query) == coarsen(tally_records(records, query), query), query
    finally:
        await ledger.aclose()
    with psycopg.connect(postgres_url) as conn:
        for table in ROLL_UPS:
            protected = conn.execute(
                "SELECT relrowsecurity FROM pg_class WHERE oid = %s::regclass",
                (sql.Identifier(postgres_schema, table).as_string(conn),),
            ).fetchone()
            assert protected == (True,), table
