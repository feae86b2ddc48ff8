"""Typed configuration: every setting is a frozen msgspec Struct, validated once at load.

The file format (TOML, YAML or JSON) is picked by extension. Errors name the file and the
field path (``$.tenants[0].limits.requests_per_minute``) so an operator can fix them at once.
"""

from __future__ import annotations

import ipaddress
import os
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
    "ApiKey",
    "BreakerSettings",
    "CircuitSettings",
    "ConfigError",
    "GatewayConfig",
    "GatewaySettings",
    "Limits",
    "MeteringSettings",
    "ModelSpec",
    "QuotaSettings",
    "Tenant",
    "Tier",
    "TracingSettings",
    "Upstream",
    "load_config",
    "parse_config",
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


class Tier(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Defaults shared by every tenant of a tier; a tenant overrides any of them."""

    weight: Weight = 0.15
    max_priority: Priority = "normal"
    limits: Limits = field(default_factory=Limits)
    #: Longest time a request of this tier may wait in the fair queue.
    max_queue_wait_s: PositiveFloat = 300.0


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

    def __post_init__(self) -> None:
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
    #: A concurrency slot whose request never settles (a crashed replica) frees itself after.
    lease_s: PositiveFloat = 900.0
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
    resilience4j; see the README's "Circuit breaking" section)."""

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


class MeteringSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of metering, the ledger, metrics and logs (``[metering]``)."""

    enabled: bool = True
    #: Where usage records go: ``sqlite:///path.db`` (default), ``postgresql://...`` or
    #: ``memory://`` (tests). Replaces ``gateway.ledger_url``, which is still read when this
    #: is unset.
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
    #: ``redis+cluster://``); unset or ``memory://``: state in this process.
    redis_url: str | None = None
    #: Prefix of every Redis key (lets several gateways or tests share one Redis).
    redis_prefix: str = ""
    #: Outage bound: Redis is declared unavailable when it has answered nothing for this long
    #: while calls were outstanding (a slow but answering Redis is waited for).
    redis_timeout_s: PositiveFloat = 0.25
    #: During an outage, one call per interval probes the store; traffic returns when it
    #: is answered.
    store_probe_interval_s: PositiveFloat = 0.25
    #: How many gateway replicas share the limits (for the ``local`` failure policy).
    replicas: PositiveInt = 1
    #: Failure policy of every kind of limit and of admission; unset: the per-kind defaults
    #: (``DEFAULT_FAILURE_POLICIES``; admission keeps its ``local`` share of the seats).
    on_store_failure: FailurePolicy | None = None
    ledger_url: str | None = None
    trust_request_id: bool = True
    #: Addresses or networks (``10.0.0.0/8``) of reverse proxies whose ``X-Forwarded-Host``
    #: names the host for domain binding; from anyone else the header is ignored.
    trusted_proxies: list[str] = field(default_factory=list)
    #: Where tenants and keys live: unset, the configuration file (admin API changes stay in
    #: this process's memory); ``redis://...``: a registry every replica shares and the
    #: admin API writes to (the file's tenants seed it when it is empty).
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
