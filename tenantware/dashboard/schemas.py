"""The bodies of the dashboard's JSON endpoints (also in the admin OpenAPI document)."""

from __future__ import annotations

from typing import Any, Literal

from msgspec import Struct

from tenantware.metering.ledger.writer import LedgerHealth
from tenantware.metering.reports import ReportRow

__all__ = ["CircuitStatus", "LiveView", "PoolStatus", "StoreStatus", "UsageView"]

Scope = Literal["tenant", "operator"]


class UsageView(Struct, frozen=True, kw_only=True):
    """What the dashboard draws for a time range: the caller's own tenant (tenant key) or
    every tenant (admin or read-only key). Money in ``charged`` is in ``currency``."""

    object: Literal["dashboard.usage"] = "dashboard.usage"
    scope: Scope
    #: The tenant shown (a tenant key's own; an operator's ``tenant`` filter, else null).
    tenant: str | None
    since: float
    until: float
    #: The width of one point of ``series``.
    period: Literal["minute", "hour", "day"]
    bucket_s: int
    currency: str
    #: Charged over every row of ``totals``, in ``currency`` (rounded once, not per row).
    charged: str
    #: One row per tenant over the whole range.
    totals: list[ReportRow]
    #: One row per tenant and period (periods without requests are absent).
    series: list[ReportRow]
    #: Over the whole range, per tenant and model requested / cost center (``group``).
    by_model: list[ReportRow]
    by_cost_center: list[ReportRow]


class CircuitStatus(Struct, frozen=True, kw_only=True):
    """One upstream deployment (an upstream serving a model) and its circuit."""

    key: str
    upstream: str
    model: str
    state: Literal["closed", "half_open", "open"]
    #: Seconds until it takes calls again (open circuit, or cooling down after a 429).
    wait_s: float
    #: Calls in flight from this process.
    inflight: int


class PoolStatus(Struct, frozen=True, kw_only=True):
    """One admission pool: seats, seats taken, requests queued."""

    pool: str
    seats: int
    in_use: int
    waiting: int


class StoreStatus(Struct, frozen=True, kw_only=True):
    """The store of quotas, seats and circuits (``memory`` or ``redis``; never its URL)."""

    kind: Literal["memory", "redis"]
    shared: bool
    up: bool


class LiveView(Struct, frozen=True, kw_only=True):
    """The gateway's state now (operators only)."""

    object: Literal["dashboard.live"] = "dashboard.live"
    at: float
    breaker_enabled: bool
    circuits: list[CircuitStatus]
    admission_enabled: bool
    pools: list[PoolStatus]
    store: StoreStatus
    #: Null when metering is off.
    ledger: LedgerHealth | None
    registry: dict[str, Any]
