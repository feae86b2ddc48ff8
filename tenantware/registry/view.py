"""The in-process tenant index: from a presented key's hash to the tenant and its settings.

Tier defaults are merged into each tenant once, when the index is built (for each snapshot),
so the request path does one dict lookup and reads ready values.
"""

from __future__ import annotations

import time
from typing import Protocol

import msgspec

from tenantware.config import GatewayConfig, Limits, Priority, TenantData

__all__ = ["KeyEntry", "MemoryTenantRegistry", "TenantRegistry", "TenantView"]


class TenantView(msgspec.Struct, frozen=True, kw_only=True):
    """A tenant with its tier defaults applied: what every layer reads."""

    id: str
    name: str
    tier: str
    weight: float
    max_priority: Priority
    #: Canonical model names the tenant may use; ``None`` means all of them.
    allowed_models: frozenset[str] | None
    limits: Limits
    cost_center: str
    domains: frozenset[str]
    max_queue_wait_s: float
    #: What may be kept of its prompts and answers.
    data: TenantData = msgspec.field(default_factory=TenantData)
    #: Models whose answers are cached (``"*"`` in it: all); ``None``: caching is off, the
    #: one attribute the cache layer reads for a tenant that did not opt in.
    cache_models: frozenset[str] | None = None

    def caches(self, model: str) -> bool:
        """Whether answers of ``model`` are cached for this tenant."""
        models = self.cache_models
        return models is not None and (model in models or "*" in models)

    #: Requests are paid from a prepaid balance (``Tenant.billing``).
    prepaid: bool = False
    #: Below this balance (nano-USD) the tenant is warned; 0: never.
    low_balance_nanousd: int = 0
    #: Feature flags: its tier's, overridden by its own (``RequestContext.flag``).
    flags: dict[str, bool] = msgspec.field(default_factory=dict)
    #: Its own model aliases (resolved before the gateway's).
    aliases: dict[str, str] = msgspec.field(default_factory=dict)
    #: Upstreams its requests may go to; ``None``: every upstream.
    allowed_upstreams: frozenset[str] | None = None
    #: Its fallback chains, per model (replace the gateway's for that model).
    fallbacks: dict[str, tuple[str, ...]] = msgspec.field(default_factory=dict)
    #: Upper bound of one upstream call, seconds (``None``: the upstream's own).
    timeout_s: float | None = None
    #: Its own upstream keys, sealed: upstream name -> sealed value.
    upstream_keys: dict[str, str] = msgspec.field(default_factory=dict)

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


def _canonical(config: GatewayConfig, name: str) -> str:
    """A model name with the gateway's aliases resolved."""
    return config.aliases.get(name, name)


class KeyEntry(msgspec.Struct, frozen=True):
    """What a valid key resolves to; ``key_id`` names the key in logs and the ledger."""

    tenant: TenantView
    key_id: str
    #: Unix time the key stops working (a rotated key in its grace period), else ``None``.
    expires_at: float | None = None


class TenantRegistry(Protocol):
    """Where the request path looks tenants and key hashes up (built from one snapshot)."""

    def by_key_hash(self, key_hash: str) -> KeyEntry | None: ...

    def by_id(self, tenant_id: str) -> TenantView | None: ...

    def tenants(self) -> list[TenantView]: ...


class MemoryTenantRegistry:
    """An immutable index built from a configuration; replaced whole with each snapshot."""

    __slots__ = ("_by_hash", "_by_id")

    def __init__(self, config: GatewayConfig) -> None:
        tiers = config.all_tiers()
        self._by_id: dict[str, TenantView] = {}
        self._by_hash: dict[str, KeyEntry] = {}
        for tenant in config.tenants:
            if tenant.disabled:
                continue
            tier = tiers[tenant.tier]
            policy = tenant.policy
            allowed = (
                None
                if not tenant.allowed_models or "*" in tenant.allowed_models
                else frozenset(tenant.allowed_models)
            )
            view = TenantView(
                id=tenant.id,
                name=tenant.name or tenant.id,
                tier=tenant.tier,
                weight=tenant.weight if tenant.weight is not None else tier.weight,
                max_priority=tenant.max_priority or tier.max_priority,
                allowed_models=allowed,
                limits=tenant.limits.merged_over(tier.limits),
                cost_center=tenant.cost_center or tenant.id,
                domains=frozenset(d.lower() for d in tenant.domains),
                max_queue_wait_s=tier.max_queue_wait_s,
                data=tenant.data,
                cache_models=frozenset(
                    config.aliases.get(model, model) for model in tenant.data.cache_models
                )
                or None,
                prepaid=tenant.billing == "prepaid",
                # usd_to_nanousd's rule (whole nano-dollars, never rounded up); the context
                # layer may not import metering.
                low_balance_nanousd=int(tenant.low_balance_usd * 1_000_000_000)
                if tenant.low_balance_usd is not None
                else 0,
                flags={**tier.flags, **policy.flags},
                aliases=dict(policy.aliases),
                allowed_upstreams=frozenset(policy.allowed_upstreams)
                if policy.allowed_upstreams
                else None,
                fallbacks={
                    model: tuple(_canonical(config, name) for name in chain)
                    for model, chain in policy.fallbacks.items()
                },
                timeout_s=policy.timeout_s,
                upstream_keys={key.upstream: key.sealed for key in policy.upstream_keys},
            )
            self._by_id[tenant.id] = view
            for key in tenant.keys:
                if not key.revoked:
                    self._by_hash[key.hash] = KeyEntry(view, key.id, key.expires_at)

    def by_key_hash(self, key_hash: str) -> KeyEntry | None:
        entry = self._by_hash.get(key_hash)
        if entry is None or entry.expires_at is None:
            return entry
        # Only a key in its rotation grace period carries an expiry (and costs a clock read).
        return entry if entry.expires_at > time.time() else None

    def by_id(self, tenant_id: str) -> TenantView | None:
        return self._by_id.get(tenant_id)

    def tenants(self) -> list[TenantView]:
        return list(self._by_id.values())
