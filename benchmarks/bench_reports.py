"""How long a usage report takes when PostgreSQL aggregates it (``PostgresLedger.tally``).

Fills a throwaway schema with a month of records (one busy tenant with 1,000,000 of them and
19 quieter ones; straight into the table, then into the roll-ups by ``rollup.FILL``), then
times the reports the dashboard asks for, each several times, and
prints a markdown table (median and worst wall time, and the server's CPU time). Also times
the same reports read from the records alone (exact percentiles, what ``tally`` did before the
roll-ups) and the Python aggregation of the busy tenant's records fetched whole.

    python benchmarks/bench_reports.py [--url postgresql://postgres@127.0.0.1:5432/test]
        [--records 1000000] [--repeat 5] [--keep] [--schema NAME] [--quick] [--only TEXT]

``--quick`` leaves out the slow comparisons (records only, Python); ``--only`` times the
reports whose name contains TEXT. The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg import sql

from tenantware.metering.ledger.postgres import (
    _REPORT_WORK_MEM,
    PostgresLedger,
    _arguments,
    _tally_statement,
)
from tenantware.metering.ledger.rollup import DAILY_HISTOGRAMS, FILL, HOURLY, HOURLY_HISTOGRAMS
from tenantware.metering.ledger.tally import ReportQuery, tally_records

#: The schema being measured (set once in main).
SCHEMA = [""]
MONTH_S = 30 * 86_400
END = 1_800_000_000.0
START = END - MONTH_S

RECORDS = """
INSERT INTO {t} (record_id, request_id, ts, tenant, cost_center, key_id, model_requested,
    model_served, upstream, status, outcome, input_tokens, output_tokens, cached_tokens,
    reasoning_tokens, cost_nanousd, charged_nanousd, queue_wait_s, upstream_latency_s,
    latency_s, ttft_s, stream, estimated, usage_invalid)
SELECT %(tenant)s || '-' || i, 'req-' || i, %(start)s + random() * %(span)s, %(tenant)s,
    (ARRAY['', 'research', 'sales', 'support'])[1 + i %% 4], 'k' || (i %% 3),
    (ARRAY['gpt-4.1', 'gpt-4.1-mini', 'claude'])[1 + i %% 3], 'gpt-4.1', 'fake',
    200, (ARRAY['ok','ok','ok','ok','ok','ok','ok','upstream_error','rejected_quota',
                'rejected_queue'])[1 + i %% 10],
    (random() * 4000)::bigint, (random() * 800)::bigint, 0, 0,
    (random() * 1e7)::bigint, (random() * 1.1e7)::bigint, random() * 0.05, NULL,
    0.05 + random() * 2, CASE WHEN i %% 2 = 0 THEN random() * 0.4 END, i %% 2 = 0, false,
    false
FROM generate_series(1, %(n)s) AS i
"""


def timed(work: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    times = []
    result = None
    for _ in range(repeat):
        began = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - began)
    return statistics.median(times), max(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="leave the schema in place")
    parser.add_argument("--schema", help="a schema a --keep run filled: time it again")
    parser.add_argument("--quick", action="store_true", help="no records-only / Python runs")
    parser.add_argument("--only", default="", help="only reports whose name contains this")
    args = parser.parse_args()
    schema = args.schema or f"bench_reports_{uuid.uuid4().hex[:8]}"
    ledger = PostgresLedger(args.url, schema=schema, timeout_s=120)
    anyio.run(ledger.open)
    table = sql.Identifier(schema, "usage_records")
    began = time.perf_counter()
    with psycopg.connect(args.url, autocommit=True) as conn:
        if not args.schema:
            fill_schema(conn, table, args.records)
        total = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
    print(f"{total[0] if total else 0:,} records ready in {time.perf_counter() - began:.1f} s\n")
    SCHEMA[0] = schema
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    report(ledger, args.repeat, args.url, quick=args.quick, only=args.only)
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    if not args.keep:
        with psycopg.connect(args.url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def fill_schema(conn: psycopg.Connection[Any], table: sql.Identifier, records: int) -> None:
    fill = sql.SQL(RECORDS).format(t=table)
    conn.execute(fill, {"tenant": "busy", "start": START, "span": MONTH_S, "n": records})
    for number in range(19):
        tenant = f"tenant-{number:02d}"
        conn.execute(fill, {"tenant": tenant, "start": START, "span": MONTH_S, "n": 10_000})
    schema = table.as_string(conn).split(".")[0].strip('"')
    for statement in FILL:
        conn.execute(
            sql.SQL(statement).format(
                t=table,
                h=sql.Identifier(schema, HOURLY),
                hh=sql.Identifier(schema, HOURLY_HISTOGRAMS),
                dh=sql.Identifier(schema, DAILY_HISTOGRAMS),
            )
        )
    for name in ("usage_records", HOURLY, HOURLY_HISTOGRAMS, DAILY_HISTOGRAMS):
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(schema, name)))


def backend_cpu_s(pid: int) -> float:
    """CPU seconds the server process ``pid`` has used (read from /proc: the server must run
    on this host). Unlike wall time, this hardly depends on what else the machine runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_process(url: str) -> str:
    """``url`` with parallel workers off, so one server process does all of a query."""
    return url + ("&" if "?" in url else "?") + "options=-c%20max_parallel_workers_per_gather%3D0"


def ledger_cpu_s(ledger: PostgresLedger, query: ReportQuery) -> float:
    """Server CPU of ``ledger.tally(query)`` (a ledger with one connection, no workers)."""
    pid = ledger._run(lambda conn: conn.execute("SELECT pg_backend_pid()").fetchone()[0])
    before = backend_cpu_s(pid)
    anyio.run(ledger.tally, query)
    return backend_cpu_s(pid) - before


def records_only_s(url: str, query: ReportQuery) -> tuple[float, float]:
    """Wall and server CPU seconds of the report read from the records alone (exact
    percentiles: the statement ``tally`` runs for short ranges, and ran for all before)."""
    statement = sql.SQL(_tally_statement(query)).format(
        t=sql.Identifier(SCHEMA[0], "usage_records"),
        tenant=sql.SQL("AND tenant = %(tenant)s" if query.tenant is not None else ""),
    )
    with psycopg.connect(one_process(url), autocommit=True) as conn:
        conn.execute(f"SET work_mem = '{_REPORT_WORK_MEM}'")
        conn.execute("SET jit = off")
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        before, began = backend_cpu_s(pid), time.perf_counter()
        conn.execute(statement, _arguments(query)).fetchall()
        return time.perf_counter() - began, backend_cpu_s(pid) - before


def dashboard_page(tenant: str | None, since: float, until: float) -> list[ReportQuery]:
    """The four reports the dashboard asks for one view (``dashboard/app.py``): the totals,
    the series (by hour up to 33 days), by model and by cost center."""
    period = "hour" if until - since <= 800 * 3600 else "day"
    return [
        ReportQuery(tenant=tenant, since=since, until=until, period="all"),
        ReportQuery(tenant=tenant, since=since, until=until, period=period),
        ReportQuery(tenant=tenant, since=since, until=until, period="all", by="model"),
        ReportQuery(tenant=tenant, since=since, until=until, period="all", by="cost_center"),
    ]


def report(ledger: PostgresLedger, repeat: int, url: str, *, quick: bool, only: str) -> None:
    busy_month = ReportQuery(tenant="busy", since=START, until=END, period="day")
    cases = [
        ("busy tenant, 30 days by day (the tenant view's series)", busy_month),
        (
            "busy tenant, 30 days by model",
            ReportQuery(tenant="busy", since=START, until=END, period="all", by="model"),
        ),
        (
            "busy tenant, 30 days by cost center, ends not on whole hours",
            ReportQuery(
                tenant="busy",
                since=START + 1234.5,
                until=END - 77.7,
                period="day",
                by="cost_center",
            ),
        ),
        (
            "every tenant, 30 days, one row each (the operator view)",
            ReportQuery(since=START, until=END, period="all"),
        ),
        ("every tenant, 30 days by day", ReportQuery(since=START, until=END, period="day")),
        (
            "every tenant, 30 days by day, ends not on whole hours",
            ReportQuery(since=START + 1234.5, until=END - 77.7, period="day"),
        ),
        (
            "busy tenant, 30 days by hour (the dashboard's 30-day series)",
            ReportQuery(tenant="busy", since=START + 1234.5, until=END - 77.7, period="hour"),
        ),
        (
            "every tenant, 30 days by hour (the operator view's 30-day series)",
            ReportQuery(since=START + 1234.5, until=END - 77.7, period="hour"),
        ),
        (
            "every tenant, 7 days by hour, by model",
            ReportQuery(since=END - 7 * 86_400 - 99.5, until=END - 99.5, period="hour", by="model"),
        ),
        (
            "busy tenant, last hour by minute",
            ReportQuery(tenant="busy", since=END - 3600, until=END, period="minute"),
        ),
        (
            "busy tenant, last 30 minutes by minute (exact)",
            ReportQuery(tenant="busy", since=END - 1800, until=END, period="minute"),
        ),
    ]
    pages = [
        (
            "busy tenant's dashboard, 30 days (its 4 reports, ends mid-hour)",
            dashboard_page("busy", START + 1234.5, END - 77.7),
        ),
        (
            "operator dashboard, 30 days (its 4 reports, ends mid-hour)",
            dashboard_page(None, START + 1234.5, END - 77.7),
        ),
        (
            "operator dashboard, custom 40 days (by day; 30 of them hold records)",
            dashboard_page(None, END - 40 * 86_400 + 0.5, END - 0.5),
        ),
    ]
    print("| report | records | median s | worst s | server CPU s | records only: s, CPU s |")
    print("|---|---:|---:|---:|---:|---:|")
    single = PostgresLedger(one_process(url), schema=SCHEMA[0], max_size=1, timeout_s=120)
    anyio.run(single.open)

    def all_of(queries: list[ReportQuery]) -> Any:
        return [anyio.run(ledger.tally, q) for q in queries]

    try:
        for name, queries in [(name, [query]) for name, query in cases] + pages:
            if only not in name:
                continue
            median, worst, results = timed(lambda q=queries: all_of(q), repeat)
            count = sum(t.requests for t in results[0])
            cpu = sum(min(ledger_cpu_s(single, q) for _ in range(2)) for q in queries)
            compared = "-"
            if not quick:
                raw = [records_only_s(url, q) for q in queries]
                compared = f"{sum(w for w, _ in raw):.2f}, {sum(c for _, c in raw):.2f}"
            print(f"| {name} | {count:,} | {median:.3f} | {worst:.3f} | {cpu:.2f} | {compared} |")
        if quick:
            return

        def python_report() -> Any:
            async def fetch() -> Any:
                return await ledger.query(tenant="busy", since=START, until=END)

            return tally_records(anyio.run(fetch), busy_month)

        median, worst, rows = timed(python_report, 1)
        count = sum(t.requests for t in rows)
        print(f"| before: every record to Python | {count:,} | {median:.3f} | - | - | - |")
    finally:
        anyio.run(ledger.aclose)
        anyio.run(single.aclose)


if __name__ == "__main__":
    main()
