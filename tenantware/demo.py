"""The ``--demo`` configuration: two tenants, the bundled fake upstream, no secrets needed."""

from __future__ import annotations

from tenantware.config import ApiKey, GatewayConfig, MeteringSettings, Tenant, Upstream
from tenantware.keys import KeyHasher

__all__ = [
    "DEMO_ADMIN_KEY",
    "DEMO_KEYS",
    "DEMO_UPSTREAM_KEY_ENV",
    "DEMO_UPSTREAM_PATH",
    "demo_config",
]

#: Mount point of the fake upstream inside the demo gateway.
DEMO_UPSTREAM_PATH = "/_demo_upstream"
#: Demo tenants and their keys; printed at start so a newcomer can use them at once.
DEMO_KEYS = {"acme": "sk-demo-acme", "hobby": "sk-demo-hobby"}
#: Reads every tenant's usage (``/admin/usage``) and ``/metrics``.
DEMO_ADMIN_KEY = "sk-demo-admin"
#: The fake upstream's own key: random per run (``tenantware serve --demo`` sets it), so the
#: fake answers only the gateway, never a client that skips the gateway's key and quotas.
DEMO_UPSTREAM_KEY_ENV = "TENANTWARE_DEMO_UPSTREAM_KEY"


def demo_config(upstream_url: str, *, ledger_url: str = "memory://") -> GatewayConfig:
    """Demo tenants whose every model is answered by the OpenAI-compatible ``upstream_url``
    (a base URL ending in ``/v1``; the demo gateway points it at its own fake upstream, with
    the key in ``DEMO_UPSTREAM_KEY_ENV``). Usage records go to ``ledger_url``."""
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
                api_key_env=DEMO_UPSTREAM_KEY_ENV,
                models=["gpt-4.1", "claude-sonnet-4.5", "gemini-2.5-flash", "deepseek-v3.2"],
            )
        ],
        aliases={"gpt4": "gpt-4.1", "sonnet": "claude-sonnet-4.5"},
        metering=MeteringSettings(
            ledger_url=ledger_url, admin_key_hash=hasher.hash(DEMO_ADMIN_KEY)
        ),
    )
