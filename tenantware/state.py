"""The live configuration: one immutable ``Snapshot`` swapped whole on reload.

Each request reads ``live.current`` once, so it sees one consistent version even while a
reload happens; readers take no lock.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from tenantware.catalogue import Catalogue
from tenantware.config import ConfigError, GatewayConfig, Upstream
from tenantware.keys import KeyHasher
from tenantware.registry import MemoryTenantRegistry, TenantRegistry

__all__ = ["LiveConfig", "Snapshot"]


class Snapshot:
    """Everything derived from one configuration version, computed once."""

    __slots__ = (
        "api_prefixes",
        "catalogue",
        "config",
        "domain_owner",
        "hasher",
        "max_body_bytes",
        "registry",
        "routes",
        "version",
    )

    def __init__(self, config: GatewayConfig, registry: TenantRegistry, version: int) -> None:
        self.config = config
        self.version = version
        self.registry = registry
        try:
            self.catalogue = Catalogue(config)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        settings = config.gateway
        secret = os.environ.get(settings.key_secret_env) if settings.key_secret_env else None
        if settings.key_secret_env and not secret:
            raise ConfigError(f"gateway.key_secret_env: ${settings.key_secret_env} is not set")
        self.hasher = KeyHasher(secret.encode() if secret else None)
        self.api_prefixes = tuple(settings.api_prefixes)
        self.max_body_bytes = settings.max_body_bytes
        self.domain_owner = {
            domain.lower(): tenant.id for tenant in config.tenants for domain in tenant.domains
        }
        routes: dict[str, list[Upstream]] = {}
        for upstream in config.upstreams:
            for model in upstream.models:
                canonical = self.catalogue.resolve(model) or model
                routes.setdefault(canonical, []).append(upstream)
        #: Canonical model -> the upstreams that serve it, in configured order.
        self.routes = routes


RegistryFactory = Callable[[GatewayConfig], TenantRegistry]


class LiveConfig:
    """Holds the current snapshot; ``replace`` validates a new config fully before swapping."""

    def __init__(
        self, config: GatewayConfig, *, registry_factory: RegistryFactory = MemoryTenantRegistry
    ) -> None:
        self._registry_factory = registry_factory
        self._listeners: list[Callable[[Snapshot], None]] = []
        self.current = Snapshot(config, registry_factory(config), version=1)

    def replace(self, config: GatewayConfig) -> Snapshot:
        """Swap in a new configuration; on error the old one stays in force."""
        snapshot = Snapshot(
            config, self._registry_factory(config), version=self.current.version + 1
        )
        self.current = snapshot
        for listener in self._listeners:
            listener(snapshot)
        return snapshot

    def on_change(self, listener: Callable[[Snapshot], None]) -> None:
        """Call ``listener`` after each successful replace (e.g. to drop cached derived state)."""
        self._listeners.append(listener)
