"""The ``--demo`` configuration: two tenants, the bundled fake upstream, no secrets needed."""

from __future__ import annotations

from tenantware.config import ApiKey, GatewayConfig, MeteringSettings, Tenant, Upstream
from tenantware.keys import KeyHasher

__all__ = ["DEMO_ADMIN_KEY", "DEMO_KEYS", "DEMO_UPSTREAM_PATH", "demo_config"]

#: Mount point of the fake upstream inside the demo gateway.
DEMO_UPSTREAM_PATH = "/_demo_upstream"
#: Demo tenants and their keys; printed at start so a newcomer can use them at once.
DEMO_KEYS = {"acme": "sk-demo-acme", "hobby": "sk-demo-hobby"}
#: Reads every tenant's usage (``/admin/usage``) and ``/metrics``.
DEMO_ADMIN_KEY = "sk-demo-admin"


def demo_config(upstream_url: str) -> GatewayConfig:
    """Demo tenants whose every model is answered by the OpenAI-compatible ``upstream_url``
    (a base URL ending in ``/v1``; the demo gateway points it at its own fake upstream)."""
    hasher = KeyHasher()
    return GatewayConfig(
        tenants=[
            Tenant(
                id="acme",
                name="Acme Corp (enterprise)",
                tier="enterprise",
                keys=[ApiKey(id="acme-demo", hash=hasher.hash(DEMO_KEYS["acme"]))],
            ),
            Tenant(
                id="hobby",
                name="Hobbyist (free)",
                tier="free",
                allowed_models=["gemini-2.5-flash", "deepseek-v3.2"],
                keys=[ApiKey(id="hobby-demo", hash=hasher.hash(DEMO_KEYS["hobby"]))],
            ),
        ],
        upstreams=[
            Upstream(
                name="demo",
                base_url=upstream_url,
                models=["gpt-4.1", "claude-sonnet-4.5", "gemini-2.5-flash", "deepseek-v3.2"],
            )
        ],
        aliases={"gpt4": "gpt-4.1", "sonnet": "claude-sonnet-4.5"},
        metering=MeteringSettings(admin_key_hash=hasher.hash(DEMO_ADMIN_KEY)),
    )
