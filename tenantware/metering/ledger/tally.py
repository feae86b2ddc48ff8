"""Report figures per (tenant, period, group), computed where the records are.

The SQL ledgers answer a ``ReportQuery`` with one aggregate query (a month of a busy tenant
never travels to the gateway); ``tally_records`` is the same arithmetic in Python, for the
memory ledger and as the reference the SQL is tested against. Every figure is either an exact
integer sum or one picked record value (nearest-rank percentiles, a maximum), so the SQL and
Python answers are equal, not merely close.

Over a range of an hour or more (or open-ended), p50/p99 are reported to the latency bucket
(``histogram``: within 5 %) on every ledger, because PostgreSQL reads them from roll-ups
there; shorter ranges get the exact nearest-rank values.

Periods start on whole UTC seconds (``floor(ts)``), so a record is in the same bucket
whichever engine computes it (SQLite rounds to milliseconds, Python to microseconds).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Final, Literal

import msgspec

from tenantware.context import Outcome
from tenantware.metering.billing import NOT_BILLED, SHADOW
from tenantware.metering.ledger.histogram import bucketed
from tenantware.metering.ledger.record import UsageRecord

__all__ = [
    "BILLED_OUT",
    "BREAKER_REFUSED",
    "DIMENSIONS",
    "FAILED",
    "PERIODS",
    "PERIOD_SECONDS",
    "QUEUE_REFUSED",
    "RATE_LIMITED",
    "SHADOW",
    "Dimension",
    "Period",
    "ReportQuery",
    "Tally",
    "bucket_start",
    "coarse_percentiles",
    "coarsen",
    "nearest_rank",
    "tally_records",
]

Period = Literal["minute", "hour", "day", "month", "all"]
PERIODS: Final[tuple[Period, ...]] = ("minute", "hour", "day", "month", "all")
#: Fixed-width periods (``month`` follows the calendar, ``all`` is one bucket).
PERIOD_SECONDS: Final = {"minute": 60, "hour": 3600, "day": 86400}
#: ``tenant``: one row per tenant and period; ``model`` / ``cost_center``: one per value too.
Dimension = Literal["tenant", "model", "cost_center"]
DIMENSIONS: Final[tuple[Dimension, ...]] = ("tenant", "model", "cost_center")

FAILED: Final = (Outcome.UPSTREAM_ERROR, Outcome.UPSTREAM_TIMEOUT, Outcome.ERROR)
RATE_LIMITED: Final = (Outcome.REJECTED_QUOTA, Outcome.REJECTED_BUDGET)
QUEUE_REFUSED: Final = (Outcome.REJECTED_QUEUE,)
BREAKER_REFUSED: Final = (Outcome.BREAKER_OPEN,)
#: Refused by the gateway (``billing.NOT_BILLED``): fast, so left out of the latency figures.
BILLED_OUT: Final = tuple(sorted(NOT_BILLED))
#: ``SHADOW`` (a migration trial's copy of a request) is the operator's cost, never the
#: tenant's, so reports leave it out.


class ReportQuery(msgspec.Struct, frozen=True, kw_only=True):
    """Records of ``tenant`` (every tenant when ``None``) with ``since <= ts < until``."""

    tenant: str | None = None
    since: float = 0.0
    until: float | None = None
    period: Period = "day"
    by: Dimension = "tenant"


class Tally(msgspec.Struct, kw_only=True):
    """Raw figures of one (tenant, period, group); ``bucket`` is the period's start (Unix
    seconds; 0 for ``all``), ``group`` the model or cost center (``""`` by tenant)."""

    tenant: str
    bucket: int
    group: str = ""
    requests: int = 0
    errors: int = 0
    rate_limited: int = 0
    queue_rejections: int = 0
    breaker_rejections: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cost_nanousd: int = 0
    charged_nanousd: int = 0
    #: Over requests the gateway did not refuse.
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    #: Over streamed requests the gateway did not refuse.
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    queue_wait_max_s: float | None = None


#: A report over at least this many seconds gets its percentiles to the latency bucket.
COARSE_FROM_S: Final = 3600.0


def coarse_percentiles(query: ReportQuery) -> bool:
    """Whether ``query``'s p50/p99 are bucketed (see the module docstring)."""
    return query.until is None or query.until - query.since >= COARSE_FROM_S


def coarsen(rows: list[Tally], query: ReportQuery) -> list[Tally]:
    """``rows`` with their percentiles bucketed when ``query`` asks for coarse ones (the
    exact nearest-rank value's bucket is the bucket a histogram's nearest rank falls in)."""
    if coarse_percentiles(query):
        for row in rows:
            row.latency_p50_s = bucketed(row.latency_p50_s)
            row.latency_p99_s = bucketed(row.latency_p99_s)
            row.ttft_p50_s = bucketed(row.ttft_p50_s)
            row.ttft_p99_s = bucketed(row.ttft_p99_s)
    return rows


def bucket_start(ts: float, period: Period) -> int:
    """Start (Unix seconds, UTC) of the period holding ``ts``."""
    second = math.floor(ts)
    width = PERIOD_SECONDS.get(period)
    if width is not None:
        return second - second % width
    if period == "all":
        return 0
    moment = datetime.fromtimestamp(second, UTC)
    return int(moment.replace(day=1, hour=0, minute=0, second=0).timestamp())


def nearest_rank(count: int, q: float) -> int:
    """The 1-based rank of the ``q`` percentile among ``count`` sorted values (the rule
    PostgreSQL's ``percentile_disc`` follows, in the same float arithmetic)."""
    return max(1, math.ceil(q * count))


def _pick(values: list[float], q: float) -> float | None:
    return values[nearest_rank(len(values), q) - 1] if values else None


def tally_records(records: Iterable[UsageRecord], query: ReportQuery) -> list[Tally]:
    """The reference aggregation, exact (a ledger answers ``coarsen`` of it); rows sorted by
    tenant, bucket, group."""
    end = math.inf if query.until is None else query.until
    rows: dict[tuple[str, int, str], Tally] = {}
    latency: dict[tuple[str, int, str], list[float]] = {}
    ttft: dict[tuple[str, int, str], list[float]] = {}
    for r in records:
        if not query.since <= r.ts < end or (query.tenant is not None and r.tenant != query.tenant):
            continue
        if r.outcome == SHADOW:
            continue
        group = (
            r.model_requested
            if query.by == "model"
            else r.cost_center
            if query.by == "cost_center"
            else ""
        )
        key = (r.tenant, bucket_start(r.ts, query.period), group)
        row = rows.get(key)
        if row is None:
            row = rows[key] = Tally(tenant=key[0], bucket=key[1], group=group)
            latency[key] = []
            ttft[key] = []
        row.requests += 1
        row.input_tokens += r.input_tokens
        row.output_tokens += r.output_tokens
        row.cached_tokens += r.cached_tokens
        row.cost_nanousd += r.cost_nanousd
        row.charged_nanousd += r.charged_nanousd
        outcome = r.outcome
        if outcome in FAILED:
            row.errors += 1
        elif outcome in RATE_LIMITED:
            row.rate_limited += 1
        elif outcome in QUEUE_REFUSED:
            row.queue_rejections += 1
        elif outcome in BREAKER_REFUSED:
            row.breaker_rejections += 1
        if row.queue_wait_max_s is None or r.queue_wait_s > row.queue_wait_max_s:
            row.queue_wait_max_s = r.queue_wait_s
        if outcome not in NOT_BILLED:
            latency[key].append(r.latency_s)
            if r.ttft_s is not None:
                ttft[key].append(r.ttft_s)
    for key, row in rows.items():
        values = sorted(latency[key])
        row.latency_p50_s = _pick(values, 0.50)
        row.latency_p99_s = _pick(values, 0.99)
        values = sorted(ttft[key])
        row.ttft_p50_s = _pick(values, 0.50)
        row.ttft_p99_s = _pick(values, 0.99)
    return [rows[key] for key in sorted(rows)]


# -- SQL shared by the SQL ledgers ------------------------------------------------------------


def _in(outcomes: tuple[str, ...]) -> str:
    """``outcome IN ('a', 'b')`` (the outcome names are constants, never user input)."""
    return "outcome IN (" + ", ".join(f"'{name}'" for name in outcomes) + ")"


def _count_if(outcomes: tuple[str, ...]) -> str:
    return f"sum(CASE WHEN {_in(outcomes)} THEN 1 ELSE 0 END)"


#: The figures every SQL engine computes alike, in ``Tally`` order after the group columns.
SQL_SUMS: Final = ", ".join(
    (
        "count(*)",
        _count_if(FAILED),
        _count_if(RATE_LIMITED),
        _count_if(QUEUE_REFUSED),
        _count_if(BREAKER_REFUSED),
        "sum(input_tokens)",
        "sum(output_tokens)",
        "sum(cached_tokens)",
        "sum(cost_nanousd)",
        "sum(charged_nanousd)",
    )
)
#: Records a report counts (``WHERE`` them in).
SQL_REPORTED: Final = f"outcome <> '{SHADOW}'"
#: Records that count for the latency figures.
SQL_TIMED: Final = "NOT " + _in(BILLED_OUT)


def sql_rank(q: float, count: str) -> str:
    """``nearest_rank(count, q)`` in SQL (``ceil`` spelt with casts: SQLite may lack it)."""
    product = f"({q!r} * {count})"
    return f"max(1, CAST({product} AS INTEGER) + ({product} > CAST({product} AS INTEGER)))"


def sql_group(by: Dimension) -> str:
    return {"tenant": "''", "model": "model_requested", "cost_center": "cost_center"}[by]


def tally_from_row(row: tuple[Any, ...]) -> Tally:
    """A ``Tally`` from ``tenant, bucket, group, <SQL_SUMS>, queue wait max, latency p50,
    p99, ttft p50, p99`` (sums may come back as decimals: made integers here; a report by
    hour makes thousands of these, hence the plain indexing)."""
    return Tally(
        tenant=str(row[0]),
        bucket=int(row[1]),
        group=str(row[2]),
        requests=int(row[3] or 0),
        errors=int(row[4] or 0),
        rate_limited=int(row[5] or 0),
        queue_rejections=int(row[6] or 0),
        breaker_rejections=int(row[7] or 0),
        input_tokens=int(row[8] or 0),
        output_tokens=int(row[9] or 0),
        cached_tokens=int(row[10] or 0),
        cost_nanousd=int(row[11] or 0),
        charged_nanousd=int(row[12] or 0),
        queue_wait_max_s=_float(row[13]),
        latency_p50_s=_float(row[14]),
        latency_p99_s=_float(row[15]),
        ttft_p50_s=_float(row[16]),
        ttft_p99_s=_float(row[17]),
    )


def _float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def sorted_tallies(rows: Iterable[Tally]) -> list[Tally]:
    """In Python's string order (a database's collation may differ)."""
    return sorted(rows, key=lambda t: (t.tenant, t.bucket, t.group))
