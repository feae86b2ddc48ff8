"""Where tenants and their keys are kept, and how a change is written: the registry store.

Every change bumps one registry-wide version, atomically with the change itself and its
audit entry, so a process that knows the version knows whether its copy is current. Each
tenant record carries the version it was last written at: the value ``If-Match`` compares.
The request path never calls a store: it reads the snapshot built from the last ``load()``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from typing import Protocol

import msgspec

from tenantware.audit import AuditAction, AuditEntry
from tenantware.config import AdminKey, Tenant
from tenantware.registry.rules import RuleDocument, RuleName

__all__ = [
    "AuditAction",
    "AuditEntry",
    "RegistryState",
    "RegistryStore",
    "RuleDocument",
    "TenantRecord",
    "VersionMismatch",
]


class TenantRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One tenant as stored, with the registry version of its last change."""

    version: int
    tenant: Tenant


class RegistryState(msgspec.Struct, frozen=True, kw_only=True):
    """Everything in the registry at one version (what a process copies for its snapshot)."""

    version: int
    records: dict[str, TenantRecord]
    #: Admin keys issued through the admin API (the file's are not here).
    admins: dict[str, AdminKey] = msgspec.field(default_factory=dict)
    #: Rules changed through the admin API, by name (``registry.rules``); absent: the file's.
    rules: dict[str, RuleDocument] = msgspec.field(default_factory=dict)
    #: False until the registry was first written (a new Redis registry is seeded then).
    initialized: bool = True


class VersionMismatch(Exception):
    """``expect`` did not match: the record changed (or exists / does not) since it was read."""

    def __init__(self, current: int) -> None:
        super().__init__(f"the record is at version {current}")
        #: The record's version now (0: no such record).
        self.current = current


class RegistryStore(Protocol):
    """A tenant registry: the file's memory copy, or Redis shared by every replica."""

    #: Whether changes reach other processes and survive a restart.
    shared: bool

    async def load(self) -> RegistryState:
        """Every record at one consistent version."""
        ...

    async def version(self) -> int:
        """The registry version (cheap: the periodic check of every replica)."""
        ...

    async def get(self, tenant_id: str) -> TenantRecord | None: ...

    async def put(self, tenant: Tenant, *, expect: int | None, audit: AuditEntry) -> int:
        """Write ``tenant`` whole; the new registry version.

        ``expect``: ``None`` writes whatever is there; ``0`` requires that no such tenant
        exists; ``n`` requires the record to be at version ``n`` (else ``VersionMismatch``).
        """
        ...

    async def delete(self, tenant_id: str, *, expect: int | None, audit: AuditEntry) -> int:
        """Remove a tenant (``VersionMismatch(0)`` if there is none); the new version."""
        ...

    async def put_admin(self, key: AdminKey, *, expect: int | None, audit: AuditEntry) -> int:
        """Write an admin key (``expect`` as for ``put``); the new version."""
        ...

    async def delete_admin(self, key_id: str, *, expect: int | None, audit: AuditEntry) -> int:
        """Remove an admin key (``VersionMismatch(0)`` if there is none); the new version."""
        ...

    async def get_rules(self, name: RuleName) -> RuleDocument | None:
        """The rules document ``name`` as stored (``None``: the file's rules apply)."""
        ...

    async def put_rules(
        self, name: RuleName, document: bytes | None, *, expect: int | None, audit: AuditEntry
    ) -> int:
        """Write the rules document ``name`` (``None``: remove it, the file's apply again);
        ``expect`` as for ``put``; the new registry version."""
        ...

    async def seed(self, tenants: list[Tenant], rules: Mapping[str, bytes] | None = None) -> bool:
        """Fill an empty, never-written registry with ``tenants`` (and rules documents by
        name); ``False`` if not empty."""
        ...

    async def remember(self, key: str, value: bytes, ttl_s: float) -> bytes | None:
        """Keep ``value`` under ``key`` unless one is kept already; return the kept one."""
        ...

    async def audit(self, *, tenant: str | None, limit: int) -> list[AuditEntry]:
        """The newest ``limit`` audit entries (of one tenant), newest first."""
        ...

    def changes(self) -> AsyncGenerator[int, None]:
        """The version once listening, then each version writers announce, as they come
        (raises ``StoreUnavailable`` when cut off)."""
        ...

    async def aclose(self) -> None: ...
