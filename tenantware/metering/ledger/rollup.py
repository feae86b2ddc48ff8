"""Hourly roll-ups of the PostgreSQL ledger, so a month's report reads thousands of rows.

Every batch the ledger stores also adds, in the same statement, to two tables: per tenant,
UTC hour and grouping (``dim``: the tenant as a whole, each model, each cost center), the
report's exact sums (``usage_hourly``), and how many latencies and times to first token fell
into each ``histogram`` bucket (``usage_daily_latency``). Only the records the batch really
inserted count (``RETURNING`` of ``ON CONFLICT DO NOTHING``), so a retried batch is not
counted twice. A report over whole hours reads these; the part of its range that is not a
whole hour is read from the records, bucketed alike. Rows are upserted in key order, so two
writers lock them in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Final

from tenantware.metering.ledger.histogram import representative, sql_bucket_index
from tenantware.metering.ledger.tally import (
    SQL_REPORTED,
    SQL_SUMS,
    SQL_TIMED,
    ReportQuery,
    Tally,
    coarse_percentiles,
    tally_from_row,
)

__all__ = [
    "BACKFILL",
    "CREATE_TABLES",
    "DAILY_LATENCY",
    "HOURLY",
    "add_to_rollups",
    "combine",
    "statements",
    "whole_periods",
]

HOURLY: Final = "usage_hourly"
DAILY_LATENCY: Final = "usage_daily_latency"
HOUR: Final = 3600
DAY: Final = 86_400
#: An hour after every real one (an open-ended range).
_NO_END: Final = 2**62

_SUM_COLUMNS: Final = (
    "requests",
    "errors",
    "rate_limited",
    "queue_rejections",
    "breaker_rejections",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "cost_nanousd",
    "charged_nanousd",
)
_KEY: Final = "tenant text NOT NULL, dim text NOT NULL, {} bigint NOT NULL, grp text NOT NULL"

#: ``{h}``, ``{l}``: the two tables. Sums are ``numeric``: an hour's total can never overflow.
CREATE_TABLES: Final = (
    "CREATE TABLE IF NOT EXISTS {h} ("
    + _KEY.format("hour")
    + ", "
    + ", ".join(f"{name} numeric NOT NULL" for name in _SUM_COLUMNS)
    + ", queue_wait_max double precision NOT NULL, PRIMARY KEY (tenant, dim, hour, grp))",
    "CREATE TABLE IF NOT EXISTS {l} ("
    + _KEY.format("day")
    + ", kind smallint NOT NULL, bucket smallint NOT NULL, n bigint NOT NULL, "
    "PRIMARY KEY (tenant, dim, day, grp, kind, bucket))",
)

_HOUR_OF_TS: Final = "floor(r.ts)::bigint / 3600 * 3600"
_DAY_OF_TS: Final = "floor(r.ts)::bigint / 86400 * 86400"
_DIMS: Final = (
    "CROSS JOIN LATERAL (VALUES ('tenant', ''), ('model', r.model_requested), "
    "('cost_center', r.cost_center)) AS d(dim, grp)"
)
#: Latency is kind 0, time to first token kind 1.
_KINDS: Final = (
    "CROSS JOIN LATERAL (VALUES (0::smallint, r.latency_s), (1::smallint, r.ttft_s)) "
    "AS v(kind, seconds)"
)
_TIMED: Final = f"{SQL_REPORTED} AND {SQL_TIMED} AND v.seconds IS NOT NULL"


def _add_sums(source: str) -> str:
    columns = ", ".join(_SUM_COLUMNS)
    updates = ", ".join(f"{name} = h.{name} + excluded.{name}" for name in _SUM_COLUMNS)
    return f"""
    INSERT INTO {{h}} AS h (tenant, dim, hour, grp, {columns}, queue_wait_max)
    SELECT r.tenant, d.dim, {_HOUR_OF_TS}, d.grp, {SQL_SUMS}, max(r.queue_wait_s)
    FROM {source} AS r {_DIMS}
    WHERE {SQL_REPORTED}
    GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (tenant, dim, hour, grp) DO UPDATE SET {updates},
        queue_wait_max = greatest(h.queue_wait_max, excluded.queue_wait_max)
    """


def _add_latencies(source: str) -> str:
    return f"""
    INSERT INTO {{l}} AS l (tenant, dim, day, grp, kind, bucket, n)
    SELECT r.tenant, d.dim, {_DAY_OF_TS}, d.grp, v.kind, {sql_bucket_index("v.seconds")},
           count(*)
    FROM {source} AS r {_DIMS} {_KINDS}
    WHERE {_TIMED}
    GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (tenant, dim, day, grp, kind, bucket) DO UPDATE SET n = l.n + excluded.n
    """


def add_to_rollups(insert: str) -> str:
    """``insert`` (an ``INSERT ... ON CONFLICT DO NOTHING``) with what it inserted added to
    the roll-ups, as one statement."""
    return (
        f"WITH inserted AS ({insert} RETURNING *), "
        f"sums AS ({_add_sums('inserted')}) {_add_latencies('inserted')}"
    )


#: The migration's statements: the records already stored (``{t}``), then fresh statistics
#: (the planner would otherwise take the filled tables for empty ones).
BACKFILL: Final = (_add_sums("{t}"), _add_latencies("{t}"), "ANALYZE {h}", "ANALYZE {l}")


def whole_periods(query: ReportQuery) -> dict[str, int] | None:
    """The whole hours ``[first, end)`` and whole days ``[first_day, end_day)`` of the range
    the roll-ups answer for, or ``None`` when the records must answer (a short range, a
    report by minute or hour, no whole hour)."""
    if query.period in ("minute", "hour") or not coarse_percentiles(query):
        return None
    since = math.ceil(query.since)
    until = _NO_END if query.until is None else math.floor(query.until)
    first, end = -(-since // HOUR) * HOUR, until // HOUR * HOUR
    if end <= first:
        return None
    first_day, end_day = -(-since // DAY) * DAY, until // DAY * DAY
    if end_day <= first_day:
        first_day = end_day = first
    return {"first": first, "end": end, "first_day": first_day, "end_day": end_day}


def _rank(q: float) -> str:
    return f"greatest(1, ceil({q!r}::double precision * total::double precision))"


def statements(bucket_of_hour: str, group: str, tenant: str) -> tuple[str, str]:
    """The sums and the histograms of a report, each per (tenant, period, group): roll-up
    rows of the whole hours (days) plus records of the rest of the range (``%(...)s``
    parameters: ``dim``, ``since``, ``until``, ``tenant`` and those of ``whole_periods``)."""
    rolled = "dim = %(dim)s AND hour >= %(first)s AND hour < %(end)s " + tenant
    edges = (
        "((r.ts >= %(since)s AND r.ts < %(first)s) OR (r.ts >= %(end)s AND r.ts < %(until)s)) "
        + tenant
    )
    days = "dim = %(dim)s AND day >= %(first_day)s AND day < %(end_day)s " + tenant
    day_edges = (
        "((r.ts >= %(since)s AND r.ts < %(first_day)s) "
        "OR (r.ts >= %(end_day)s AND r.ts < %(until)s)) " + tenant
    )
    sums = ", ".join(f"sum({name})" for name in _SUM_COLUMNS)
    totals = f"""
    SELECT tenant COLLATE "C", {bucket_of_hour} AS bucket, grp COLLATE "C", {sums},
           max(queue_wait_max)
    FROM (
        SELECT tenant, hour, grp, {", ".join(_SUM_COLUMNS)}, queue_wait_max
        FROM {{h}} WHERE {rolled}
        UNION ALL
        SELECT r.tenant, {_HOUR_OF_TS}, {group}, {SQL_SUMS}, max(r.queue_wait_s)
        FROM {{t}} AS r WHERE {edges} AND {SQL_REPORTED} GROUP BY 1, 2, 3
    ) AS part
    GROUP BY 1, 2, 3
    """
    # The histogram per (tenant, period, group, kind), then the buckets the nearest ranks
    # fall in (``nearest_rank`` in the same float arithmetic): one row per figure.
    histograms = f"""
    WITH counts AS (
        SELECT tenant COLLATE "C" AS tenant, {bucket_of_hour} AS bucket, grp COLLATE "C" AS grp,
               kind, bucket_index, sum(n) AS n
        FROM (
            SELECT tenant, day AS hour, grp, kind, bucket AS bucket_index, n
            FROM {{l}} WHERE {days}
            UNION ALL
            SELECT r.tenant, {_HOUR_OF_TS}, {group}, v.kind, {sql_bucket_index("v.seconds")},
                   count(*)
            FROM {{t}} AS r {_KINDS} WHERE {day_edges} AND {_TIMED} GROUP BY 1, 2, 3, 4, 5
        ) AS part
        GROUP BY 1, 2, 3, 4, 5
    ), ranked AS (
        SELECT *, sum(n) OVER (w ORDER BY bucket_index) AS seen, sum(n) OVER w AS total
        FROM counts WINDOW w AS (PARTITION BY tenant, bucket, grp, kind)
    )
    SELECT tenant, bucket, grp, kind,
           min(bucket_index) FILTER (WHERE seen >= {_rank(0.5)}),
           min(bucket_index) FILTER (WHERE seen >= {_rank(0.99)})
    FROM ranked GROUP BY 1, 2, 3, 4
    """
    return totals, histograms


def combine(
    totals: Iterable[tuple[Any, ...]], percentiles: Iterable[tuple[Any, ...]]
) -> list[Tally]:
    """Tallies from the rows of ``statements``: a percentile is reported as the
    representative of the bucket its nearest rank falls in."""
    found = {
        (str(tenant), int(bucket), str(group), int(kind)): (p50, p99)
        for tenant, bucket, group, kind, p50, p99 in percentiles
    }
    rows = []
    for row in totals:
        tally = tally_from_row((*row, None, None, None, None))
        key = (tally.tenant, tally.bucket, tally.group)
        if (latency := found.get((*key, 0))) is not None:
            tally.latency_p50_s, tally.latency_p99_s = (representative(i) for i in latency)
        if (ttft := found.get((*key, 1))) is not None:
            tally.ttft_p50_s, tally.ttft_p99_s = (representative(i) for i in ttft)
        rows.append(tally)
    return rows
