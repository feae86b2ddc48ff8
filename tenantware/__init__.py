"""tenantware: make any ASGI app a multi-tenant AI API gateway."""

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
from tenantware.context import Outcome, RequestContext, RequestView, Usage, context_of, get_context
from tenantware.errors import GatewayError
from tenantware.gateway import Gateway
from tenantware.keys import KeyHasher, generate_key
from tenantware.metering.ledger import Ledger, LedgerWriter, MemoryLedger, SqliteLedger, UsageRecord
from tenantware.middleware.admission import AdmissionMiddleware
from tenantware.middleware.breaker import BreakerMiddleware
from tenantware.middleware.metering import MeteringMiddleware
from tenantware.middleware.quota import QuotaMiddleware
from tenantware.middleware.tenant import TenantMiddleware
from tenantware.proxy.app import ProxyApp
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
