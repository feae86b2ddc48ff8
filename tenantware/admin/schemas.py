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
from tenantware.config import (
    AlertRule,
    FlagName,
    Limits,
    Priority,
    Tenant,
    TenantData,
    TenantPolicy,
    Tier,
    Weight,
)
from tenantware.tenantdata import LogView

__all__ = [
    "MAX_CREDIT_USD",
    "AdminKeyIssue",
    "AdminKeyIssued",
    "AdminKeyList",
    "AdminKeyOut",
    "AlertHistory",
    "AlertList",
    "AlertRuleList",
    "AuditList",
    "BalanceCheckOut",
    "BalanceOut",
    "BalanceReconciled",
    "BalanceVerify",
    "CodesCreate",
    "CodesCreated",
    "CreditOut",
    "ErrorBody",
    "JournalList",
    "JournalOut",
    "KeyIssue",
    "KeyIssued",
    "KeyList",
    "KeyOut",
    "KeyRotate",
    "LogList",
    "PaymentAck",
    "PolicyOut",
    "PolicyPatch",
    "Redeem",
    "TenantCreate",
    "TenantList",
    "TenantOut",
    "TenantPatch",
    "TenantStorage",
    "TierList",
    "TierOut",
    "TopUp",
    "UpstreamKeyIn",
    "UpstreamKeyOut",
    "WebhookCreate",
    "WebhookCreated",
    "WebhookDeleted",
    "WebhookList",
    "WebhookOut",
    "key_out",
    "policy_out",
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
    #: Response cache and request log (off by default).
    data: TenantData = field(default_factory=TenantData)
    #: ``prepaid``: requests are paid from a balance topped up in advance.
    billing: Literal["postpaid", "prepaid"] = "postpaid"
    #: Below this prepaid balance (USD) the tenant is warned.
    low_balance_usd: Decimal | None = None


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
    #: Replaces the whole data policy (response cache, request log).
    data: TenantData | UnsetType = UNSET
    billing: Literal["postpaid", "prepaid"] | UnsetType = UNSET
    low_balance_usd: Decimal | UnsetType | None = UNSET


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
    billing: Literal["postpaid", "prepaid"]
    low_balance_usd: Decimal | None
    keys: list[KeyOut]
    data: TenantData


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


#: Largest single credit (USD): balances stay far below 2**53 nano-dollars, the range the
#: store's scripts compute exactly.
MAX_CREDIT_USD = Decimal(1_000_000)


class TopUp(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A top-up of a prepaid balance (``Idempotency-Key`` header required)."""

    amount_usd: Decimal
    note: Annotated[str, Meta(max_length=500)] = ""

    def __post_init__(self) -> None:
        _check_credit(self.amount_usd)


class CodesCreate(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``count`` single-use redemption codes worth ``amount_usd`` each."""

    count: Annotated[int, Meta(ge=1, le=1000)]
    amount_usd: Decimal
    #: Only this tenant may redeem them.
    tenant_id: TenantId | None = None
    expires_at: Annotated[float, Meta(gt=0)] | None = None

    def __post_init__(self) -> None:
        _check_credit(self.amount_usd)


class Redeem(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    code: Annotated[str, Meta(min_length=1, max_length=200)]


def _check_credit(amount: Decimal) -> None:
    if not amount.is_finite() or not Decimal(0) < amount <= MAX_CREDIT_USD:
        raise msgspec.ValidationError(
            f"`amount_usd` must be more than 0 and at most {MAX_CREDIT_USD}, got {amount}"
        )
    if amount != amount.quantize(Decimal("1e-9")):
        raise msgspec.ValidationError("`amount_usd` has more than 9 decimals (nano-dollars)")


class CreditOut(Struct, frozen=True, kw_only=True):
    """A credit as journaled (the same answer for every retry of it)."""

    object: Literal["balance.credit"] = "balance.credit"
    id: str
    tenant: str
    kind: str
    amount_nanousd: int
    amount_usd: Decimal
    created_at: float
    note: str


class BalanceOut(Struct, frozen=True, kw_only=True):
    object: Literal["balance"] = "balance"
    tenant: str
    billing: Literal["postpaid", "prepaid"]
    #: ``null``: never credited.
    balance_nanousd: int | None
    balance_usd: Decimal | None
    low_balance_usd: Decimal | None
    low: bool
    #: The balance in the display currency (``metering.currency``), rounded to 1e-6 as
    #: reports show charges.
    currency: str = "USD"
    balance_in_currency: Decimal | None = None


class JournalOut(Struct, frozen=True, kw_only=True):
    object: Literal["balance.entry"] = "balance.entry"
    id: str
    tenant: str
    at: float
    kind: str
    amount_nanousd: int
    actor: str
    note: str


class JournalList(Struct, frozen=True, kw_only=True):
    object: Literal["list"] = "list"
    data: list[JournalOut]


class CodesCreated(Struct, frozen=True, kw_only=True):
    """New codes: shown here once (only their hashes are stored)."""

    object: Literal["redemption_codes"] = "redemption_codes"
    batch_id: str
    amount_usd: Decimal
    tenant_id: str | None
    expires_at: float | None
    codes: list[str]


class BalanceCheckOut(Struct, frozen=True, kw_only=True):
    tenant: str
    journal_nanousd: int
    store_nanousd: int | None
    ok: bool


class BalanceVerify(Struct, frozen=True, kw_only=True):
    """Every balance against its journal's sum (exact when no request is in flight)."""

    object: Literal["balance.verify"] = "balance.verify"
    ok: bool
    data: list[BalanceCheckOut]


class BalanceReconciled(Struct, frozen=True, kw_only=True):
    """A balance set back to its journal's sum (``correction_nanousd`` 0: they agreed)."""

    object: Literal["balance.reconcile"] = "balance.reconcile"
    tenant: str
    journal_nanousd: int
    #: The store's balance before and after (``null``: it held none).
    before_nanousd: int | None
    after_nanousd: int | None
    #: Added to the store (negative: taken out).
    correction_nanousd: int
    ok: bool


class PaymentAck(Struct, frozen=True, kw_only=True):
    object: Literal["payment.event"] = "payment.event"
    provider: str
    #: ``false``: an event that is not a payment, acknowledged and ignored.
    credited: bool
    credit: CreditOut | None = None


class PolicyPatch(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Policy fields to change (absent ones stay); each replaces the field whole. A tenant
    key (where the admin allowed self-service) may not change ``allowed_upstreams`` nor
    ``self_service``."""

    aliases: dict[str, str] | UnsetType = UNSET
    allowed_upstreams: list[str] | UnsetType = UNSET
    fallbacks: dict[str, list[str]] | UnsetType = UNSET
    timeout_s: Annotated[float, Meta(gt=0, le=3600)] | UnsetType | None = UNSET
    flags: dict[FlagName, bool] | UnsetType = UNSET
    self_service: bool | UnsetType = UNSET


class UpstreamKeyIn(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The tenant's own key for an upstream (stored sealed; never shown again)."""

    key: Annotated[str, Meta(min_length=8, max_length=512, pattern=r"^[\x21-\x7e]+$")]


class UpstreamKeyOut(Struct, frozen=True, kw_only=True):
    """A registered own key: which upstream, its last characters; never the key."""

    object: Literal["upstream_key"] = "upstream_key"
    upstream: str
    hint: str
    created_at: float | None


class PolicyOut(Struct, frozen=True, kw_only=True):
    object: Literal["tenant.policy"] = "tenant.policy"
    tenant: str
    version: int
    aliases: dict[str, str]
    allowed_upstreams: list[str]
    fallbacks: dict[str, list[str]]
    timeout_s: float | None
    flags: dict[str, bool]
    #: What applies: the tier's flags with the tenant's over them.
    effective_flags: dict[str, bool]
    upstream_keys: list[UpstreamKeyOut]
    self_service: bool


def policy_out(tenant: Tenant, version: int, tiers: dict[str, Tier]) -> PolicyOut:
    policy: TenantPolicy = tenant.policy
    tier = tiers.get(tenant.tier)
    return PolicyOut(
        tenant=tenant.id,
        version=version,
        aliases=dict(policy.aliases),
        allowed_upstreams=list(policy.allowed_upstreams),
        fallbacks={model: list(chain) for model, chain in policy.fallbacks.items()},
        timeout_s=policy.timeout_s,
        flags=dict(policy.flags),
        effective_flags={**(tier.flags if tier else {}), **policy.flags},
        upstream_keys=[
            UpstreamKeyOut(upstream=k.upstream, hint=k.hint, created_at=k.created_at)
            for k in policy.upstream_keys
        ],
        self_service=policy.self_service,
    )


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
        billing=tenant.billing,
        low_balance_usd=tenant.low_balance_usd,
        keys=[key_out(tenant.id, key) for key in tenant.keys],
        data=tenant.data,
    )


def limits_patched(current: Limits, changes: dict[str, Any]) -> Limits:
    """``current`` with the named fields changed (``None``: back to the tier's value)."""
    merged = msgspec.to_builtins(current)
    merged.update(changes)
    return msgspec.convert(merged, Limits, strict=False)


class LogList(Struct, frozen=True, kw_only=True):
    """A tenant's request logs, decrypted, newest first."""

    object: Literal["list"] = "list"
    data: list[LogView]


class TenantStorage(Struct, frozen=True, kw_only=True):
    """Bytes a tenant's cached answers and request logs take, and its quotas."""

    object: Literal["tenant.storage"] = "tenant.storage"
    id: str
    cache_bytes: int
    log_bytes: int
    cache_quota_bytes: int
    log_quota_bytes: int
