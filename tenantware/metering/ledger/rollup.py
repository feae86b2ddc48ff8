"""Hourly roll-ups of the PostgreSQL ledger, so a month's report reads thousands of rows.

Every batch the ledger stores also adds, in the same statement, to three tables: per tenant,
UTC hour and grouping (``dim``: the tenant as a whole, each model, each cost center), the
report's exact sums (``usage_hourly``), and how many latencies and times to first token fell
into each ``histogram`` bucket, per hour (``usage_hourly_histograms``) and per day
(``usage_daily_histograms``), one row per period and grouping holding two sparse arrays per
kind (bucket numbers ascending, their counts). Only the records the batch really inserted
count (``RETURNING`` of ``ON CONFLICT DO NOTHING``), so a retried batch is not counted twice.
Rows are upserted in key order, so two writers lock them in the same order.

A report reads the sums of its whole hours, the histograms of its whole days and of the whole
hours outside them, and only the partial hours at its ends from the records, bucketed alike.
The nearest-rank walk over the histograms is done here, in Python, on one row per (tenant,
period, group, kind): cheaper than having the database rank (group, bucket) rows with
window functions (``benchmarks/README.md``, "Third pass").
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
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
    "CREATE_TABLES",
    "DAILY_HISTOGRAMS",
    "DAILY_LATENCY",
    "FILL",
    "HISTOGRAMS",
    "HOURLY",
    "HOURLY_HISTOGRAMS",
    "add_to_rollups",
    "combine",
    "statements",
    "whole_periods",
]

HOURLY: Final = "usage_hourly"
DAILY_LATENCY: Final = "usage_daily_latency"
HOURLY_HISTOGRAMS: Final = "usage_hourly_histograms"
DAILY_HISTOGRAMS: Final = "usage_daily_histograms"
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

#: ``{h}``, ``{l}``: the first two tables (``{l}``, one row per bucket, is replaced by
#: ``{dh}`` in a later migration). Sums are ``numeric``: an hour's total can never overflow.
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


#: The two kinds of histogram: latency (0) and time to first token (1).
_HISTOGRAM_KINDS: Final = ((0, "latency"), (1, "ttft"))
#: A histogram row's arrays (bucket numbers ascending, their counts; ``NULL`` when none).
_ARRAYS: Final = ", ".join(f"{name}_buckets, {name}_counts" for _, name in _HISTOGRAM_KINDS)
#: The arrays of each kind from rows of ``kind``, ``bucket``, ``n`` (a ``GROUP BY``'s).
_AGGREGATED: Final = ", ".join(
    f"array_agg(bucket ORDER BY bucket) FILTER (WHERE kind = {kind}), "
    f"array_agg(n ORDER BY bucket) FILTER (WHERE kind = {kind})"
    for kind, _ in _HISTOGRAM_KINDS
)


def _create_histograms(table: str, period: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {{{table}}} ("
        + _KEY.format(period)
        + ", latency_buckets smallint[], latency_counts bigint[], "
        f"ttft_buckets smallint[], ttft_counts bigint[], PRIMARY KEY (tenant, dim, {period}, grp))"
    )


def _merged(name: str) -> str:
    """The stored and the new sparse histogram added (an upsert's new value)."""
    return (
        "SELECT array_agg(b ORDER BY b), array_agg(n ORDER BY b) FROM ("
        "SELECT b, sum(n)::bigint AS n FROM unnest("
        f"l.{name}_buckets || excluded.{name}_buckets, l.{name}_counts || excluded.{name}_counts"
        ") AS u(b, n) GROUP BY b) AS m"
    )


def _counts(source: str) -> str:
    """How many latencies (times to first token) of the records of ``source`` fell into each
    bucket, per tenant, grouping and hour: ``tenant, dim, hour, grp, kind, bucket, n``."""
    return f"""
    SELECT r.tenant, d.dim, {_HOUR_OF_TS} AS hour, d.grp, v.kind,
           ({sql_bucket_index("v.seconds")})::smallint AS bucket, count(*) AS n
    FROM {source} AS r {_DIMS} {_KINDS}
    WHERE {_TIMED}
    GROUP BY 1, 2, 3, 4, 5, 6
    """


def _add_histograms(counts: str, table: str, period: str, width: int) -> str:
    """Upsert into ``{table}`` (keyed by ``period``, ``width`` seconds long) the histograms
    of ``counts`` (rows of ``_counts``)."""
    merged = ", ".join(
        f"({name}_buckets, {name}_counts) = ({_merged(name)})" for _, name in _HISTOGRAM_KINDS
    )
    return f"""
    INSERT INTO {{{table}}} AS l (tenant, dim, {period}, grp, {_ARRAYS})
    SELECT tenant, dim, start, grp, {_AGGREGATED}
    FROM (
        SELECT tenant, dim, hour / {width} * {width} AS start, grp, kind, bucket,
               sum(n)::bigint AS n
        FROM {counts} AS c GROUP BY 1, 2, 3, 4, 5, 6
    ) AS c
    GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (tenant, dim, {period}, grp) DO UPDATE SET {merged}
    """


def add_to_rollups(insert: str) -> str:
    """``insert`` (an ``INSERT ... ON CONFLICT DO NOTHING``) with what it inserted added to
    the roll-ups, as one statement (the records are bucketed once, for both histograms)."""
    return (
        f"WITH inserted AS ({insert} RETURNING *), "
        f"sums AS ({_add_sums('inserted')}), "
        f"counts AS ({_counts('inserted')}), "
        f"hourly AS ({_add_histograms('counts', 'hh', 'hour', HOUR)}) "
        f"{_add_histograms('counts', 'dh', 'day', DAY)}"
    )


#: The first roll-up migration's statements: the records already stored (``{t}``), then fresh
#: statistics (the planner would otherwise take the filled tables for empty ones).
BACKFILL: Final = (_add_sums("{t}"), _add_latencies("{t}"), "ANALYZE {h}", "ANALYZE {l}")
#: The second's: histograms as arrays, per hour from the records, per day from the rows of
#: ``{l}`` (the same counts, one row per bucket), which it replaces.
HISTOGRAMS: Final = (
    _create_histograms("hh", "hour"),
    # Reports across tenants read a few whole hours of every tenant (the ends of a range).
    "CREATE INDEX IF NOT EXISTS usage_hourly_histograms_dim_hour ON {hh} (dim, hour)",
    _create_histograms("dh", "day"),
    _add_histograms(f"({_counts('{t}')})", "hh", "hour", HOUR),
    f"INSERT INTO {{dh}} (tenant, dim, day, grp, {_ARRAYS}) "
    f"SELECT tenant, dim, day, grp, {_AGGREGATED} FROM {{l}} GROUP BY 1, 2, 3, 4",
    "DROP TABLE {l}",
    "ANALYZE {hh}",
    "ANALYZE {dh}",
)
#: Every roll-up of the current schema filled from the records ``{t}`` (into empty tables:
#: the benchmark fills its records directly, then these).
FILL: Final = (
    _add_sums("{t}"),
    _add_histograms(f"({_counts('{t}')})", "hh", "hour", HOUR),
    _add_histograms(f"({_counts('{t}')})", "dh", "day", DAY),
)


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


def _stored(table: str, period: str, bucket_of: str, where: str) -> str:
    """The histograms of ``{table}``'s rows ``where``, one row per kind."""
    return f"""
    SELECT tenant, {bucket_of}, grp, v.kind, v.buckets, v.counts
    FROM {{{table}}} CROSS JOIN LATERAL (VALUES (0::smallint, latency_buckets, latency_counts),
        (1::smallint, ttft_buckets, ttft_counts)) AS v(kind, buckets, counts)
    WHERE {where} AND v.buckets IS NOT NULL
    """


def statements(
    bucket_of: Callable[[str], str], group: str, tenant: str, *, days: bool, by_hour: bool
) -> tuple[str, str]:
    """The sums and the histograms of a report (``%(...)s`` parameters: ``dim``, ``since``,
    ``until``, ``tenant`` and those of ``whole_periods``; ``bucket_of(column)``: the start
    of the period holding the hour or day in ``column``; ``days``: whether the range has
    whole days; ``by_hour``: whether its periods are hours).

    Sums: one row per (tenant, period, group), from the roll-up rows of the whole hours plus
    the records of the partial ones (by hour, the rows as they are: no two share a period).
    Histograms: rows of (tenant, period, group, kind, bucket numbers, counts): those stored
    for each whole day and each whole hour outside them, and those of the records of the
    partial hours; ``combine`` adds the rows of one key."""
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
    SELECT tenant COLLATE "C", {bucket_of("hour")} AS bucket, grp COLLATE "C", {sums},
           max(queue_wait_max)
    FROM ({parts}) AS part
    GROUP BY 1, 2, 3
    """
    )
    hours = (
        "dim = %(dim)s AND ((hour >= %(first)s AND hour < %(first_day)s) "
        "OR (hour >= %(end_day)s AND hour < %(end)s)) " + tenant
    )
    whole_days = "dim = %(dim)s AND day >= %(first_day)s AND day < %(end_day)s " + tenant
    histograms = f"""
    SELECT tenant, bucket, grp, kind, array_agg(b ORDER BY b), array_agg(n ORDER BY b)
    FROM (
        SELECT r.tenant, {bucket_of(_HOUR_OF_TS)} AS bucket, {group} AS grp, v.kind,
               ({sql_bucket_index("v.seconds")})::smallint AS b, count(*) AS n
        FROM {{t}} AS r {_KINDS} WHERE {edges} AND {_TIMED} GROUP BY 1, 2, 3, 4, 5
    ) AS counts
    GROUP BY 1, 2, 3, 4
    UNION ALL {_stored("hh", "hour", bucket_of("hour"), hours)}
    """
    if days:
        histograms += f"UNION ALL {_stored('dh', 'day', bucket_of('day'), whole_days)}"
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


def _percentiles(pieces: Sequence[Histogram]) -> tuple[float | None, float | None]:
    if not pieces:
        return None, None
    p50, p99 = ranked_buckets(pieces)
    return _REPORTED[p50], _REPORTED[p99]


def combine(
    totals: Iterable[tuple[Any, ...]], histograms: Iterable[tuple[Any, ...]]
) -> list[Tally]:
    """Tallies from the rows of ``statements``: a percentile is reported as the
    representative of the bucket its nearest rank falls in."""
    # Per (tenant, period, group): the pieces of each kind (a report by hour has thousands).
    found: dict[tuple[Any, ...], tuple[list[Histogram], list[Histogram]]] = {}
    for tenant, bucket, group, kind, buckets, counts in histograms:
        if (kinds := found.get((tenant, bucket, group))) is None:
            kinds = found[tenant, bucket, group] = ([], [])
        kinds[kind].append((buckets, counts))
    nothing: tuple[list[Histogram], list[Histogram]] = ([], [])
    rows = []
    for row in totals:
        latency, ttft = found.get(row[:3], nothing)
        rows.append(tally_from_row((*row, *_percentiles(latency), *_percentiles(ttft))))
    return rows
