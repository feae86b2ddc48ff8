"""Usage reports per tenant and period (minute, hour, day, month, whole range) and CSV
exports for chargeback.

The ledger aggregates (``Ledger.tally``: SQL for SQLite and PostgreSQL, ``tally_records`` in
Python for the memory ledger); this module turns its figures into rows for people.
Money is summed in integer nano-dollars and shown as exact decimals; the display currency is
the configured rate times the charged USD, rounded to 1e-6 only for display.
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Final

import msgspec

from tenantware.metering.ledger.base import Ledger
from tenantware.metering.ledger.record import COLUMNS, UsageRecord
from tenantware.metering.ledger.tally import (
    DIMENSIONS,
    PERIODS,
    Dimension,
    Period,
    ReportQuery,
    Tally,
    bucket_start,
    tally_records,
)
from tenantware.metering.pricing import nanousd_to_usd

__all__ = [
    "DIMENSIONS",
    "PERIODS",
    "Dimension",
    "Period",
    "ReportRow",
    "display_amount",
    "parse_time",
    "period_label",
    "period_start",
    "records_csv",
    "report_csv",
    "report_rows",
    "summarize",
    "usage_report",
]

_MICRO: Final = Decimal("0.000001")


class ReportRow(msgspec.Struct, kw_only=True):
    """One tenant over one period (and one model or cost center when grouped by one).
    Latency percentiles cover requests that were not rejected by the gateway (rejections are
    fast and would hide the real figures)."""

    tenant: str
    period: str
    requests: int = 0
    errors: int = 0
    error_rate: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cost_nanousd: int = 0
    charged_nanousd: int = 0
    cost_usd: str = "0"
    charged: str = "0"
    currency: str = "USD"
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    rate_limited: int = 0
    queue_rejections: int = 0
    breaker_rejections: int = 0
    #: The model requested or the cost center, when the report is grouped by one.
    group: str = ""
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    queue_wait_max_s: float | None = None


def period_start(ts: float, period: Period) -> datetime:
    """Start (UTC) of the period holding ``ts`` (periods start on whole seconds)."""
    return datetime.fromtimestamp(bucket_start(ts, period), UTC)


def period_label(bucket: int, period: Period) -> str:
    """``2026-11-03T00:00:00Z``; ``all`` for the one period of a whole range."""
    if period == "all":
        return "all"
    return datetime.fromtimestamp(bucket, UTC).isoformat().replace("+00:00", "Z")


def display_amount(nanousd: int, currency_per_usd: Decimal = Decimal(1)) -> str:
    """``nanousd`` in the display currency, rounded to 1e-6 (for display only)."""
    return str((nanousd_to_usd(nanousd) * currency_per_usd).quantize(_MICRO))


def report_rows(
    tallies: Iterable[Tally],
    *,
    period: Period = "day",
    currency: str = "USD",
    currency_per_usd: Decimal = Decimal(1),
) -> list[ReportRow]:
    """Rows for people: money as exact decimals in the display currency, error rate."""
    rows = []
    for t in tallies:
        rows.append(
            ReportRow(
                tenant=t.tenant,
                period=period_label(t.bucket, period),
                group=t.group,
                requests=t.requests,
                errors=t.errors,
                error_rate=t.errors / t.requests if t.requests else 0.0,
                input_tokens=t.input_tokens,
                output_tokens=t.output_tokens,
                cached_tokens=t.cached_tokens,
                cost_nanousd=t.cost_nanousd,
                charged_nanousd=t.charged_nanousd,
                cost_usd=str(nanousd_to_usd(t.cost_nanousd).normalize()),
                charged=display_amount(t.charged_nanousd, currency_per_usd),
                currency=currency,
                latency_p50_s=t.latency_p50_s,
                latency_p99_s=t.latency_p99_s,
                rate_limited=t.rate_limited,
                queue_rejections=t.queue_rejections,
                breaker_rejections=t.breaker_rejections,
                ttft_p50_s=t.ttft_p50_s,
                ttft_p99_s=t.ttft_p99_s,
                queue_wait_max_s=t.queue_wait_max_s,
            )
        )
    return rows


def summarize(
    records: Iterable[UsageRecord],
    *,
    period: Period = "day",
    by: Dimension = "tenant",
    currency: str = "USD",
    currency_per_usd: Decimal = Decimal(1),
) -> list[ReportRow]:
    """Rows per (tenant, period), sorted by tenant then period, aggregated in Python."""
    tallies = tally_records(records, ReportQuery(period=period, by=by))
    return report_rows(tallies, period=period, currency=currency, currency_per_usd=currency_per_usd)


async def usage_report(
    ledger: Ledger,
    *,
    tenant: str | None = None,
    since: float = 0.0,
    until: float | None = None,
    period: Period = "day",
    by: Dimension = "tenant",
    currency: str = "USD",
    currency_per_usd: Decimal = Decimal(1),
) -> list[ReportRow]:
    """The report of ``tenant`` (every tenant when ``None``) for ``since <= ts < until``,
    aggregated by the ledger itself (SQL for the SQL ledgers)."""
    query = ReportQuery(tenant=tenant, since=since, until=until, period=period, by=by)
    tallies = await ledger.tally(query)
    return report_rows(tallies, period=period, currency=currency, currency_per_usd=currency_per_usd)


def report_csv(rows: Sequence[ReportRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    fields = ReportRow.__struct_fields__
    writer.writerow(fields)
    for row in rows:
        writer.writerow(["" if (v := getattr(row, f)) is None else v for f in fields])
    return out.getvalue()


def records_csv(records: Iterable[UsageRecord]) -> str:
    """Every record as one CSV row (the ledger's columns), for chargeback."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in records:
        writer.writerow(["" if (v := getattr(r, f)) is None else v for f in COLUMNS])
    return out.getvalue()


_RELATIVE: Final = re.compile(r"^(\d+)([smhd])$")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, *, now: float | None = None) -> float:
    """Unix time of ``2026-11-01``, ``2026-11-01T12:00:00Z``, a Unix timestamp, or a
    relative ``90m`` / ``24h`` / ``7d`` (that long ago). Naive datetimes are UTC."""
    text = text.strip()
    match = _RELATIVE.match(text)
    if match:
        current = time.time() if now is None else now
        return current - int(match.group(1)) * _UNIT_S[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"cannot read time {text!r}: use 2026-11-01, 2026-11-01T12:00Z, 24h or 7d"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
