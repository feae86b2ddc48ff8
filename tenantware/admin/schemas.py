"""The admin API's request and response bodies: msgspec structs, also the OpenAPI schemas.

Responses never carry a key hash; a key in plain appears once, in ``KeyIssued``.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType, field

from tenantware.alerts.model import Alert, AlertEvent
from tenantware.audit import AuditEntry
from tenantware.config import AlertRule, Limits, Priority, Tenant, Tier, Weight

__all__ = [
    "AdminKeyIssue",
    "AdminKeyIssued",
    "AdminKeyList",
    "AdminKeyOut",
    "AlertHistory",
    "AlertList",
    "AlertRuleList",
    "AuditList",
    "ErrorBody",
    "KeyIssue",
    "KeyIssued",
    "KeyList",
    "KeyOut",
    "KeyRotate",
    "TenantCreate",
    "TenantList",
    "TenantOut",
    "TenantPatch",
    "TierList",
    "TierOut",
    "WebhookCreate",
    "WebhookCreated",
    "WebhookDeleted",
    "WebhookList",
    "WebhookOut",
    "key_out",
    "tenant_out",
]

TenantId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
KeyId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
Seats = Annotated[int, Meta(ge=0)]


class TenantCreate(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A new tenant; keys are issued afterwards (``POST /admin/tenants/{id}/keys``)."""

    id: TenantId
    name: str = ""
    tier: str = "free"
    weight: Weight | None = None
    max_priority: Priority | None = None
    allowed_models: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    cost_center: str = ""
    domains: list[str] = field(default_factory=list)
    disabled: bool = False
    reserved_seats: Seats | None = None
    #: Price override in percent over list price (negative: a discount).
    markup_percent: Decimal | None = None


class TenantPatch(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Fields to change; absent ones stay. ``limits`` changes only the limits it names
    (``null`` removes an override, so the tier's value applies again)."""

    name: str | UnsetType = UNSET
    tier: str | UnsetType = UNSET
    weight: Weight | UnsetType | None = UNSET
    max_priority: Priority | UnsetType | None = UNSET
    allowed_models: list[str] | UnsetType = UNSET
    limits: dict[str, Any] | UnsetType = UNSET
    cost_center: str | UnsetType = UNSET
    domains: list[str] | UnsetType = UNSET
    disabled: bool | UnsetType = UNSET
    reserved_seats: Seats | UnsetType | None = UNSET


class KeyOut(Struct, frozen=True, kw_only=True):
    """A key as listed: its id and first characters, never the key or its hash."""

    object: Literal["api_key"] = "api_key"
    id: str
    tenant: str
    prefix: str
    revoked: bool
    expires_at: float | None
    created_at: float | None


class KeyIssued(Struct, frozen=True, kw_only=True):
    """A new key: ``key`` is shown here once and never again."""

    object: Literal["api_key"] = "api_key"
    id: str
    tenant: str
    prefix: str
    key: str
    expires_at: float | None
    created_at: float
    #: On rotation: the old key and when it stops working.
    rotated: KeyOut | None = None


class KeyIssue(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A key to issue: its id (generated when absent) and an optional expiry (Unix time)."""

    id: KeyId | None = None
    expires_at: Annotated[float, Meta(gt=0)] | None = None


class KeyRotate(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Rotation: a new key now, the old one valid ``grace_s`` longer (0: refused at once)."""

    grace_s: Annotated[float, Meta(ge=0, le=30 * 86_400)] = 3600.0


class AdminKeyIssue(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An admin key to issue: its id (generated when absent) and role."""

    id: KeyId | None = None
    role: Literal["admin", "read-only"] = "read-only"


class AdminKeyOut(Struct, frozen=True, kw_only=True):
    """An admin key as listed; ``source`` says where it is defined (only ``api`` keys can be
    revoked through the API; the others are the file's or the environment's)."""

    object: Literal["admin_key"] = "admin_key"
    id: str
    role: str
    prefix: str
    created_at: float | None
    source: Literal["api", "config"]


class AdminKeyIssued(Struct, frozen=True, kw_only=True):
    """A new admin key: ``key`` is shown here once and never again."""

    object: Literal["admin_key"] = "admin_key"
    id: str
    role: str
    prefix: str
    key: str
    created_at: float


class AdminKeyList(Struct, frozen=True, kw_only=True):
    object: Literal["list"] = "list"
    data: list[AdminKeyOut]


class TenantOut(Struct, frozen=True, kw_only=True):
    object: Literal["tenant"] = "tenant"
    id: str
    #: Registry version of the tenant's last change: send it back as ``If-Match``.
    version: int
    name: str
    tier: str
    weight: float | None
    max_priority: Priority | None
    allowed_models: list[str]
    #: The tenant's own limits (``null``: the tier's value applies).
    limits: Limits
    #: What applies: the tenant's limits over its tier's.
    effective_limits: Limits
    cost_center: str
    domains: list[str]
    disabled: bool
    reserved_seats: int | None
    markup_percent: Decimal | None
    keys: list[KeyOut]


class TenantList(Struct, frozen=True, kw_only=True):
    object: Literal["list"] = "list"
    data: list[TenantOut]
    first_id: str | None
    last_id: str | None
    has_more: bool


class KeyList(Struct, frozen=True, kw_only=True):
    object: Literal["list"] = "list"
    data: list[KeyOut]


class AuditList(Struct, frozen=True, kw_only=True):
    object: Literal["list"] = "list"
    data: list[AuditEntry]


class AlertHistory(Struct, frozen=True, kw_only=True):
    object: Literal["list"] = "list"
    data: list[AlertEvent]


class AlertRuleList(Struct, frozen=True, kw_only=True):
    """The rules in force: the configured ones, or the shipped defaults."""

    object: Literal["list"] = "list"
    data: list[AlertRule]


class AlertList(Struct, frozen=True, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Alert]


class WebhookCreate(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A tenant's own webhook: it receives that tenant's alerts only."""

    url: Annotated[str, Meta(min_length=1, max_length=2048)]
    format: Literal["json", "slack"] = "json"
    min_severity: Literal["info", "warning", "critical"] = "info"


class WebhookOut(Struct, frozen=True, kw_only=True):
    object: Literal["webhook"] = "webhook"
    id: str
    tenant: str
    url: str
    format: str
    min_severity: str
    created_at: float


class WebhookCreated(Struct, frozen=True, kw_only=True):
    """The new webhook with its signing secret: shown here once, never again."""

    object: Literal["webhook"] = "webhook"
    id: str
    tenant: str
    url: str
    format: str
    min_severity: str
    created_at: float
    secret: str


class WebhookList(Struct, frozen=True, kw_only=True):
    object: Literal["list"] = "list"
    data: list[WebhookOut]


class WebhookDeleted(Struct, frozen=True, kw_only=True):
    object: Literal["webhook"] = "webhook"
    id: str
    deleted: bool


class TierOut(Struct, frozen=True, kw_only=True):
    object: Literal["tier"] = "tier"
    id: str
    weight: float
    max_priority: Priority
    limits: Limits
    max_queue_wait_s: float


class TierList(Struct, frozen=True, kw_only=True):
    object: Literal["list"] = "list"
    data: list[TierOut]


class ErrorDetail(Struct, frozen=True, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(Struct, frozen=True, kw_only=True):
    """The OpenAI error shape every refusal uses."""

    error: ErrorDetail


def key_out(tenant_id: str, key: Any) -> KeyOut:
    return KeyOut(
        id=key.id,
        tenant=tenant_id,
        prefix=key.prefix,
        revoked=key.revoked,
        expires_at=key.expires_at,
        created_at=key.created_at,
    )


def tenant_out(tenant: Tenant, version: int, tiers: dict[str, Tier]) -> TenantOut:
    tier = tiers.get(tenant.tier)
    return TenantOut(
        id=tenant.id,
        version=version,
        name=tenant.name,
        tier=tenant.tier,
        weight=tenant.weight,
        max_priority=tenant.max_priority,
        allowed_models=list(tenant.allowed_models),
        limits=tenant.limits,
        effective_limits=tenant.limits if tier is None else tenant.limits.merged_over(tier.limits),
        cost_center=tenant.cost_center,
        domains=list(tenant.domains),
        disabled=tenant.disabled,
        reserved_seats=tenant.reserved_seats,
        markup_percent=tenant.markup_percent,
        keys=[key_out(tenant.id, key) for key in tenant.keys],
    )


def limits_patched(current: Limits, changes: dict[str, Any]) -> Limits:
    """``current`` with the named fields changed (``None``: back to the tier's value)."""
    merged = msgspec.to_builtins(current)
    merged.update(changes)
    return msgspec.convert(merged, Limits, strict=False)
