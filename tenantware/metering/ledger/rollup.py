"""Hourly roll-ups of the PostgreSQL ledger, so a month's report reads thousands of rows.

Every batch the ledger stores also adds, in the same statement, to three tables: per tenant,
UTC hour and grouping (``dim``: the tenant as a whole, each model, each cost center), the
report's exact sums (``usage_hourly``) and how many latencies and times to first token fell
into each ``histogram`` bucket, per hour as one row of two sparse arrays (bucket numbers and
their counts: ``usage_hourly_latency``) and per day as one row per bucket
(``usage_daily_latency``). Only the records the batch really inserted count (``RETURNING``
of ``ON CONFLICT DO NOTHING``), so a retried batch is not counted twice. Rows are upserted
in key order, so two writers lock them in the same order.

A report reads the sums of its whole hours, the histograms of its whole days and of the whole
hours outside them, and only the partial hours at its ends from the records, bucketed alike.
The nearest-rank walk over the histograms is done here, in Python: the database returns one
row per (tenant, period, group, kind) with its counts, which is cheaper than ranking the
buckets with window functions (``benchmarks/README.md``, "Third pass").
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import accumulate
from typing import Any, Final

from tenantware.metering.ledger.histogram import BUCKETS, representative, sql_bucket_index
from tenantware.metering.ledger.tally import (
    SQL_REPORTED,
    SQL_SUMS,
    SQL_TIMED,
    ReportQuery,
    Tally,
    coarse_percentiles,
    nearest_rank,
    tally_from_row,
)

__all__ = [
    "BACKFILL",
    "BACKFILL_HOURLY_LATENCY",
    "CREATE_HOURLY_LATENCY",
    "CREATE_TABLES",
    "DAILY_LATENCY",
    "HOURLY",
    "HOURLY_LATENCY",
    "add_to_rollups",
    "combine",
    "statements",
    "whole_periods",
]

HOURLY: Final = "usage_hourly"
DAILY_LATENCY: Final = "usage_daily_latency"
HOURLY_LATENCY: Final = "usage_hourly_latency"
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
#: ``{hl}``: per hour and grouping, the latency and time-to-first-token histograms as sparse
#: arrays (bucket numbers ascending, their counts; ``NULL`` when the hour had none).
CREATE_HOURLY_LATENCY: Final = (
    "CREATE TABLE IF NOT EXISTS {hl} ("
    + _KEY.format("hour")
    + ", latency_buckets smallint[], latency_counts bigint[], "
    "ttft_buckets smallint[], ttft_counts bigint[], PRIMARY KEY (tenant, dim, hour, grp))"
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


def _merged(kind: str) -> str:
    """The stored and the new sparse histogram of ``kind`` added (an upsert's new value)."""
    return (
        "SELECT array_agg(b ORDER BY b), array_agg(n ORDER BY b) FROM ("
        "SELECT b, sum(n)::bigint AS n FROM unnest("
        f"l.{kind}_buckets || excluded.{kind}_buckets, l.{kind}_counts || excluded.{kind}_counts"
        ") AS u(b, n) GROUP BY b) AS m"
    )


def _add_hourly_latencies(source: str) -> str:
    arrays = ", ".join(
        f"array_agg(bucket ORDER BY bucket) FILTER (WHERE kind = {kind}), "
        f"array_agg(n ORDER BY bucket) FILTER (WHERE kind = {kind})"
        for kind in (0, 1)
    )
    return f"""
    INSERT INTO {{hl}} AS l (tenant, dim, hour, grp, latency_buckets, latency_counts,
                             ttft_buckets, ttft_counts)
    SELECT tenant, dim, hour, grp, {arrays}
    FROM (
        SELECT r.tenant, d.dim, {_HOUR_OF_TS} AS hour, d.grp, v.kind,
               ({sql_bucket_index("v.seconds")})::smallint AS bucket, count(*) AS n
        FROM {source} AS r {_DIMS} {_KINDS}
        WHERE {_TIMED}
        GROUP BY 1, 2, 3, 4, 5, 6
    ) AS c
    GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (tenant, dim, hour, grp) DO UPDATE SET
        (latency_buckets, latency_counts) = ({_merged("latency")}),
        (ttft_buckets, ttft_counts) = ({_merged("ttft")})
    """


def add_to_rollups(insert: str) -> str:
    """``insert`` (an ``INSERT ... ON CONFLICT DO NOTHING``) with what it inserted added to
    the roll-ups, as one statement."""
    return (
        f"WITH inserted AS ({insert} RETURNING *), "
        f"sums AS ({_add_sums('inserted')}), "
        f"hourly_latency AS ({_add_hourly_latencies('inserted')}) "
        f"{_add_latencies('inserted')}"
    )


#: The migration's statements: the records already stored (``{t}``), then fresh statistics
#: (the planner would otherwise take the filled tables for empty ones).
BACKFILL: Final = (_add_sums("{t}"), _add_latencies("{t}"), "ANALYZE {h}", "ANALYZE {l}")
#: The same for the hourly histograms (a later migration than the other two roll-ups).
BACKFILL_HOURLY_LATENCY: Final = (_add_hourly_latencies("{t}"), "ANALYZE {hl}")


def whole_periods(query: ReportQuery) -> dict[str, int] | None:
    """The whole hours ``[first, end)`` and, within them, the whole days ``[first_day,
    end_day)`` of the range the roll-ups answer for (no days by hour, or when the range holds
    none: ``first_day == end_day``), or ``None`` when the records must answer (a short range,
    a report by minute, no whole hour)."""
    if query.period == "minute" or not coarse_percentiles(query):
        return None
    since = math.ceil(query.since)
    until = _NO_END if query.until is None else math.floor(query.until)
    first, end = -(-since // HOUR) * HOUR, until // HOUR * HOUR
    if end <= first:
        return None
    first_day, end_day = -(-since // DAY) * DAY, until // DAY * DAY
    if query.period == "hour" or end_day <= first_day:
        first_day = end_day = first
    return {"first": first, "end": end, "first_day": first_day, "end_day": end_day}


def statements(
    bucket_of_hour: str, group: str, tenant: str, *, days: bool, by_hour: bool
) -> tuple[str, str]:
    """The sums and the histograms of a report (``%(...)s`` parameters: ``dim``, ``since``,
    ``until``, ``tenant`` and those of ``whole_periods``; ``days``: whether it has whole
    days; ``by_hour``: whether its periods are hours). Sums: one row per (tenant, period,
    group), from the roll-up rows of the whole hours plus the records of the partial ones
    (by hour, the rows as stored: no two of them share a period). Histograms: rows of
    (tenant, period, group, kind, bucket numbers, counts), from the daily rows of the whole
    days and the records of the partial hours (summed per bucket here), and from each whole
    hour outside the whole days as stored; ``combine`` adds the rows of one key."""
    rolled = "dim = %(dim)s AND hour >= %(first)s AND hour < %(end)s " + tenant
    edges = (
        "((r.ts >= %(since)s AND r.ts < %(first)s) OR (r.ts >= %(end)s AND r.ts < %(until)s)) "
        + tenant
    )
    parts = f"""
        SELECT tenant, hour, grp, {", ".join(_SUM_COLUMNS)}, queue_wait_max
        FROM {{h}} WHERE {rolled}
        UNION ALL
        SELECT r.tenant, {_HOUR_OF_TS}, {group}, {SQL_SUMS}, max(r.queue_wait_s)
        FROM {{t}} AS r WHERE {edges} AND {SQL_REPORTED} GROUP BY 1, 2, 3
    """
    sums = ", ".join(f"sum({name})" for name in _SUM_COLUMNS)
    totals = (
        parts
        if by_hour
        else f"""
    SELECT tenant COLLATE "C", {bucket_of_hour} AS bucket, grp COLLATE "C", {sums},
           max(queue_wait_max)
    FROM ({parts}) AS part
    GROUP BY 1, 2, 3
    """
    )
    whole_days = (
        "SELECT tenant, day AS hour, grp, kind, bucket AS b, n FROM {l} "
        "WHERE dim = %(dim)s AND day >= %(first_day)s AND day < %(end_day)s "
        + tenant
        + " UNION ALL"
        if days
        else ""
    )
    hours = (
        "dim = %(dim)s AND ((hour >= %(first)s AND hour < %(first_day)s) "
        "OR (hour >= %(end_day)s AND hour < %(end)s)) " + tenant
    )
    histograms = f"""
    SELECT tenant, bucket, grp, kind, array_agg(b ORDER BY b), array_agg(n ORDER BY b)
    FROM (
        SELECT tenant COLLATE "C" AS tenant, {bucket_of_hour} AS bucket, grp COLLATE "C" AS grp,
               kind, b, sum(n)::bigint AS n
        FROM (
            {whole_days}
            SELECT r.tenant, {_HOUR_OF_TS} AS hour, {group} AS grp, v.kind,
                   ({sql_bucket_index("v.seconds")})::smallint AS b, count(*) AS n
            FROM {{t}} AS r {_KINDS} WHERE {edges} AND {_TIMED} GROUP BY 1, 2, 3, 4, 5
        ) AS part
        GROUP BY 1, 2, 3, 4, 5
    ) AS counts
    GROUP BY 1, 2, 3, 4
    UNION ALL
    SELECT tenant, {bucket_of_hour}, grp, v.kind, v.buckets, v.counts
    FROM {{hl}} CROSS JOIN LATERAL (VALUES (0::smallint, latency_buckets, latency_counts),
        (1::smallint, ttft_buckets, ttft_counts)) AS v(kind, buckets, counts)
    WHERE {hours} AND v.buckets IS NOT NULL
    """
    return totals, histograms


Histogram = tuple[Sequence[int], Sequence[int]]
#: ``representative`` of every bucket, computed once.
_REPORTED: Final = tuple(representative(i) for i in range(BUCKETS))


def ranked_buckets(pieces: Sequence[Histogram]) -> tuple[int, int]:
    """The buckets the p50 and p99 nearest ranks fall in, over the sum of ``pieces`` (each
    bucket numbers ascending and their counts, at least one count)."""
    if len(pieces) == 1:
        buckets, counts = pieces[0]
    else:
        dense = [0] * BUCKETS
        for numbers, found in pieces:
            for number, n in zip(numbers, found, strict=True):
                dense[number] += n
        buckets, counts = range(BUCKETS), dense
    seen = list(accumulate(counts))
    total = seen[-1]
    return (
        buckets[bisect_left(seen, nearest_rank(total, 0.5))],
        buckets[bisect_left(seen, nearest_rank(total, 0.99))],
    )


def _percentiles(pieces: Sequence[Histogram] | None) -> tuple[float | None, float | None]:
    if pieces is None:
        return None, None
    p50, p99 = ranked_buckets(pieces)
    return _REPORTED[p50], _REPORTED[p99]


def combine(
    totals: Iterable[tuple[Any, ...]], histograms: Iterable[tuple[Any, ...]]
) -> list[Tally]:
    """Tallies from the rows of ``statements``: a percentile is reported as the
    representative of the bucket its nearest rank falls in."""
    found: dict[tuple[Any, ...], list[Histogram]] = {}
    for tenant, bucket, group, kind, buckets, counts in histograms:
        key = (tenant, bucket, group, kind)
        if (pieces := found.get(key)) is None:
            found[key] = [(buckets, counts)]
        else:
            pieces.append((buckets, counts))
    return [
        tally_from_row(
            (
                *row,
                *_percentiles(found.get((row[0], row[1], row[2], 0))),
                *_percentiles(found.get((row[0], row[1], row[2], 1))),
            )
        )
        for row in totals
    ]
