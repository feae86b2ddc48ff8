"""The bodies of the dashboard's JSON endpoints (also in the admin OpenAPI document)."""

from __future__ import annotations

from typing import Any, Literal

from msgspec import Struct

from tenantware.metering.ledger.writer import LedgerHealth
from tenantware.metering.reports import ReportRow
from tenantware.migration import ReportRow as TrialFigures

__all__ = [
    "CircuitStatus",
    "LiveView",
    "MigrationView",
    "PoolStatus",
    "StoreStatus",
    "TrialPoint",
    "TrialState",
    "TrialStatus",
    "UsageView",
]

Scope = Literal["tenant", "operator"]
TrialState = Literal["active", "rolled_back", "off", "removed"]


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


class TrialStatus(Struct, frozen=True, kw_only=True):
    """One candidate of one migration rule: its shares, its state and the comparison report's
    figures over the range (``figures``: ``GET /admin/migration/report``'s row)."""

    #: ``rule/upstream/model``, as the report names it.
    trial: str
    rule: str
    #: The model the rule applies to (null: a removed rule), and the upstream serving the
    #: rest (null: the usual deployments).
    model: str | None
    primary: str | None
    #: The candidate: its upstream and the catalogue model it serves.
    upstream: str
    candidate_model: str
    canary_percent: float
    shadow_percent: float
    #: ``active``; ``rolled_back`` (by this process, automatically); ``off`` (both shares 0:
    #: rolled back by hand or not started); ``removed`` (no longer in the rules, figures kept).
    state: TrialState
    figures: TrialFigures


class TrialPoint(Struct, frozen=True, kw_only=True):
    """One trial over one period of the series (periods without calls are absent)."""

    trial: str
    period: str
    shadow_requests: int
    canary_requests: int
    #: The candidate's failed calls (shadow and canary) and the primaries' on the shadowed
    #: requests.
    errors: int
    primary_errors: int
    #: Nearest-rank p99 of the candidate's calls (shadow and canary), and of the primary's on
    #: the shadowed requests (null: no such call in the period).
    latency_p99_s: float | None
    primary_latency_p99_s: float | None


class MigrationView(Struct, frozen=True, kw_only=True):
    """The shadow/canary comparison for a time range (operators only). Like the migration
    report it covers what the answering process compared (``process``), from
    ``oldest_kept`` on (docs/migration.md)."""

    object: Literal["dashboard.migration"] = "dashboard.migration"
    since: float
    until: float
    period: Literal["minute", "hour", "day"]
    bucket_s: int
    #: ``host:pid`` of the answering process; the time of its oldest comparison kept.
    process: str
    #: ``shared``: the trials' figures are the fleet's (the report shared through Redis); the
    #: series is always the answering process's.
    scope: Literal["shared", "process"] = "process"
    oldest_kept: float | None
    #: Every candidate of the rules in force, then those only the comparisons still name.
    trials: list[TrialStatus]
    series: list[TrialPoint]
