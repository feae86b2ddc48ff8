"""The tenant registry: where tenants and keys live, and the index the request path reads.

- ``view``: the in-process index of one snapshot (``TenantView``, ``KeyEntry``);
- ``store``: the ``RegistryStore`` protocol; ``memory`` (the file's copy) and ``redis``
  (shared by every replica, written through the admin API);
- ``sync``: keeps a process's snapshot equal to the store (pub/sub + version check).

Only the index and the protocol are imported here; the backends load when used.
"""

from __future__ import annotations

from collections.abc import Sequence

from tenantware.config import Tenant
from tenantware.registry.store import (
    AuditEntry,
    RegistryState,
    RegistryStore,
    TenantRecord,
    VersionMismatch,
)
from tenantware.registry.view import KeyEntry, MemoryTenantRegistry, TenantRegistry, TenantView

__all__ = [
    "AuditEntry",
    "KeyEntry",
    "MemoryTenantRegistry",
    "RegistryState",
    "RegistryStore",
    "TenantRecord",
    "TenantRegistry",
    "TenantView",
    "VersionMismatch",
    "open_registry",
]


def open_registry(
    url: str | None, *, tenants: Sequence[Tenant] = (), prefix: str = ""
) -> RegistryStore:
    """The registry store for ``gateway.registry_url``: ``None`` or ``file://``/``memory://``:
    the configuration file's tenants in this process; ``redis://``, ``rediss://``,
    ``unix://``, ``redis+cluster://``: shared through Redis."""
    scheme = url.partition("://")[0] if url and "://" in url else ""
    if url is None or scheme in ("file", "memory"):
        from tenantware.registry.memory import MemoryRegistryStore

        return MemoryRegistryStore(list(tenants))
    if scheme in ("redis", "rediss", "unix", "redis+cluster"):
        from tenantware.registry.redis import RedisRegistryStore

        return RedisRegistryStore(url, prefix=prefix)
    raise ValueError(
        f"gateway.registry_url: unsupported scheme {scheme or url!r} "
        "(use redis://, rediss://, unix://, redis+cluster://, or leave it unset for the file)"
    )
