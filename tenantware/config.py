"""Typed configuration: every setting is a frozen msgspec Struct, validated once at load.

The file format (TOML, YAML or JSON) is picked by extension. Errors name the file and the
field path (``$.tenants[0].limits.requests_per_minute``) so an operator can fix them at once.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterable
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_TIERS",
    "AdminKey",
    "AdmissionSettings",
    "AlertDestination",
    "AlertRule",
    "AlertSettings",
    "ApiKey",
    "BreakerSettings",
    "CircuitSettings",
    "ConfigError",
    "DataSettings",
    "GatewayConfig",
    "GatewaySettings",
    "Limits",
    "MeteringSettings",
    "MigrationCandidate",
    "MigrationRule",
    "MigrationSettings",
    "ModelSpec",
    "PaymentWebhook",
    "QuotaSettings",
    "Tenant",
    "TenantData",
    "TenantPolicy",
    "Tier",
    "TracingSettings",
    "Upstream",
    "UpstreamKey",
    "expand_env",
    "expanded_url",
    "failure_policy",
    "load_config",
    "parse_config",
    "policy_problem",
]

NonNegInt = Annotated[int, Meta(ge=0)]
PositiveInt = Annotated[int, Meta(ge=1)]
PositiveFloat = Annotated[float, Meta(gt=0)]
Weight = Annotated[float, Meta(gt=0, le=1_000_000)]
#: Money is written as a decimal string or number ("2.50"); it is never held as a float.
Usd = Decimal
Priority = Literal["critical", "normal", "bulk"]
FailurePolicy = Literal["open", "closed", "local"]


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message says where and why."""


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value: str, setting: str) -> str:
    """``value`` with each ``${NAME}`` replaced by the environment variable ``NAME``.

    For the store and ledger URLs (``gateway.redis_url``, ``gateway.registry_url``,
    ``metering.ledger_url``): their passwords stay out of the file. Expanded when the URL is
    opened, so the secret is never part of the loaded configuration; a variable that is not
    set is a ``ConfigError`` naming the setting and the variable, never the value.
    """

    def lookup(match: re.Match[str]) -> str:
        name = match[1]
        found = os.environ.get(name)
        if found is None:
            raise ConfigError(f"{setting}: environment variable {name} is not set")
        return found

    return _ENV_REFERENCE.sub(lookup, value)


def expanded_url(url: str | None, setting: str) -> str | None:
    """A store or ledger URL setting as it is opened: ``${NAME}`` expanded (``expand_env``),
    ``None`` (or empty) when unset. Every path that opens a configured URL goes through here,
    the gateway and the command line alike."""
    return expand_env(url, setting) if url else None


def _check_money(obj: Struct) -> None:
    # msgspec cannot bound Decimals with Meta, so amounts are checked here.
    for name in obj.__struct_fields__:
        value = getattr(obj, name)
        if isinstance(value, Decimal) and (not value.is_finite() or value < 0):
            raise msgspec.ValidationError(f"`{name}` must be a non-negative amount, got {value}")


class Limits(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-tenant limits. ``None`` means "not limited" (or "inherit" when merged over a tier)."""

    requests_per_second: PositiveInt | None = None
    requests_per_minute: PositiveInt | None = None
    requests_per_hour: PositiveInt | None = None
    requests_per_day: PositiveInt | None = None
    tokens_per_second: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    tokens_per_hour: PositiveInt | None = None
    tokens_per_day: PositiveInt | None = None
    concurrent_requests: PositiveInt | None = None
    daily_budget_usd: Usd | None = None
    monthly_budget_usd: Usd | None = None
    #: How far above its steady rate a tenant may burst (GCRA burst = rate x this).
    burst_multiplier: Annotated[float, Meta(ge=1, le=100)] | None = None

    def __post_init__(self) -> None:
        _check_money(self)

    def merged_over(self, base: Limits) -> Limits:
        """These limits with every unset field taken from ``base`` (tier defaults)."""
        changes = {
            name: getattr(base, name)
            for name in self.__struct_fields__
            if getattr(self, name) is None and getattr(base, name) is not None
        }
        return msgspec.structs.replace(self, **changes) if changes else self


#: A feature flag's name (``beta_tools``, ``ui.dark``).
FlagName = Annotated[str, Meta(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")]


class Tier(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Defaults shared by every tenant of a tier; a tenant overrides any of them."""

    weight: Weight = 0.15
    max_priority: Priority = "normal"
    limits: Limits = field(default_factory=Limits)
    #: Longest time a request of this tier may wait in the fair queue.
    max_queue_wait_s: PositiveFloat = 300.0
    #: Feature flags of every tenant of the tier (a tenant's own flags override them).
    flags: dict[FlagName, bool] = field(default_factory=dict)


class UpstreamKey(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A tenant's own key for one upstream, sealed (AES-GCM, ``tenantware.backends.sealed``)
    with the gateway's secrets key: the key itself is never stored, returned or logged."""

    upstream: str
    sealed: Annotated[str, Meta(pattern=r"^v1:[A-Za-z0-9_=-]+$")]
    #: The key's last 4 characters, so the tenant can tell which key is registered.
    hint: Annotated[str, Meta(max_length=4)] = ""
    created_at: float | None = None


class TenantPolicy(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a tenant shapes its own traffic, within what the gateway offers.

    Every name refers to something that exists (checked by ``policy_problem``)."""

    #: The tenant's own model names: alias -> a model of the catalogue (or a global alias).
    aliases: dict[str, str] = field(default_factory=dict)
    #: Upstreams its requests may go to; empty: every upstream.
    allowed_upstreams: list[str] = field(default_factory=list)
    #: Fallback chain per model, replacing the gateway's (``breaker.fallbacks``) for it.
    fallbacks: dict[str, list[str]] = field(default_factory=dict)
    #: Upper bound of one upstream call of this tenant (below the upstream's own timeout).
    timeout_s: Annotated[float, Meta(gt=0, le=3600)] | None = None
    #: Feature flags (over its tier's), read by the app through the request context.
    flags: dict[FlagName, bool] = field(default_factory=dict)
    #: Its own upstream keys ("bring your own key"): its requests to that upstream use it.
    upstream_keys: list[UpstreamKey] = field(default_factory=list)
    #: The admin lets the tenant change this policy with its own key (all but this field and
    #: ``allowed_upstreams``).
    self_service: bool = False


class ApiKey(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One API key of a tenant, stored only as a hash: ``sha256:<hex>``, or
    ``hmac-sha256:<hex>`` when ``gateway.key_secret_env`` names a secret (``tenantware
    hash-key``)."""

    id: Annotated[str, Meta(min_length=1, max_length=64)]
    hash: Annotated[str, Meta(pattern=r"^(sha256|hmac-sha256):[0-9a-f]{64}$")]
    revoked: bool = False
    #: The first characters of the key (``tw-AbCd``), so an operator can tell keys apart
    #: without the key itself; set by the admin API when it issues a key.
    prefix: Annotated[str, Meta(max_length=16)] = ""
    #: Unix time after which the key no longer works (a rotated key's grace period).
    expires_at: float | None = None
    #: Unix time the key was issued (admin API), for listings.
    created_at: float | None = None


class TenantData(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the gateway may keep of a tenant's prompts and answers (``[tenants.data]``):
    nothing unless the tenant opts in. Whatever is kept is encrypted with the tenant's key."""

    #: Models whose answers are cached (``"*"``: every model); empty: no response cache.
    cache_models: list[str] = field(default_factory=list)
    #: How long a cached answer is served.
    cache_ttl_s: Annotated[float, Meta(gt=0, le=30 * 86_400)] = 3600.0
    #: Most bytes of cached answers kept for this tenant (its oldest entries make room).
    cache_quota_bytes: NonNegInt = 64 * 1024 * 1024
    #: Keep every request and its answer, encrypted, for ``log_retention_days``.
    log_requests: bool = False
    #: Days a logged request is kept before the retention job purges it.
    log_retention_days: Annotated[int, Meta(ge=1, le=3650)] = 30
    #: Most bytes of logged requests kept for this tenant (past it, new ones are not logged).
    log_quota_bytes: NonNegInt = 256 * 1024 * 1024
    #: Data-residency flag: the region its prompts must stay in (a label such as ``eu``).
    #: Such a tenant is never canaried nor shadowed to a migration candidate unless the rule
    #: lists the label in ``allow_residency``.
    residency: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None


class Tenant(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A customer of the gateway: who it is, what it may use and how much."""

    id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    name: str = ""
    tier: str = "free"
    weight: Weight | None = None
    max_priority: Priority | None = None
    #: Canonical model names (or "*"); empty means every model of the catalogue.
    allowed_models: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    cost_center: str = ""
    #: Custom domains: when set, this tenant's keys work only on these hosts.
    domains: list[str] = field(default_factory=list)
    keys: list[ApiKey] = field(default_factory=list)
    disabled: bool = False
    #: Guaranteed admission seats (over ``admission.tenant_reserved_seats``).
    reserved_seats: NonNegInt | None = None
    #: Price override: markup (positive) or discount (negative) in percent over list price
    #: (over ``metering.markup_percent``).
    markup_percent: Decimal | None = None
    #: Response cache and request log of this tenant (off by default).
    data: TenantData = field(default_factory=TenantData)
    #: ``postpaid`` (budgets per day/month) or ``prepaid``: each request is paid from a
    #: balance topped up in advance (``tenantware.balances``), refused at zero.
    billing: Literal["postpaid", "prepaid"] = "postpaid"
    #: A prepaid balance below this warns (metric, response header, one log line).
    low_balance_usd: Usd | None = None
    #: Its routing, feature flags and own upstream keys (changed through the admin API).
    policy: TenantPolicy = field(default_factory=TenantPolicy)

    def __post_init__(self) -> None:
        _check_money(self)
        percent = self.markup_percent
        if percent is not None and (not percent.is_finite() or not -100 <= percent <= 10_000):
            raise msgspec.ValidationError(
                f"`markup_percent` must be between -100 and 10000, got {percent}"
            )


class AdminKey(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A key of the admin API (not a tenant key): ``admin`` may do everything, ``read-only``
    reads tenants, reports and metrics."""

    id: Annotated[str, Meta(min_length=1, max_length=64)]
    hash: Annotated[str, Meta(pattern=r"^(sha256|hmac-sha256):[0-9a-f]{64}$")]
    role: Literal["admin", "read-only"] = "admin"
    #: First characters of the key (set when issued through the admin API).
    prefix: Annotated[str, Meta(max_length=16)] = ""
    created_at: float | None = None


class ModelSpec(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A model of the catalogue and its price in USD per million tokens."""

    input_per_mtok: Usd = Decimal(0)
    output_per_mtok: Usd = Decimal(0)
    cached_input_per_mtok: Usd | None = None
    #: Price of prompt tokens written to the cache (Anthropic's cache creation); default: the
    #: input price.
    cache_write_per_mtok: Usd | None = None
    fee_per_request: Usd = Decimal(0)
    #: Name the upstream knows the model by, when it differs from the catalogue name.
    upstream_name: str | None = None

    def __post_init__(self) -> None:
        _check_money(self)
        for name in (
            "input_per_mtok",
            "output_per_mtok",
            "cached_input_per_mtok",
            "cache_write_per_mtok",
        ):
            value = getattr(self, name)
            if value is not None and (value * 1000) % 1:
                raise msgspec.ValidationError(
                    f"`{name}` = {value}: prices per million tokens have at most 3 decimals "
                    "(tenantware bills in whole nano-dollars per token)"
                )


class Upstream(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An upstream provider (or relay) and the models it serves."""

    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    base_url: Annotated[str, Meta(pattern=r"^https?://")]
    #: The key is read from this environment variable; it is never written in a config file.
    api_key_env: str | None = None
    #: The whole of one call, a long generation included (a non-streaming call's headers
    #: come with its whole answer, so this is also how long it may take to start).
    timeout_s: PositiveFloat = 600.0
    connect_timeout_s: PositiveFloat = 5.0
    #: A stream's response headers must arrive within this (providers send them at once, long
    #: before the first token): a hanging upstream fails in seconds, not in ``timeout_s``.
    first_byte_timeout_s: PositiveFloat = 10.0
    #: Longest wait for a body's next bytes (a stream's first event and each one after).
    idle_timeout_s: PositiveFloat = 120.0
    models: list[str] = field(default_factory=list)
    weight: Weight = 1.0
    #: Extra headers sent upstream (e.g. an organisation id); not for secrets.
    headers: dict[str, str] = field(default_factory=dict)
    #: Largest answer relayed: a bigger one is cut with a 502 (a stream, with an error
    #: event), never held whole in memory.
    max_response_bytes: PositiveInt = 64 * 1024 * 1024
    #: The API it speaks: ``openai`` (chat completions, ``Authorization: Bearer``) or
    #: ``anthropic`` (Messages, ``x-api-key`` and ``anthropic-version``). A request in the
    #: other format is translated on the way (``tenantware.formats``).
    api: Literal["openai", "anthropic"] = "openai"
    #: An ``openai`` upstream that also serves the Responses API (``/responses``): Responses
    #: requests are relayed to it as they are instead of translated to chat completions.
    responses: bool = False

    def api_key(self) -> str | None:
        """The upstream key from the environment, or ``None`` when not configured."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None


LimitKind = Literal["requests", "tokens", "concurrency", "budget"]


class QuotaSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of the quota layer (``[quota]``); see the quota middleware."""

    enabled: bool = True
    #: Limits every tenant gets per model, on top of its own (``[quota.model_limits."gpt-4.1"]``).
    model_limits: dict[str, Limits] = field(default_factory=dict)
    #: Per tenant per model overrides: ``[quota.tenant_model_limits.acme."gpt-4.1"]``.
    tenant_model_limits: dict[str, dict[str, Limits]] = field(default_factory=dict)
    #: Aggregate limits over all tenants (the upstream account's own limits).
    global_limits: Limits = field(default_factory=Limits)
    #: Failure policy per kind of limit when the store is unreachable; unset kinds use
    #: ``gateway.on_store_failure``, else ``DEFAULT_FAILURE_POLICIES``.
    on_store_failure: dict[LimitKind, FailurePolicy] = field(default_factory=dict)
    #: A concurrency slot is a lease this long, renewed every third of it while its request
    #: runs: the slot of a crashed replica, or of a request whose settle never reached the
    #: store, frees itself after one lease.
    lease_s: Annotated[float, Meta(ge=1)] = 30.0
    #: Probe interval during an outage, over ``gateway.store_probe_interval_s`` (kept for
    #: configurations written before that setting).
    retry_store_after_s: Annotated[float, Meta(ge=0)] | None = None


#: What each kind of limit does while the shared store is unreachable, unless configured:
#: a budget refuses (this process cannot know what the others spent), the others keep
#: this process's share (``gateway.replicas``). Nothing that costs money or capacity is left
#: unchecked.
DEFAULT_FAILURE_POLICIES: dict[LimitKind, FailurePolicy] = {
    "requests": "local",
    "tokens": "local",
    "concurrency": "local",
    "budget": "closed",
}


def failure_policy(config: GatewayConfig, kind: LimitKind | Literal["admission"]) -> FailurePolicy:
    """What stands in for the shared store for ``kind`` while it is unreachable: the kind's
    own ``quota.on_store_failure``, else ``gateway.on_store_failure``, else the default (for
    admission: ``local``, each process keeps its share of the seats). The one rule the quota
    plans, the admission store and ``/readyz`` all read."""
    default = config.gateway.on_store_failure
    if kind == "admission":
        return default or "local"
    return config.quota.on_store_failure.get(kind) or default or DEFAULT_FAILURE_POLICIES[kind]


# -- end of quota settings ------------------------------------------------------------------


class AdmissionSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of the fair-share admission layer (``[admission]``).

    Capacity is counted in upstream "seats" (concurrent upstream requests). With neither
    ``seats`` nor ``upstream_seats`` set the layer is mounted but admits everything at once.
    """

    enabled: bool = True
    #: ``fair``: per-tenant queues and virtual token counters; ``fifo``: one shared queue in
    #: arrival order (the baseline the fairness benchmark compares against).
    scheduler: Literal["fair", "fifo"] = "fair"
    #: Seats of the global pool (every model whose upstream has no pool of its own).
    seats: PositiveInt | None = None
    #: Seats per upstream name: requests routed to that upstream queue for its own pool.
    upstream_seats: dict[str, PositiveInt] = field(default_factory=dict)
    #: Optional token rate of a pool (input + output tokens per second, estimated at dispatch
    #: and corrected at completion): a dispatch needs both a free seat and a positive bucket.
    tokens_per_second: PositiveInt | None = None
    upstream_tokens_per_second: dict[str, PositiveInt] = field(default_factory=dict)
    #: Bucket depth of the token rate, in seconds of rate.
    rate_burst_s: Annotated[float, Meta(gt=0, le=600)] = 1.0
    #: Cost of one output token relative to one input token in the fair-share counters.
    output_weight: Annotated[float, Meta(ge=0, le=1000)] = 2.0
    #: Priority of a request without ``x-request-priority`` (capped at the tenant's maximum).
    default_priority: Priority = "normal"
    #: Share of dispatches each band gets while backlogged (bands are not strict).
    band_shares: dict[Priority, PositiveFloat] = field(
        default_factory=lambda: {"critical": 16.0, "normal": 4.0, "bulk": 1.0}
    )
    #: Most requests one tenant may have waiting (per pool); past it: 429.
    max_queue_per_tenant: PositiveInt = 256
    #: Most seats one tenant may hold at once (per pool); ``None``: no cap.
    max_seats_per_tenant: PositiveInt | None = None
    #: Per-tier seat caps, over ``max_seats_per_tenant``.
    tier_max_seats: dict[str, PositiveInt] = field(default_factory=dict)
    #: Guaranteed seats per tier and per tenant id (tenant wins): the tenant's request starts
    #: at once up to this many; while unused they are lent only to short requests.
    tier_reserved_seats: dict[str, NonNegInt] = field(default_factory=dict)
    tenant_reserved_seats: dict[str, NonNegInt] = field(default_factory=dict)
    #: Seats of each pool that a tenant holding its seat share (or alone in the pool) may not
    #: take with a long request: kept for tenants below their share (``fair`` only).
    headroom_seats: NonNegInt = 2
    #: Requests expected to hold their seat at most this long (from ``max_tokens`` and the
    #: pool's observed speed) may borrow the headroom and unused reserved seats; 0: none.
    short_request_s: Annotated[float, Meta(ge=0, le=600)] = 0.0
    #: Redis: a seat lease expires this long after its last renewal (a dead process's seats
    #: come back after at most this long); renewed every third of it while held.
    lease_s: Annotated[float, Meta(ge=1, le=3600)] = 30.0
    #: Redis: waiting processes poll for their grant with backoff between these bounds.
    poll_min_s: Annotated[float, Meta(gt=0, le=1)] = 0.002
    poll_max_s: Annotated[float, Meta(gt=0, le=5)] = 0.25


# -- end of admission settings --------------------------------------------------------------


Percent = Annotated[float, Meta(gt=0, le=100)]


class CircuitSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """When one circuit opens and how it recovers (defaults: Envoy outlier detection and
    resilience4j; see docs/circuits.md)."""

    #: Consecutive failures that open the circuit (Envoy ``consecutive_5xx``: 5).
    consecutive_failures: PositiveInt = 5
    #: Failure rate over the window that opens it (resilience4j ``failureRateThreshold``).
    failure_rate_percent: Percent = 50.0
    #: Slow-call rate over the window that opens it (resilience4j: 100, i.e. all calls slow).
    slow_call_rate_percent: Percent = 100.0
    #: A call whose response headers take longer than this is slow (resilience4j: 60 s).
    slow_call_s: PositiveFloat = 60.0
    #: Length of the sliding window the rates are computed over (Envoy ``interval``: 10 s).
    window_s: PositiveFloat = 10.0
    #: Calls in the window before the rates are judged (resilience4j ``minimumNumberOfCalls``).
    minimum_calls: PositiveInt = 20
    #: First open period; doubles with each re-opening (Envoy ``base_ejection_time``: 30 s).
    open_wait_s: PositiveFloat = 30.0
    #: Cap of the open period (Envoy ``max_ejection_time``: 300 s).
    max_open_wait_s: PositiveFloat = 300.0
    #: Probe requests let through when half-open; all must succeed to close.
    half_open_probes: PositiveInt = 3


def _tenant_circuit() -> CircuitSettings:
    # A tenant is paused only when it keeps failing: a looping client bug, not one bad request.
    return CircuitSettings(
        consecutive_failures=20,
        failure_rate_percent=90.0,
        minimum_calls=50,
        window_s=60.0,
        open_wait_s=10.0,
        max_open_wait_s=300.0,
        half_open_probes=1,
    )


class BreakerSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of circuit breaking, retries and fallbacks (``[breaker]``)."""

    enabled: bool = True
    #: Circuit of each upstream deployment (upstream + model).
    deployment: CircuitSettings = field(default_factory=CircuitSettings)
    #: Circuit of each tenant: its own 4xx (not 429) answers count as failures.
    tenant: CircuitSettings = field(default_factory=_tenant_circuit)
    #: Cool-down of a deployment that answered 429 without ``retry-after``.
    default_cooldown_s: PositiveFloat = 1.0
    #: Longest cool-down honoured from an upstream ``retry-after``.
    max_cooldown_s: PositiveFloat = 60.0
    #: Upstream calls per request at most (first try included).
    max_attempts: PositiveInt = 3
    #: Full-jitter backoff: sleep uniform(0, min(max, base * 2**retry)) before re-trying a
    #: deployment this request already tried (moving to another one does not wait).
    retry_base_s: PositiveFloat = 0.1
    retry_max_backoff_s: PositiveFloat = 2.0
    #: No retry starts (and no backoff sleeps) past this time after the first attempt.
    retry_deadline_s: PositiveFloat = 20.0
    #: How one deployment of a model is chosen among those that are not open or cooling.
    strategy: Literal["weighted", "least_busy"] = "weighted"
    #: Fallback chains: model -> models tried in order when every deployment of it is out.
    fallbacks: dict[str, list[str]] = field(default_factory=dict)
    #: With Redis: how stale the local copy of a circuit may be before it is re-read.
    sync_interval_s: PositiveFloat = 0.5
    #: The tenant layer's own refusals of a tenant's requests (malformed body, unknown or
    #: disallowed model, body too large) count as failures of its circuit, like its other 4xx.
    count_tenant_refusals: bool = True


# -- end of breaker settings ----------------------------------------------------------------

#: A share of traffic in percent, 0 (off: the rollback) to 100.
Share = Annotated[float, Meta(ge=0, le=100)]


class MigrationCandidate(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An upstream (and model) on trial: a sticky canary share served by it for real, and/or
    a shadow share copied to it whose answers are only measured."""

    upstream: str
    #: The catalogue model it serves in the trial (priced as such); default: the rule's.
    model: str | None = None
    canary_percent: Share = 0.0
    shadow_percent: Share = 0.0


class MigrationRule(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Traffic of one model (optionally only some tenants or tiers) split between a primary
    and candidates (``[[migration.rules]]``)."""

    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    model: str
    #: Only these tenants / tiers (empty: everyone).
    tenants: list[str] = field(default_factory=list)
    tiers: list[str] = field(default_factory=list)
    #: Tenants never canaried nor shadowed by this rule (their data stays where it goes now).
    exclude_tenants: list[str] = field(default_factory=list)
    #: Data-residency labels (``tenants.data.residency``) whose tenants this rule may canary
    #: and shadow (its candidates keep data in those regions); a tenant with another label is
    #: left out of it, as if excluded.
    allow_residency: list[str] = field(default_factory=list)
    #: The upstream that serves the rest (default: the model's usual deployments).
    primary: str | None = None
    candidates: list[MigrationCandidate] = field(default_factory=list)
    #: Automatic rollback when, over the breaker's deployment window, a candidate's error rate
    #: exceeds the primary's by this many percentage points (None: never on errors) ...
    rollback_error_margin_percent: Share | None = 10.0
    #: ... or its p99 latency exceeds the primary's by this percentage (None: never on latency).
    rollback_p99_margin_percent: Annotated[float, Meta(ge=0)] | None = None
    #: Calls both need in the window before they are compared.
    rollback_minimum_calls: PositiveInt = 20

    def __post_init__(self) -> None:
        canary = sum(c.canary_percent for c in self.candidates)
        if canary > 100:
            raise msgspec.ValidationError(
                f"`migration.rules` {self.name!r}: the canary shares add up to {canary:g} %"
            )


class MigrationSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Canary splits and shadow traffic (``[migration]``)."""

    rules: list[MigrationRule] = field(default_factory=list)
    #: A shadow call's whole time limit (its answer read to the end included).
    shadow_timeout_s: PositiveFloat = 30.0
    #: Shadow calls in flight per candidate at most; more are dropped (and counted).
    shadow_concurrency: PositiveInt = 8
    #: Request header of the client's session: the canary's sticky key (else the tenant).
    session_header: str = "x-session-id"
    #: Tenants never shadowed by any rule (data-residency or contract reasons).
    no_shadow_tenants: list[str] = field(default_factory=list)
    #: Shadow comparisons kept for the report (the oldest go first).
    report_size: PositiveInt = 100_000


class MeteringSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of metering, the ledger, metrics and logs (``[metering]``)."""

    enabled: bool = True
    #: Where usage records go: ``sqlite:///path.db`` (default), ``postgresql://...`` or
    #: ``memory://`` (tests). Replaces ``gateway.ledger_url``, which is still read when this
    #: is unset. ``${NAME}`` is expanded from the environment (a PostgreSQL password).
    ledger_url: str | None = None
    #: How often the writer flushes; a hard kill loses at most about this much.
    flush_interval_s: Annotated[float, Meta(gt=0, le=60)] = 0.1
    #: Records per ledger write.
    batch_size: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    #: Records kept in memory while the ledger is unreachable before they spill to a file.
    max_buffered: Annotated[int, Meta(ge=1)] = 50_000
    #: Spill file (JSON lines) for records the ledger could not take; next to the SQLite
    #: file, or ``tenantware-ledger.spill.jsonl`` in the working directory, when unset.
    spill_path: str | None = None
    #: When set, every record is also published to this Redis Stream (``gateway.redis_url``).
    redis_stream: str | None = None
    redis_stream_maxlen: PositiveInt = 1_000_000
    #: Hash (like an API key's) of the admin key for ``/admin/*`` and ``/metrics``.
    admin_key_hash: Annotated[str, Meta(pattern=r"^(sha256|hmac-sha256):[0-9a-f]{64}$")] | None = (
        None
    )
    #: ``/metrics`` requires the admin key (it shows every tenant's usage).
    metrics_require_admin: bool = True
    #: Per-tenant markup (positive) or discount (negative) in percent over list price.
    markup_percent: dict[str, Decimal] = field(default_factory=dict)
    #: Currency reports show charges in, and its units per USD.
    currency: Annotated[str, Meta(pattern=r"^[A-Z]{3}$")] = "USD"
    currency_per_usd: Usd = Decimal(1)
    #: Header a client may set to book a request to another cost center.
    cost_center_header: str = "x-cost-center"
    #: One structlog ``request`` event per request (written by the ledger writer).
    request_log: bool = True
    #: Output tokens a request that set no ``max_tokens`` may be billed for: an upstream
    #: reporting more is clamped and the record marked ``usage_invalid``.
    max_output_tokens: Annotated[int, Meta(ge=1, le=1_000_000_000)] = 1_000_000

    def __post_init__(self) -> None:
        _check_money(self)
        for tenant, percent in self.markup_percent.items():
            if not percent.is_finite() or not -100 <= percent <= 10_000:
                raise msgspec.ValidationError(
                    f"`markup_percent.{tenant}` must be between -100 and 10000, got {percent}"
                )


# -- end of metering settings ---------------------------------------------------------------


class DataSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where tenant data keys come from and where cached answers live (``[data]``)."""

    #: Environment variable holding the master key(s): ``base64`` (version 1) or
    #: ``1:base64,2:base64`` (the highest version encrypts, the others still decrypt).
    master_key_env: str = "TENANTWARE_MASTER_KEY"
    #: A file with one ``version:base64`` line per master key (instead of the variable).
    master_key_file: str | None = None
    #: Response cache backend: ``memory://`` or a Redis URL; unset: ``gateway.redis_url``
    #: when set, else memory.
    cache_url: str | None = None
    #: Largest answer (bytes as sent to the client) that is cached.
    max_cached_bytes: PositiveInt = 1024 * 1024
    #: How often the retention job purges expired request logs.
    retention_interval_s: PositiveFloat = 3600.0


class PaymentWebhook(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A payment provider's webhook at ``/admin/payments/{name}`` (``tenantware.balances``).

    ``hmac-test`` is the built-in test protocol (HMAC-SHA256 signed events); the secret is
    read from the environment variable ``secret_env``, never from the file."""

    kind: Literal["hmac-test"] = "hmac-test"
    secret_env: Annotated[str, Meta(min_length=1)]
    #: Events older than this are refused (a captured event replayed later).
    tolerance_s: PositiveFloat = 300.0


AlertKind = Literal[
    "error_rate",
    "latency",
    "queue_wait",
    "spend",
    "balance",
    "circuit_open",
    "ledger_spilling",
    "store_failover",
]
AlertScope = Literal["global", "tenant", "tier", "model", "upstream"]
AlertSeverity = Literal["info", "warning", "critical"]
#: What a ``latency`` rule measures: the whole request, the gateway's own share of it
#: (total minus the upstream's answer time), or the time to the first streamed byte.
LatencyMetric = Literal["latency", "added_latency", "ttft"]
_ALERT_ID = r"^[A-Za-z0-9_.-]{1,64}$"
#: Kinds judged from the usage records of a window (the others read gateway state).
WINDOW_KINDS: frozenset[str] = frozenset({"error_rate", "latency", "queue_wait"})


class AlertRule(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One alert condition. ``threshold`` is read per kind: ``error_rate`` a fraction of the
    window's requests (0.01 = 1 %); ``latency`` and ``queue_wait`` seconds (the ``percentile``
    of the window is over it); ``spend`` a share of the budget (0.8 = 80 %); ``balance`` a
    prepaid balance in USD it fell under (0: each tenant's own ``low_balance_usd``);
    ``circuit_open``, ``ledger_spilling`` and ``store_failover`` seconds the state has lasted.
    """

    id: Annotated[str, Meta(pattern=_ALERT_ID)]
    kind: AlertKind
    #: What one alert is about: each tenant, tier, model or upstream on its own (or only
    #: those in ``match``), or the gateway as a whole.
    scope: AlertScope = "global"
    match: list[str] = field(default_factory=list)
    threshold: Annotated[float, Meta(ge=0)] = 0.0
    #: Length of the sliding window of the record-based kinds.
    window_s: Annotated[float, Meta(gt=0, le=86_400)] = 300.0
    percentile: Annotated[float, Meta(gt=0, lt=100)] = 95.0
    metric: LatencyMetric = "latency"
    budget: Literal["daily", "monthly"] = "daily"
    #: Requests a window needs before its rate or percentile is judged.
    min_requests: PositiveInt = 20
    severity: AlertSeverity = "warning"
    enabled: bool = True
    #: Shown in the message; a default one is written from the rule when empty.
    summary: Annotated[str, Meta(max_length=500)] = ""

    def __post_init__(self) -> None:
        if self.kind == "error_rate" and self.threshold > 1:
            raise msgspec.ValidationError(
                f"alert rule {self.id!r}: an error_rate threshold is a fraction (0.01 = 1 %)"
            )
        if self.kind == "spend" and self.scope not in ("tenant", "global"):
            raise msgspec.ValidationError(
                f"alert rule {self.id!r}: spend is judged per tenant (scope tenant or global)"
            )
        if self.kind == "balance" and self.scope not in ("tenant", "global"):
            raise msgspec.ValidationError(
                f"alert rule {self.id!r}: balance is judged per prepaid tenant (scope tenant "
                "or global)"
            )
        if self.kind == "circuit_open" and self.scope not in ("upstream", "tenant", "global"):
            raise msgspec.ValidationError(
                f"alert rule {self.id!r}: circuit_open is per upstream or tenant circuit"
            )
        if self.kind in ("ledger_spilling", "store_failover") and self.scope != "global":
            raise msgspec.ValidationError(f"alert rule {self.id!r}: {self.kind} is global")


class AlertDestination(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A webhook alerts are sent to. ``tenant`` set: a tenant's own webhook, which receives
    only that tenant's alerts; unset: an operator's, which receives every alert."""

    id: Annotated[str, Meta(pattern=_ALERT_ID)]
    url: Annotated[str, Meta(pattern=r"^https?://")]
    #: Environment variable holding the HMAC-SHA256 signing secret (never in the file).
    secret_env: str | None = None
    tenant: str | None = None
    #: ``json``: the versioned payload; ``slack``: a Slack incoming-webhook message.
    format: Literal["json", "slack"] = "json"
    #: Deliveries per minute at most (a token bucket; the queue absorbs a burst).
    max_per_minute: PositiveInt = 30
    timeout_s: Annotated[float, Meta(gt=0, le=60)] = 5.0
    #: Least severity sent here.
    min_severity: AlertSeverity = "info"

    def secret(self) -> bytes | None:
        """The signing secret from the environment (``None`` when not configured)."""
        value = os.environ.get(self.secret_env) if self.secret_env else None
        return value.encode() if value else None


class AlertSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Alerts (``[alerts]``): nothing is evaluated until a destination is configured."""

    enabled: bool = True
    destinations: list[AlertDestination] = field(default_factory=list)
    #: The rules; unset: ``DEFAULT_ALERT_RULES`` (``tenantware.alerts``).
    rules: list[AlertRule] | None = None
    #: How often the rules are judged (and each replica reports its counters).
    evaluate_every_s: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    #: Resolution of the windows: counters are kept per bucket of this length.
    bucket_s: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    #: With Redis: the evaluating replica holds its lease this long without renewing.
    lease_s: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    #: Delivery attempts per message (first included), with full-jitter exponential backoff.
    max_attempts: PositiveInt = 6
    retry_base_s: PositiveFloat = 1.0
    retry_max_s: PositiveFloat = 60.0
    #: Messages waiting per destination; past it, new ones are dropped (and recorded).
    queue_size: PositiveInt = 1000
    #: Entries of the alert history kept (fired, resolved, delivered, failed).
    history_size: PositiveInt = 1000
    #: Tenants may register their own webhooks through the admin API (each receives only
    #: its tenant's alerts); this alone turns alerts on.
    tenant_webhooks: bool = False
    #: Webhooks one tenant may register.
    max_tenant_webhooks: Annotated[int, Meta(ge=1, le=100)] = 5
    #: Let a registered webhook name a loopback, private or link-local address (tests, or a
    #: gateway whose tenants are all inside one network); off, such URLs are refused.
    allow_private_webhook_urls: bool = False

    def active(self) -> bool:
        """Whether alerts run at all: enabled with somewhere to send them."""
        return self.enabled and (bool(self.destinations) or self.tenant_webhooks)


# -- end of alert settings ------------------------------------------------------------------


class GatewaySettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Process-wide settings."""

    #: Paths under these prefixes are API routes: they need a tenant key.
    api_prefixes: list[str] = field(default_factory=lambda: ["/v1/"])
    max_body_bytes: PositiveInt = 4 * 1024 * 1024
    #: When set, key hashes are HMAC-SHA256 with the secret read from this variable.
    key_secret_env: str | None = None
    #: Output tokens assumed when a request sets no ``max_tokens``.
    default_max_tokens: PositiveInt = 1024
    #: Shared state for many replicas (``redis://``, ``rediss://``, ``unix://`` or
    #: ``redis+cluster://``); unset or ``memory://``: state in this process. ``${NAME}`` is
    #: replaced by the environment variable ``NAME`` (a password kept out of the file).
    redis_url: str | None = None
    #: Prefix of every Redis key (lets several gateways or tests share one Redis).
    redis_prefix: str = ""
    #: Outage bound: Redis is declared unavailable when it has answered nothing for this long
    #: while calls were outstanding (a slow but answering Redis is waited for).
    redis_timeout_s: PositiveFloat = 0.25
    #: During an outage, one call per interval probes the store; traffic returns when it
    #: is answered.
    store_probe_interval_s: PositiveFloat = 0.25
    #: Gateway processes sharing these limits, over every host: hosts x workers per host
    #: (``tenantware serve --workers``). While the store is unreachable each process keeps
    #: ``limit / replicas`` (the ``local`` policy); without Redis each process's admission pool
    #: has ``seats // replicas``; above 1 the file registry refuses admin writes.
    replicas: PositiveInt = 1
    #: Failure policy of every kind of limit and of admission; unset: the per-kind defaults
    #: (``DEFAULT_FAILURE_POLICIES``; admission keeps its ``local`` share of the seats).
    on_store_failure: FailurePolicy | None = None
    #: Older name of ``metering.ledger_url`` (read when that is unset).
    ledger_url: str | None = None
    trust_request_id: bool = True
    #: Addresses or networks (``10.0.0.0/8``) of reverse proxies whose ``X-Forwarded-Host``
    #: names the host for domain binding; from anyone else the header is ignored.
    trusted_proxies: list[str] = field(default_factory=list)
    #: Where tenants and keys live: unset, the configuration file (admin API changes stay in
    #: this process's memory); ``redis://...``: a registry every replica shares and the
    #: admin API writes to (the file's tenants seed it when it is empty). ``${NAME}`` is
    #: expanded from the environment, as in ``redis_url``.
    registry_url: str | None = None
    #: With a shared registry: how often each process checks the registry version, the
    #: safety net for a missed pub/sub message.
    registry_check_s: Annotated[float, Meta(gt=0, le=60)] = 1.0
    #: Keys of the admin API (``metering.admin_key_hash`` is one more, with the admin role).
    admin_keys: list[AdminKey] = field(default_factory=list)
    #: An environment variable holding one more admin key in plain (bootstrap).
    admin_key_env: str | None = None
    #: How long an ``Idempotency-Key`` of the admin API is remembered.
    idempotency_ttl_s: Annotated[float, Meta(gt=0)] = 86_400.0
    #: How long the gateway remembers which tenant created a response an upstream stores
    #: (``GET``/``DELETE /v1/responses/{id}``); OpenAI keeps responses 30 days.
    response_owner_ttl_s: Annotated[float, Meta(gt=0)] = 30 * 86_400.0
    #: Payment providers' webhooks by name (credits to prepaid balances).
    payment_webhooks: dict[str, PaymentWebhook] = field(default_factory=dict)
    #: Environment variable holding the key that seals tenants' own upstream keys
    #: (``tenantware.backends.sealed``; 32 bytes, URL-safe base64).
    secrets_key_env: str = "TENANTWARE_SECRETS_KEY"
    #: Plain ``http://`` upstreams through the HTTP/1.1 fast path (``proxy/http11.py``);
    #: ``false``: every upstream call through aiohttp. Read at start-up.
    upstream_fast_path: bool = True

    def __post_init__(self) -> None:
        for entry in self.trusted_proxies:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise msgspec.ValidationError(
                    f"gateway.trusted_proxies: {entry!r} is not an address or network"
                ) from None


class TracingSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """OpenTelemetry tracing (the ``otel`` extra): off unless enabled; read at start-up only.

    Spans go to an OTLP collector; the exporter's own ``OTEL_EXPORTER_OTLP_*`` variables
    (endpoint, headers, certificates) apply where a field here is unset.
    """

    enabled: bool = False
    #: The collector's traces URL (``http://collector:4318/v1/traces``, or ``host:4317`` for
    #: grpc); unset: the exporter's default or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``.
    endpoint: str | None = None
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    service_name: Annotated[str, Meta(min_length=1)] = "tenantware"
    #: Share of new traces recorded; a request that arrives with a ``traceparent`` follows
    #: its caller's sampling decision.
    sample_ratio: Annotated[float, Meta(ge=0, le=1)] = 1.0


class GatewayConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The whole configuration of one gateway."""

    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    tiers: dict[str, Tier] = field(default_factory=dict)
    tenants: list[Tenant] = field(default_factory=list)
    upstreams: list[Upstream] = field(default_factory=list)
    #: Catalogue entries merged over the defaults (same name: replaced).
    models: dict[str, ModelSpec] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    include_default_models: bool = True
    quota: QuotaSettings = field(default_factory=QuotaSettings)
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    metering: MeteringSettings = field(default_factory=MeteringSettings)
    migration: MigrationSettings = field(default_factory=MigrationSettings)
    data: DataSettings = field(default_factory=DataSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)

    def __post_init__(self) -> None:
        tiers = self.all_tiers()
        seen_tenants: set[str] = set()
        seen_keys: set[str] = set()
        for tenant in self.tenants:
            if tenant.id in seen_tenants:
                raise msgspec.ValidationError(f"duplicate tenant id {tenant.id!r}")
            seen_tenants.add(tenant.id)
            if tenant.tier not in tiers:
                raise msgspec.ValidationError(
                    f"tenant {tenant.id!r} has unknown tier {tenant.tier!r}"
                )
            for key in tenant.keys:
                if key.hash in seen_keys:
                    raise msgspec.ValidationError(f"key {key.id!r} of {tenant.id!r} is reused")
                seen_keys.add(key.hash)
        catalogue = self.catalogue()
        for alias, target in self.aliases.items():
            if target not in catalogue:
                raise msgspec.ValidationError(f"alias {alias!r} points at unknown model {target!r}")
        names = set()
        for upstream in self.upstreams:
            if upstream.name in names:
                raise msgspec.ValidationError(f"duplicate upstream {upstream.name!r}")
            names.add(upstream.name)
        _check_references(self, catalogue, tiers)

    def all_tiers(self) -> dict[str, Tier]:
        """Built-in tiers overridden and extended by the configured ones."""
        return {**DEFAULT_TIERS, **self.tiers}

    def catalogue(self) -> dict[str, ModelSpec]:
        """The model catalogue: defaults (unless disabled) overridden by configured models."""
        base = dict(DEFAULT_MODELS) if self.include_default_models else {}
        base.update(self.models)
        return base


def _check_references(
    config: GatewayConfig, catalogue: dict[str, ModelSpec], tiers: dict[str, Tier]
) -> None:
    """Every name that refers to a tenant, tier, upstream or model names one that exists.

    A reference that points nowhere would otherwise be ignored at run time (a seat pool no
    request queues for, a limit no request meets) or turn into a 404 for a model an upstream
    serves; the error names the setting, the unknown name and the known ones.
    """
    tenant_ids = {tenant.id for tenant in config.tenants}
    upstreams = {upstream.name for upstream in config.upstreams}

    def known(what: str, names: set[str] | dict[str, Any]) -> str:
        listed = ", ".join(repr(name) for name in sorted(names)) or "none configured"
        return f"{what}: {listed}"

    def check(
        setting: str, names: Iterable[str], valid: set[str] | dict[str, Any], kind: str
    ) -> None:
        for name in names:
            if name not in valid:
                raise msgspec.ValidationError(
                    f"`{setting}`: unknown {kind} {name!r} ({known(kind + 's', valid)})"
                )

    def model_known(name: str) -> bool:
        return name in catalogue or config.aliases.get(name) in catalogue

    for index, upstream in enumerate(config.upstreams):
        for model in upstream.models:
            if model not in catalogue:
                raise msgspec.ValidationError(
                    f"`upstreams[{index}].models`: {model!r} has no price in the catalogue; "
                    f'add it under [models."{model}"] (a price of 0 is allowed, '
                    "written out) or remove it from the upstream"
                )
    for index, tenant in enumerate(config.tenants):
        for model in tenant.allowed_models:
            if model != "*" and not model_known(model):
                raise msgspec.ValidationError(
                    f"`tenants[{index}].allowed_models`: unknown model {model!r} "
                    f"({known('models', catalogue)})"
                )
        for model in tenant.data.cache_models:
            if model != "*" and not model_known(model):
                raise msgspec.ValidationError(
                    f"`tenants[{index}].data.cache_models`: unknown model {model!r} "
                    f"({known('models', catalogue)})"
                )
        problem = policy_problem(tenant.policy, config, catalogue)
        if problem is not None:
            raise msgspec.ValidationError(f"`tenants[{index}].policy.{problem[0]}`: {problem[1]}")
    admission = config.admission
    check("admission.upstream_seats", admission.upstream_seats, upstreams, "upstream")
    check(
        "admission.upstream_tokens_per_second",
        admission.upstream_tokens_per_second,
        upstreams,
        "upstream",
    )
    check("admission.tenant_reserved_seats", admission.tenant_reserved_seats, tenant_ids, "tenant")
    check("admission.tier_reserved_seats", admission.tier_reserved_seats, tiers, "tier")
    check("admission.tier_max_seats", admission.tier_max_seats, tiers, "tier")
    quota = config.quota
    for model in quota.model_limits:
        if not model_known(model):
            raise msgspec.ValidationError(
                f"`quota.model_limits`: unknown model {model!r} ({known('models', catalogue)})"
            )
    check("quota.tenant_model_limits", quota.tenant_model_limits, tenant_ids, "tenant")
    for tenant_id, per_model in quota.tenant_model_limits.items():
        for model in per_model:
            if not model_known(model):
                raise msgspec.ValidationError(
                    f"`quota.tenant_model_limits.{tenant_id}`: unknown model {model!r} "
                    f"({known('models', catalogue)})"
                )
    migration = config.migration
    check("migration.no_shadow_tenants", migration.no_shadow_tenants, tenant_ids, "tenant")
    names: set[str] = set()
    for rule in migration.rules:
        where = f"migration.rules.{rule.name}"
        if rule.name in names:
            raise msgspec.ValidationError(f"`migration.rules`: duplicate rule {rule.name!r}")
        names.add(rule.name)
        for model in (rule.model, *(c.model for c in rule.candidates if c.model)):
            if not model_known(model):
                raise msgspec.ValidationError(
                    f"`{where}`: unknown model {model!r} ({known('models', catalogue)})"
                )
        check(f"{where}.tenants", rule.tenants, tenant_ids, "tenant")
        check(f"{where}.exclude_tenants", rule.exclude_tenants, tenant_ids, "tenant")
        check(f"{where}.tiers", rule.tiers, tiers, "tier")
        check(f"{where}.primary", [rule.primary] if rule.primary else [], upstreams, "upstream")
        check(f"{where}.candidates", [c.upstream for c in rule.candidates], upstreams, "upstream")
    _check_alerts(config, tenant_ids, upstreams, tiers, model_known, check)
    served = {model for upstream in config.upstreams for model in upstream.models}
    for model, chain in config.breaker.fallbacks.items():
        for name in (model, *chain):
            if not model_known(name):
                raise msgspec.ValidationError(
                    f"`breaker.fallbacks.{model}`: unknown model {name!r} "
                    f"({known('models', catalogue)})"
                )
        for name in chain:
            canonical = name if name in catalogue else config.aliases[name]
            if config.upstreams and canonical not in served:
                raise msgspec.ValidationError(
                    f"`breaker.fallbacks.{model}`: no upstream serves {name!r}"
                )


def _check_alerts(
    config: GatewayConfig,
    tenant_ids: set[str],
    upstreams: set[str],
    tiers: dict[str, Tier],
    model_known: Callable[[str], bool],
    check: Callable[[str, Iterable[str], set[str] | dict[str, Any], str], None],
) -> None:
    """Alert rules name existing tenants, tiers, upstreams and models; ids are unique."""
    alerts = config.alerts
    seen: set[str] = set()
    for index, destination in enumerate(alerts.destinations):
        if destination.id in seen:
            raise msgspec.ValidationError(f"duplicate alert destination {destination.id!r}")
        seen.add(destination.id)
        if destination.tenant is not None:
            setting = f"alerts.destinations[{index}].tenant"
            check(setting, [destination.tenant], tenant_ids, "tenant")
    seen = set()
    for index, rule in enumerate(alerts.rules or ()):
        if rule.id in seen:
            raise msgspec.ValidationError(f"duplicate alert rule {rule.id!r}")
        seen.add(rule.id)
        setting = f"alerts.rules[{index}].match"
        if rule.scope == "tenant":
            check(setting, rule.match, tenant_ids, "tenant")
        elif rule.scope == "tier":
            check(setting, rule.match, tiers, "tier")
        elif rule.scope == "upstream":
            check(setting, rule.match, upstreams, "upstream")
        elif rule.scope == "model":
            for name in rule.match:
                if not model_known(name):
                    raise msgspec.ValidationError(f"`{setting}`: unknown model {name!r}")
        elif rule.match:
            raise msgspec.ValidationError(f"`{setting}`: a global rule matches nothing")


def _usd(value: str) -> Decimal:
    return Decimal(value)


#: The mission's four models with their list prices (USD per million tokens).
DEFAULT_MODELS: dict[str, ModelSpec] = {
    "gpt-4.1": ModelSpec(
        input_per_mtok=_usd("2.00"),
        output_per_mtok=_usd("8.00"),
        cached_input_per_mtok=_usd("0.50"),
    ),
    "claude-sonnet-4.5": ModelSpec(
        input_per_mtok=_usd("3.00"),
        output_per_mtok=_usd("15.00"),
        cached_input_per_mtok=_usd("0.30"),
        cache_write_per_mtok=_usd("3.75"),
    ),
    "gemini-2.5-flash": ModelSpec(
        input_per_mtok=_usd("0.30"),
        output_per_mtok=_usd("2.50"),
        cached_input_per_mtok=_usd("0.075"),
    ),
    "deepseek-v3.2": ModelSpec(
        input_per_mtok=_usd("0.28"),
        output_per_mtok=_usd("0.42"),
        cached_input_per_mtok=_usd("0.028"),
    ),
}

#: Built-in tiers: fair-share weights 0.5 / 0.35 / 0.15 and burst allowances 3x / 2x / 1x.
DEFAULT_TIERS: dict[str, Tier] = {
    "enterprise": Tier(
        weight=0.5,
        max_priority="critical",
        limits=Limits(requests_per_minute=6000, tokens_per_minute=2_000_000, burst_multiplier=3.0),
    ),
    "pro": Tier(
        weight=0.35,
        max_priority="normal",
        limits=Limits(requests_per_minute=600, tokens_per_minute=400_000, burst_multiplier=2.0),
    ),
    "free": Tier(
        weight=0.15,
        max_priority="bulk",
        limits=Limits(requests_per_minute=60, tokens_per_minute=40_000, burst_multiplier=1.0),
    ),
}

_DECODERS: dict[str, Callable[[bytes | str], Any]] = {
    ".toml": msgspec.toml.decode,
    ".yaml": msgspec.yaml.decode,
    ".yml": msgspec.yaml.decode,
    ".json": msgspec.json.decode,
}


def _dec_hook(tp: type, obj: Any) -> Any:
    # TOML and YAML give floats for prices; go through str so 0.3 stays 0.3 exactly.
    if tp is Decimal and isinstance(obj, float | int):
        return Decimal(str(obj))
    raise NotImplementedError


def parse_config(
    data: bytes | str | dict[str, Any], *, fmt: str = ".toml", source: str = "<config>"
) -> GatewayConfig:
    """Parse configuration text (or an already-decoded mapping) into a ``GatewayConfig``."""
    try:
        if isinstance(data, dict):
            return msgspec.convert(data, GatewayConfig, dec_hook=_dec_hook)
        decode = _DECODERS.get(fmt)
        if decode is None:
            raise ConfigError(
                f"{source}: unsupported config format {fmt!r} (use .toml, .yaml or .json)"
            )
        raw = decode(data)
        return msgspec.convert(raw, GatewayConfig, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except (msgspec.DecodeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{source}: cannot parse: {exc}") from None


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Load and validate a configuration file (``.toml``, ``.yaml``/``.yml`` or ``.json``)."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    return parse_config(data, fmt=file.suffix.lower(), source=str(file))


def policy_problem(
    policy: TenantPolicy, config: GatewayConfig, catalogue: dict[str, ModelSpec]
) -> tuple[str, str] | None:
    """``(field, what is wrong)`` for the first field of ``policy`` that refers to nothing
    (a model, an upstream), ``None`` when every reference exists. The configuration loader
    and the admin API both ask this, so a policy is refused the same way from either."""
    upstreams = {u.name: u for u in config.upstreams}
    served = {model for u in config.upstreams for model in u.models}

    def model_of(name: str) -> str | None:
        if name in catalogue:
            return name
        target = config.aliases.get(name)
        return target if target in catalogue else None

    def listed(names: Iterable[str]) -> str:
        return ", ".join(sorted(names)) or "none"

    for alias, target in policy.aliases.items():
        if not alias or len(alias) > 128:
            return f"aliases.{alias}", "an alias is 1 to 128 characters"
        if model_of(target) is None:
            return f"aliases.{alias}", f"unknown model {target!r} (known: {listed(catalogue)})"
    for name in policy.allowed_upstreams:
        if name not in upstreams:
            return "allowed_upstreams", f"unknown upstream {name!r} (known: {listed(upstreams)})"
    allowed = set(policy.allowed_upstreams) or set(upstreams)
    reachable = {m for name in allowed for m in upstreams[name].models}
    for model, chain in policy.fallbacks.items():
        if model_of(model) is None:
            return f"fallbacks.{model}", f"unknown model {model!r} (known: {listed(catalogue)})"
        for fallback in chain:
            canonical = model_of(fallback)
            if canonical is None:
                return (
                    f"fallbacks.{model}",
                    f"unknown fallback model {fallback!r} (known: {listed(catalogue)})",
                )
            if canonical not in served or canonical not in reachable:
                return (
                    f"fallbacks.{model}",
                    f"no allowed upstream serves the fallback model {fallback!r}",
                )
    seen: set[str] = set()
    for index, key in enumerate(policy.upstream_keys):
        if key.upstream not in upstreams:
            return (
                f"upstream_keys[{index}].upstream",
                f"unknown upstream {key.upstream!r} (known: {listed(upstreams)})",
            )
        if key.upstream in seen:
            return f"upstream_keys[{index}].upstream", f"a second key for {key.upstream!r}"
        seen.add(key.upstream)
    return None
