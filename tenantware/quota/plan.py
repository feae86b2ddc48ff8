"""Limits compiled once into the flat plan a store evaluates in one atomic step.

A tenant's ``Limits`` (tier defaults merged), its per-model limits and the global limits become
``Plan``s: lists of ``Limit``s with their store keys and integer parameters (microseconds,
tokens, nano-dollars). Plans are built once per configuration version and tenant/model, so a
request only looks one up. Every key of a plan shares one hash tag (one Redis Cluster slot).
"""

from __future__ import annotations

import math
from typing import Final

from tenantware.backends.keys import tenant_key
from tenantware.backends.lua_args import pack_values
from tenantware.config import (
    FailurePolicy,
    GatewayConfig,
    Limits,
    failure_policy,
)
from tenantware.metering.pricing import usd_to_nanousd

__all__ = [
    "DAY_US",
    "GLOBAL_TAG",
    "KIND_BALANCE",
    "KIND_CONCURRENCY",
    "KIND_MONTHLY_SPEND",
    "KIND_REQUESTS",
    "KIND_SPEND",
    "KIND_TOKENS",
    "Limit",
    "Plan",
    "balance_key",
    "balance_limit",
    "build_plan",
    "day_and_month",
    "is_global",
    "month_index",
    "windows_at",
]

SECOND_US: Final = 1_000_000
DAY_US: Final = 86_400 * SECOND_US
#: Hash tag of the aggregate limits; tenant ids cannot contain ``*``.
GLOBAL_TAG: Final = "*"

#: GCRA request rate: p1 = emission interval, p2 = tolerance (burst x interval).
KIND_REQUESTS: Final = "r"
#: Tokens per fixed window: p1 = window, p2 = limit.
KIND_TOKENS: Final = "t"
#: Spend per fixed window (days): p1 = window, p2 = limit in nano-USD.
KIND_SPEND: Final = "c"
#: Spend per calendar month (UTC): p2 = limit in nano-USD.
KIND_MONTHLY_SPEND: Final = "m"
#: Concurrent requests: p1 = lease, p2 = limit.
KIND_CONCURRENCY: Final = "n"
#: A prepaid balance (never expires, credited by top-ups): p1 = low-balance threshold in
#: nano-USD (0: none), p2 unused. A reservation needs a positive balance that covers the
#: request's estimated charge; the settle corrects it to the actual charge.
KIND_BALANCE: Final = "b"

_GROUP = {
    KIND_REQUESTS: "requests",
    KIND_TOKENS: "tokens",
    KIND_SPEND: "budget",
    KIND_MONTHLY_SPEND: "budget",
    KIND_CONCURRENCY: "concurrency",
    KIND_BALANCE: "balance",
}
#: Kinds counted per window (the window's number is stored with the counter).
_WINDOWED = (KIND_TOKENS, KIND_SPEND, KIND_MONTHLY_SPEND)
_WINDOWS = (("second", 1), ("minute", 60), ("hour", 3600), ("day", 86_400))
_SHORT = {"second": "s", "minute": "m", "hour": "h", "day": "d"}


class Limit:
    """One limit of a plan; ``name`` is what error messages call it."""

    __slots__ = ("group", "key", "kind", "limit", "name", "p1", "p2", "policy")

    def __init__(
        self, kind: str, key: str, name: str, limit: int, p1: int, p2: int, policy: FailurePolicy
    ) -> None:
        self.kind = kind
        self.key = key
        self.name = name
        self.limit = limit
        self.p1 = p1
        self.p2 = p2
        self.policy = policy
        self.group = _GROUP[kind]

    def scaled(self, replicas: int) -> Limit:
        """This limit divided among ``replicas`` (the local fallback's share)."""
        if replicas == 1:
            return self
        share = max(1, self.limit // replicas)
        if self.kind == KIND_REQUESTS:
            burst = max(1, (self.p2 // self.p1) // replicas)
            interval = self.p1 * replicas
            return Limit(self.kind, self.key, self.name, share, interval, burst * interval, "local")
        p2 = share
        return Limit(self.kind, self.key, self.name, share, self.p1, p2, "local")

    def __repr__(self) -> str:
        return f"Limit({self.kind!r}, {self.key!r}, limit={self.limit})"


class Plan:
    """The limits of one scope (one hash tag), with what a store outage should do to them."""

    __slots__ = (
        "args",
        "balance_index",
        "closed",
        "counts_usage",
        "header_groups",
        "holds_slots",
        "keys",
        "limits",
        "local",
        "packed",
        "settle_packed",
        "windowed",
    )

    def __init__(
        self,
        limits: list[Limit],
        *,
        replicas: int = 1,
        fallback: bool = True,
        tenant_limits: int | None = None,
    ) -> None:
        self.limits = tuple(limits)
        self.keys = tuple(limit.key for limit in limits)
        args: list[str | int] = []
        for limit in limits:
            args.extend((limit.kind, limit.p1, limit.p2))
        #: ``kind, p1, p2`` per limit, as the Lua scripts read them.
        self.args = tuple(args)
        #: ``kind, p1, p2, key ttl`` per limit as MessagePack, packed once: what the reserve
        #: and settle scripts take (``_key_ttl_ms``).
        self.packed = pack_values(
            *(
                value
                for limit in limits
                for value in (limit.kind, limit.p1, limit.p2, _key_ttl_ms(limit))
            )
        )
        #: ``kind, p1`` per limit as MessagePack, packed once: all the settle script needs
        #: of the plan (fewer values to unpack than ``packed``).
        self.settle_packed = pack_values(
            *(value for limit in limits for value in (limit.kind, limit.p1))
        )
        #: ``(kind, p1)`` of each limit whose counter is per window (``None`` for the others):
        #: what ``windows_at`` computes a window for.
        self.windowed = tuple(
            (limit.kind, limit.p1) if limit.kind in _WINDOWED else None for limit in limits
        )
        #: A store outage rejects the request (some limit's policy is ``closed``).
        self.closed = any(limit.policy == "closed" for limit in limits)
        local = [limit.scaled(replicas) for limit in limits if limit.policy == "local"]
        #: What a local in-memory limiter keeps during an outage (``None``: nothing).
        self.local = Plan(local, fallback=False) if fallback and local else None
        #: The first ``tenant_limits`` limits are the tenant's, the rest the gateway's shared
        #: ones (a merged plan, see ``build_plan``); only the tenant's make the headers.
        own = limits if tenant_limits is None else limits[:tenant_limits]
        #: A settle must run even when usage matched the estimate (a slot to give back).
        self.holds_slots = any(limit.kind == KIND_CONCURRENCY for limit in limits)
        #: Some limit counts tokens or spend, so a usage correction has something to change
        #: (request-rate limits are only given back on cancel).
        self.counts_usage = any(
            limit.kind not in (KIND_REQUESTS, KIND_CONCURRENCY) for limit in limits
        )
        #: Index of the prepaid balance among the limits (-1: none).
        self.balance_index = next(
            (i for i, limit in enumerate(limits) if limit.kind == KIND_BALANCE), -1
        )
        #: ``(header suffix, indexes of its limits)`` for the ``x-ratelimit-*`` headers; a
        #: concurrency limit is a requests limit there, so its refusals carry them too.
        self.header_groups = tuple(
            (suffix, idx)
            for suffix, kinds in (
                (b"requests", (KIND_REQUESTS, KIND_CONCURRENCY)),
                (b"tokens", (KIND_TOKENS,)),
            )
            if (idx := tuple(i for i, limit in enumerate(own) if limit.kind in kinds))
        )

    def __repr__(self) -> str:
        return f"Plan({list(self.limits)!r})"


def _key_ttl_ms(limit: Limit) -> str:
    """The expiry (ms, as a string) the reserve script gives a key it writes: a concurrency
    key outlives a slot taken now by a second; a request rate's theoretical arrival time is
    at most its tolerance ahead of now (past it the key means nothing). "" otherwise."""
    if limit.kind == KIND_CONCURRENCY:
        return str(-(-limit.p1 // 1000) + 1000)
    if limit.kind == KIND_REQUESTS:
        return str(-(-limit.p2 // 1000) + 1)
    return ""


def windows_at(plan: Plan, now_us: int) -> list[str]:
    """The window of each limit of ``plan`` at ``now_us`` as the Lua scripts number it ("" for
    a limit without windows), as strings: the settle script compares them with the window a
    counter holds, as Redis stores it."""
    return [
        ""
        if window is None
        else str(month_index(now_us) if window[0] == KIND_MONTHLY_SPEND else now_us // window[1])
        for window in plan.windowed
    ]


def balance_key(prefix: str, tenant_id: str) -> str:
    """The key of a tenant's prepaid balance (in the tenant's hash tag, like its limits)."""
    return tenant_key(prefix, tenant_id, "balance")


def balance_limit(prefix: str, tenant_id: str, low_nanousd: int) -> Limit:
    """The prepaid balance as a limit; a store outage always refuses it (``closed``): an
    unchecked request would be served unpaid."""
    key = balance_key(prefix, tenant_id)
    return Limit(KIND_BALANCE, key, "prepaid balance", 0, low_nanousd, 0, "closed")


def is_global(limit: Limit) -> bool:
    """Whether ``limit`` is one of the gateway's shared (global) limits."""
    return "{" + GLOBAL_TAG + "}" in limit.key


def month_index(now_us: int) -> int:
    """Months since 1970-01 (UTC) of a time in microseconds; same arithmetic as the Lua."""
    day = now_us // DAY_US
    # The monthly budget asks this on every request: the answer changes once a day.
    if day == _last_month[0]:
        return _last_month[1]
    month = _month_of_day(day)
    _last_month[0], _last_month[1] = day, month
    return month


def day_and_month(now_us: int) -> tuple[int, int]:
    """The day (since 1970-01-01 UTC) of a time in microseconds and its month
    (``month_index``): the reserve script takes the month as given on that day instead of
    computing it in Lua on every request, and computes it when Redis's day is another."""
    day = now_us // DAY_US
    return day, month_index(now_us)


#: (day, month) of the last ``month_index`` call.
_last_month: list[int] = [-1, 0]


def _month_of_day(day: int) -> int:
    z = day + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    year = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    month = mp + 3 if mp < 10 else mp - 9
    if month <= 2:
        year += 1
    return year * 12 + month - 1


def _limits_of(
    limits: Limits, tag: str, prefix: str, parts: tuple[str, ...], config: GatewayConfig
) -> list[Limit]:
    quota = config.quota

    def key(name: str) -> str:
        return tenant_key(prefix, tag, *parts, name)

    out: list[Limit] = []
    burst = limits.burst_multiplier or 1.0
    for window, seconds in _WINDOWS:
        count: int | None = getattr(limits, f"requests_per_{window}")
        if count is not None:
            interval = math.ceil(seconds * SECOND_US / count)
            allowance = max(1, math.floor(count * burst))
            out.append(
                Limit(
                    KIND_REQUESTS,
                    key(f"rp{_SHORT[window]}"),
                    f"requests per {window}",
                    count,
                    interval,
                    allowance * interval,
                    failure_policy(config, "requests"),
                )
            )
    for window, seconds in _WINDOWS:
        count = getattr(limits, f"tokens_per_{window}")
        if count is not None:
            out.append(
                Limit(
                    KIND_TOKENS,
                    key(f"tp{_SHORT[window]}"),
                    f"tokens per {window}",
                    count,
                    seconds * SECOND_US,
                    count,
                    failure_policy(config, "tokens"),
                )
            )
    if limits.concurrent_requests is not None:
        lease = math.ceil(quota.lease_s * SECOND_US)
        n = limits.concurrent_requests
        out.append(
            Limit(
                KIND_CONCURRENCY,
                key("conc"),
                "concurrent requests",
                n,
                lease,
                n,
                failure_policy(config, "concurrency"),
            )
        )
    if limits.daily_budget_usd is not None:
        cap = usd_to_nanousd(limits.daily_budget_usd)
        out.append(
            Limit(
                KIND_SPEND,
                key("usd:d"),
                "daily budget",
                cap,
                DAY_US,
                cap,
                failure_policy(config, "budget"),
            )
        )
    if limits.monthly_budget_usd is not None:
        cap = usd_to_nanousd(limits.monthly_budget_usd)
        out.append(
            Limit(
                KIND_MONTHLY_SPEND,
                key("usd:m"),
                "monthly budget",
                cap,
                0,
                cap,
                failure_policy(config, "budget"),
            )
        )
    return out


def build_plan(
    config: GatewayConfig,
    tenant_id: str,
    limits: Limits,
    model: str | None,
    prefix: str,
    *,
    merge: bool = False,
    balance_low: int | None = None,
) -> tuple[Plan | None, Plan | None]:
    """``(tenant plan, global plan)`` for a request; ``None`` where nothing is limited.

    The tenant plan holds the tenant's own limits and its per-model limits (same hash tag, so
    one atomic decision); the global plan is its own scope (another slot on a cluster).
    ``merge`` (a store that reaches every key from one script: memory, one Redis server) puts
    the global limits into the tenant plan, so one decision grants both scopes or neither and
    a request costs one store call instead of two. ``balance_low`` (a prepaid tenant's
    low-balance threshold, nano-USD) adds its balance to the tenant plan: it is reserved in
    the same atomic step as every other limit.
    """
    quota = config.quota
    replicas = config.gateway.replicas
    found = _limits_of(limits, tenant_id, prefix, (), config)
    if model is not None:
        per_model = quota.model_limits.get(model)
        override = quota.tenant_model_limits.get(tenant_id, {}).get(model)
        if override is not None:
            per_model = override.merged_over(per_model) if per_model is not None else override
        if per_model is not None:
            found += _limits_of(per_model, tenant_id, prefix, ("model", model), config)
    if balance_low is not None:
        found.append(balance_limit(prefix, tenant_id, balance_low))
    global_limits = _limits_of(quota.global_limits, GLOBAL_TAG, prefix, (), config)
    if merge and found and global_limits:
        merged = Plan(found + global_limits, replicas=replicas, tenant_limits=len(found))
        return merged, None
    tenant_plan = Plan(found, replicas=replicas) if found else None
    global_plan = Plan(global_limits, replicas=replicas) if global_limits else None
    return tenant_plan, global_plan
