"""tenantware: make any ASGI app a multi-tenant AI API gateway.

Every public name is imported on first use (PEP 562), so ``import tenantware`` loads no backend
(aiohttp, httpx, redis, psycopg, prometheus-client) and an app that only reads a configuration
or hashes a key never pays for them. ``from tenantware import Gateway`` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tenantware.breaker import BreakerBoard, MemoryBreakerStore, RedisBreakerStore
    from tenantware.config import (
        AdmissionSettings,
        ApiKey,
        ConfigError,
        GatewayConfig,
        GatewaySettings,
        Limits,
        MeteringSettings,
        ModelSpec,
        Tenant,
        Tier,
        Upstream,
        load_config,
        parse_config,
    )
    from tenantware.context import (
        Outcome,
        RequestContext,
        RequestView,
        Usage,
        context_of,
        get_context,
    )
    from tenantware.errors import GatewayError
    from tenantware.gateway import Gateway
    from tenantware.keys import KeyHasher, generate_key
    from tenantware.metering.ledger import (
        Ledger,
        LedgerWriter,
        MemoryLedger,
        SqliteLedger,
        UsageRecord,
    )
    from tenantware.middleware.admission import AdmissionMiddleware
    from tenantware.middleware.breaker import BreakerMiddleware
    from tenantware.middleware.metering import MeteringMiddleware
    from tenantware.middleware.quota import QuotaMiddleware
    from tenantware.middleware.tenant import TenantMiddleware
    from tenantware.proxy.app import ProxyApp
    from tenantware.proxy.fast_path import FastPathUpstreamClient
    from tenantware.proxy.upstream import AiohttpUpstreamClient, HttpxUpstreamClient, UpstreamClient
    from tenantware.quota import MemoryQuotaStore, QuotaStore, RedisQuotaStore
    from tenantware.registry import TenantView
    from tenantware.state import LiveConfig

__version__ = "0.1.0"

__all__ = [
    "AdmissionMiddleware",
    "AdmissionSettings",
    "AiohttpUpstreamClient",
    "ApiKey",
    "BreakerBoard",
    "BreakerMiddleware",
    "ConfigError",
    "FastPathUpstreamClient",
    "Gateway",
    "GatewayConfig",
    "GatewayError",
    "GatewaySettings",
    "HttpxUpstreamClient",
    "KeyHasher",
    "Ledger",
    "LedgerWriter",
    "Limits",
    "LiveConfig",
    "MemoryBreakerStore",
    "MemoryLedger",
    "MemoryQuotaStore",
    "MeteringMiddleware",
    "MeteringSettings",
    "ModelSpec",
    "Outcome",
    "ProxyApp",
    "QuotaMiddleware",
    "QuotaStore",
    "RedisBreakerStore",
    "RedisQuotaStore",
    "RequestContext",
    "RequestView",
    "SqliteLedger",
    "Tenant",
    "TenantMiddleware",
    "TenantView",
    "Tier",
    "Upstream",
    "UpstreamClient",
    "Usage",
    "UsageRecord",
    "context_of",
    "generate_key",
    "get_context",
    "load_config",
    "parse_config",
]

#: Where each public name lives; imported from there on first access.
_HOMES: dict[str, str] = {
    "AdmissionMiddleware": "tenantware.middleware.admission",
    "AdmissionSettings": "tenantware.config",
    "AiohttpUpstreamClient": "tenantware.proxy.upstream",
    "ApiKey": "tenantware.config",
    "BreakerBoard": "tenantware.breaker",
    "BreakerMiddleware": "tenantware.middleware.breaker",
    "ConfigError": "tenantware.config",
    "context_of": "tenantware.context",
    "FastPathUpstreamClient": "tenantware.proxy.fast_path",
    "Gateway": "tenantware.gateway",
    "GatewayConfig": "tenantware.config",
    "GatewayError": "tenantware.errors",
    "GatewaySettings": "tenantware.config",
    "generate_key": "tenantware.keys",
    "get_context": "tenantware.context",
    "HttpxUpstreamClient": "tenantware.proxy.upstream",
    "KeyHasher": "tenantware.keys",
    "Ledger": "tenantware.metering.ledger",
    "LedgerWriter": "tenantware.metering.ledger",
    "Limits": "tenantware.config",
    "LiveConfig": "tenantware.state",
    "load_config": "tenantware.config",
    "MemoryBreakerStore": "tenantware.breaker",
    "MemoryLedger": "tenantware.metering.ledger",
    "MemoryQuotaStore": "tenantware.quota",
    "MeteringMiddleware": "tenantware.middleware.metering",
    "MeteringSettings": "tenantware.config",
    "ModelSpec": "tenantware.config",
    "Outcome": "tenantware.context",
    "parse_config": "tenantware.config",
    "ProxyApp": "tenantware.proxy.app",
    "QuotaMiddleware": "tenantware.middleware.quota",
    "QuotaStore": "tenantware.quota",
    "RedisBreakerStore": "tenantware.breaker",
    "RedisQuotaStore": "tenantware.quota",
    "RequestContext": "tenantware.context",
    "RequestView": "tenantware.context",
    "SqliteLedger": "tenantware.metering.ledger",
    "Tenant": "tenantware.config",
    "TenantMiddleware": "tenantware.middleware.tenant",
    "TenantView": "tenantware.registry",
    "Tier": "tenantware.config",
    "Upstream": "tenantware.config",
    "UpstreamClient": "tenantware.proxy.upstream",
    "Usage": "tenantware.context",
    "UsageRecord": "tenantware.metering.ledger",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'tenantware' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
