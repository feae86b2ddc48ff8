"""tenantware: make any ASGI app a multi-tenant AI API gateway."""

from tenantware.config import (
    AdmissionSettings,
    ApiKey,
    ConfigError,
    GatewayConfig,
    GatewaySettings,
    Limits,
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
from tenantware.middleware.admission import AdmissionMiddleware
from tenantware.middleware.tenant import TenantMiddleware
from tenantware.proxy.app import ProxyApp
from tenantware.proxy.upstream import AiohttpUpstreamClient, HttpxUpstreamClient, UpstreamClient
from tenantware.registry import TenantView
from tenantware.state import LiveConfig

__version__ = "0.1.0"

__all__ = [
    "AdmissionMiddleware",
    "AdmissionSettings",
    "AiohttpUpstreamClient",
    "ApiKey",
    "ConfigError",
    "Gateway",
    "GatewayConfig",
    "GatewayError",
    "GatewaySettings",
    "HttpxUpstreamClient",
    "KeyHasher",
    "Limits",
    "LiveConfig",
    "ModelSpec",
    "Outcome",
    "ProxyApp",
    "RequestContext",
    "RequestView",
    "Tenant",
    "TenantMiddleware",
    "TenantView",
    "Tier",
    "Upstream",
    "UpstreamClient",
    "Usage",
    "context_of",
    "generate_key",
    "get_context",
    "load_config",
    "parse_config",
]
