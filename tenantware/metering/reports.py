"""Usage reports per tenant and period (hour, day, month) and CSV exports for chargeback.

Computed from the ledger's records in Python, so every ledger backend gives the same numbers.
Money is summed in integer nano-dollars and shown as exact decimals; the display currency is
the configured rate times the charged USD, rounded to 1e-6 only for display.
"""

from __future__ import annotations

import csv
import io
import math
import re
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Final, Literal

import msgspec

from tenantware.context import Outcome
from tenantware.metering.billing import NOT_BILLED, SHADOW
from tenantware.metering.ledger.base import Ledger
from tenantware.metering.ledger.record import COLUMNS, UsageRecord
from tenantware.metering.pricing import nanousd_to_usd

__all__ = [
    "Period",
    "ReportRow",
    "parse_time",
    "period_start",
    "records_csv",
    "report_csv",
    "summarize",
    "usage_report",
]

Period = Literal["hour", "day", "month"]
PERIODS: Final = ("hour", "day", "month")
_FAILED: Final = frozenset({Outcome.UPSTREAM_ERROR, Outcome.UPSTREAM_TIMEOUT, Outcome.ERROR})
_RATE_LIMITED: Final = frozenset({Outcome.REJECTED_QUOTA, Outcome.REJECTED_BUDGET})
_MICRO: Final = Decimal("0.000001")


class ReportRow(msgspec.Struct, kw_only=True):
    """One tenant over one period. Latency percentiles cover requests that were not
    rejected by the gateway (rejections are fast and would hide the real figures)."""

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


def period_start(ts: float, period: Period) -> datetime:
    """Start (UTC) of the hour, day or month holding ``ts``."""
    moment = datetime.fromtimestamp(ts, UTC)
    if period == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    if period == "day":
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted ``values``."""
    if not values:
        return None
    rank = max(1, math.ceil(q * len(values)))
    return values[rank - 1]


def summarize(
    records: Iterable[UsageRecord],
    *,
    period: Period = "day",
    currency: str = "USD",
    currency_per_usd: Decimal = Decimal(1),
) -> list[ReportRow]:
    """Rows per (tenant, period), sorted by tenant then period."""
    rows: dict[tuple[str, datetime], ReportRow] = {}
    latencies: dict[tuple[str, datetime], list[float]] = {}
    for r in records:
        if r.outcome == SHADOW:
            continue  # a migration trial's copy: the operator's cost, not the tenant's
        key = (r.tenant, period_start(r.ts, period))
        row = rows.get(key)
        if row is None:
            row = rows[key] = ReportRow(
                tenant=r.tenant, period=key[1].isoformat().replace("+00:00", "Z")
            )
            latencies[key] = []
        row.requests += 1
        row.input_tokens += r.input_tokens
        row.output_tokens += r.output_tokens
        row.cached_tokens += r.cached_tokens
        row.cost_nanousd += r.cost_nanousd
        row.charged_nanousd += r.charged_nanousd
        outcome = r.outcome
        if outcome in _FAILED:
            row.errors += 1
        elif outcome in _RATE_LIMITED:
            row.rate_limited += 1
        elif outcome == Outcome.REJECTED_QUEUE:
            row.queue_rejections += 1
        elif outcome == Outcome.BREAKER_OPEN:
            row.breaker_rejections += 1
        if outcome not in NOT_BILLED:
            latencies[key].append(r.latency_s)
    for key, row in rows.items():
        values = sorted(latencies[key])
        row.latency_p50_s = _percentile(values, 0.50)
        row.latency_p99_s = _percentile(values, 0.99)
        row.error_rate = row.errors / row.requests if row.requests else 0.0
        row.cost_usd = str(nanousd_to_usd(row.cost_nanousd).normalize())
        charged = nanousd_to_usd(row.charged_nanousd) * currency_per_usd
        row.charged = str(charged.quantize(_MICRO))
        row.currency = currency
    return [rows[key] for key in sorted(rows)]


async def usage_report(
    ledger: Ledger,
    *,
    tenant: str | None = None,
    since: float = 0.0,
    until: float | None = None,
    period: Period = "day",
    currency: str = "USD",
    currency_per_usd: Decimal = Decimal(1),
) -> list[ReportRow]:
    """The report of ``tenant`` (every tenant when ``None``) for ``since <= ts < until``."""
    records = await ledger.query(tenant=tenant, since=since, until=until)
    return summarize(records, period=period, currency=currency, currency_per_usd=currency_per_usd)


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
