"""The live configuration: one immutable ``Snapshot`` swapped whole on reload.

Each request reads ``live.current`` once, so it sees one consistent version even while a
reload happens; readers take no lock. Two sources feed it: the configuration file, and the
tenant registry when it is shared (its tenants replace the file's, and rules changed through
the admin API replace the file's rules). A change of either builds a new snapshot, so every
layer sees one tenant table with the settings it was checked with.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import msgspec

from tenantware.catalogue import Catalogue
from tenantware.config import AdminKey, ConfigError, GatewayConfig, Tenant, Upstream
from tenantware.keys import KeyHasher
from tenantware.registry.rules import RuntimeRules
from tenantware.registry.view import MemoryTenantRegistry, TenantRegistry

__all__ = ["LiveConfig", "PendingTenants", "Snapshot", "with_tenants"]


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
        "registry_version",
        "routes",
        "version",
    )

    def __init__(
        self,
        config: GatewayConfig,
        registry: TenantRegistry,
        version: int,
        *,
        registry_version: int = 0,
    ) -> None:
        self.config = config
        self.version = version
        self.registry = registry
        #: Version of the tenant registry the tenants come from (0: the file's, unversioned).
        self.registry_version = registry_version
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


class PendingTenants(NamedTuple):
    """A tenant table's snapshot built on ``base``, waiting to be installed."""

    base: Snapshot
    snapshot: Snapshot
    tenants: list[Tenant]
    admin_keys: list[AdminKey]
    rules: RuntimeRules


def with_tenants(
    config: GatewayConfig, tenants: Sequence[Tenant], admin_keys: Sequence[AdminKey] = ()
) -> GatewayConfig:
    """``config`` with ``tenants`` as its tenant table, validated whole (``ConfigError``).

    Per-tenant settings kept elsewhere in the file follow the table: a tenant's own
    ``reserved_seats`` and ``markup_percent`` win over ``admission.tenant_reserved_seats`` and
    ``metering.markup_percent``, and file settings of
    tenants that are gone (deleted through the admin API) are dropped. ``admin_keys`` (issued
    through the admin API) join ``gateway.admin_keys``.
    """
    ids = {tenant.id for tenant in tenants}
    admission = config.admission
    reserved = {k: v for k, v in admission.tenant_reserved_seats.items() if k in ids}
    reserved.update({t.id: t.reserved_seats for t in tenants if t.reserved_seats is not None})
    quota = config.quota
    per_model = {k: v for k, v in quota.tenant_model_limits.items() if k in ids}
    metering = config.metering
    markup = dict(metering.markup_percent)
    markup.update({t.id: t.markup_percent for t in tenants if t.markup_percent is not None})
    try:
        return msgspec.structs.replace(
            config,
            tenants=list(tenants),
            admission=msgspec.structs.replace(admission, tenant_reserved_seats=reserved),
            quota=msgspec.structs.replace(quota, tenant_model_limits=per_model),
            metering=msgspec.structs.replace(metering, markup_percent=markup),
            gateway=msgspec.structs.replace(
                config.gateway, admin_keys=[*config.gateway.admin_keys, *admin_keys]
            )
            if admin_keys
            else config.gateway,
        )
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from None


class LiveConfig:
    """Holds the current snapshot; ``replace`` validates a new config fully before swapping."""

    def __init__(
        self, config: GatewayConfig, *, registry_factory: RegistryFactory = MemoryTenantRegistry
    ) -> None:
        self._registry_factory = registry_factory
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._file_listeners: list[Callable[[GatewayConfig], None]] = []
        #: The configuration as loaded from the file (its tenants may be overridden).
        self.file_config = config
        #: The shared registry's tenants, once set; ``None``: the file's.
        self._tenants: list[Tenant] | None = None
        #: Admin keys issued through the admin API.
        self._admin_keys: list[AdminKey] = []
        #: Rules changed through the admin API, kept in a shared registry (over the file's).
        self.rules = RuntimeRules()
        #: A file reload puts the file's tenants back (the registry is the file's copy).
        self.tenants_follow_file = True
        self.current = self._build(config, None, (), RuntimeRules(), version=1, registry_version=0)

    def _build(
        self,
        config: GatewayConfig,
        tenants: list[Tenant] | None,
        admin_keys: Sequence[AdminKey],
        rules: RuntimeRules,
        *,
        version: int,
        registry_version: int,
    ) -> Snapshot:
        merged = with_tenants(config, config.tenants if tenants is None else tenants, admin_keys)
        try:
            # Over the table in force: the rules may name a tenant the registry added.
            merged = rules.over(merged)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"the rules changed through the admin API: {exc}") from None
        return Snapshot(
            merged, self._registry_factory(merged), version, registry_version=registry_version
        )

    def replace(self, config: GatewayConfig) -> Snapshot:
        """Swap in a new configuration; on error the old one stays in force."""
        tenants = None if self.tenants_follow_file else self._tenants
        registry_version = 0 if tenants is None else self.current.registry_version
        snapshot = self._build(
            config,
            tenants,
            self._admin_keys,
            self.rules,
            version=self.current.version + 1,
            registry_version=registry_version,
        )
        self.file_config = config
        self._tenants = tenants
        self._swap(snapshot)
        for file_listener in self._file_listeners:
            file_listener(config)
        return snapshot

    def set_tenants(
        self,
        tenants: Sequence[Tenant],
        *,
        registry_version: int,
        admin_keys: Sequence[AdminKey] = (),
        rules: RuntimeRules | None = None,
    ) -> Snapshot:
        """Swap in the registry's tenants, admin keys and rules (at ``registry_version``)
        over the file's settings (``rules``: ``None`` keeps those in force)."""
        pending = self.build_tenants(
            tenants, registry_version=registry_version, admin_keys=admin_keys, rules=rules
        )
        snapshot = self.install(pending)
        assert snapshot is not None  # nothing ran between build and install
        return snapshot

    def build_tenants(
        self,
        tenants: Sequence[Tenant],
        *,
        registry_version: int,
        admin_keys: Sequence[AdminKey] = (),
        rules: RuntimeRules | None = None,
    ) -> PendingTenants:
        """The snapshot of a new tenant table, built but not in force: safe to run in a
        worker thread (a large registry takes a while to index) while requests go on."""
        base = self.current
        table = list(tenants)
        admins = list(admin_keys)
        held = self.rules if rules is None else rules
        snapshot = self._build(
            self.file_config,
            table,
            admins,
            held,
            version=base.version + 1,
            registry_version=registry_version,
        )
        return PendingTenants(base, snapshot, table, admins, held)

    def install(self, pending: PendingTenants) -> Snapshot | None:
        """Put a built table in force; ``None`` if another snapshot came in meanwhile (a file
        reload): the caller builds again on it."""
        if self.current is not pending.base:
            return None
        self._tenants = pending.tenants
        self._admin_keys = pending.admin_keys
        self.rules = pending.rules
        self._swap(pending.snapshot)
        return pending.snapshot

    def _swap(self, snapshot: Snapshot) -> None:
        self.current = snapshot
        for listener in self._listeners:
            listener(snapshot)

    def on_file_reload(self, listener: Callable[[GatewayConfig], None]) -> None:
        """Call ``listener`` with each new file configuration, after its snapshot is in force."""
        self._file_listeners.append(listener)

    def on_change(self, listener: Callable[[Snapshot], None]) -> None:
        """Call ``listener`` after each successful replace (e.g. to drop cached derived state)."""
        self._listeners.append(listener)
