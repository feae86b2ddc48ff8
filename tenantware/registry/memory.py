"""The registry of a single process: the configuration file's tenants, changed in memory.

Without a shared registry the file is the registry, as it always was. The admin API still
works on it (useful for one process and for trying the API), but its changes live in this
process only: they are lost on restart, and a reload of the file puts the file's tenants
back. ``shared = False`` says so, and the admin API's answers carry a warning header.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Mapping

import anyio
import msgspec

from tenantware.config import AdminKey, Tenant
from tenantware.registry.rules import RuleDocument, RuleName
from tenantware.registry.store import AuditEntry, RegistryState, TenantRecord, VersionMismatch

__all__ = ["MemoryRegistryStore"]

#: Audit entries kept in memory (the oldest go first).
AUDIT_KEPT = 10_000


class MemoryRegistryStore:
    """``MemoryRegistryStore(config.tenants)``: records and version in this process."""

    shared = False

    def __init__(self, tenants: list[Tenant] | None = None) -> None:
        self._version = 0
        self._records: dict[str, TenantRecord] = {}
        self._admins: dict[str, tuple[int, AdminKey]] = {}
        self._rules: dict[str, RuleDocument] = {}
        self._initialized = False
        self._remembered: dict[str, tuple[float, bytes]] = {}
        self._audit: list[AuditEntry] = []
        if tenants is not None:
            self.reset(tenants)

    def reset(self, tenants: list[Tenant]) -> None:
        """Replace every record with ``tenants`` (start-up, and each reload of the file)."""
        self._version += 1
        self._records = {t.id: TenantRecord(version=self._version, tenant=t) for t in tenants}
        self._initialized = True

    async def load(self) -> RegistryState:
        return RegistryState(
            version=self._version,
            records=dict(self._records),
            admins={k: key for k, (_, key) in self._admins.items()},
            rules=dict(self._rules),
            initialized=self._initialized,
        )

    async def version(self) -> int:
        return self._version

    async def get(self, tenant_id: str) -> TenantRecord | None:
        return self._records.get(tenant_id)

    def _check(self, tenant_id: str, expect: int | None) -> int:
        record = self._records.get(tenant_id)
        current = record.version if record is not None else 0
        if expect is not None and expect != current:
            raise VersionMismatch(current)
        return current

    async def put(self, tenant: Tenant, *, expect: int | None, audit: AuditEntry) -> int:
        self._check(tenant.id, expect)
        self._version += 1
        self._initialized = True
        self._records[tenant.id] = TenantRecord(version=self._version, tenant=tenant)
        self._append(audit)
        return self._version

    async def delete(self, tenant_id: str, *, expect: int | None, audit: AuditEntry) -> int:
        if self._check(tenant_id, expect) == 0:
            raise VersionMismatch(0)
        self._version += 1
        del self._records[tenant_id]
        self._append(audit)
        return self._version

    async def put_admin(self, key: AdminKey, *, expect: int | None, audit: AuditEntry) -> int:
        current = self._admins.get(key.id, (0, None))[0]
        if expect is not None and expect != current:
            raise VersionMismatch(current)
        self._version += 1
        self._admins[key.id] = (self._version, key)
        self._append(audit)
        return self._version

    async def delete_admin(self, key_id: str, *, expect: int | None, audit: AuditEntry) -> int:
        current = self._admins.get(key_id, (0, None))[0]
        if current == 0 or (expect is not None and expect != current):
            raise VersionMismatch(current)
        self._version += 1
        del self._admins[key_id]
        self._append(audit)
        return self._version

    async def get_rules(self, name: RuleName) -> RuleDocument | None:
        return self._rules.get(name)

    async def put_rules(
        self, name: RuleName, document: bytes | None, *, expect: int | None, audit: AuditEntry
    ) -> int:
        held = self._rules.get(name)
        current = held.version if held is not None else 0
        if (expect is not None and expect != current) or (document is None and current == 0):
            raise VersionMismatch(current)
        self._version += 1
        if document is None:
            del self._rules[name]
        else:
            self._rules[name] = RuleDocument(version=self._version, document=document)
        self._append(audit)
        return self._version

    def _append(self, audit: AuditEntry) -> None:
        self._audit.append(msgspec.structs.replace(audit, version=self._version))
        del self._audit[:-AUDIT_KEPT]

    async def seed(self, tenants: list[Tenant], rules: Mapping[str, bytes] | None = None) -> bool:
        if self._initialized:
            return False
        self.reset(tenants)
        for name, document in (rules or {}).items():
            self._rules[name] = RuleDocument(version=self._version, document=document)
        return True

    async def remember(self, key: str, value: bytes, ttl_s: float) -> bytes | None:
        now = time.monotonic()
        kept = self._remembered.get(key)
        if kept is not None and kept[0] > now:
            return kept[1]
        if len(self._remembered) > 10_000:  # drop the expired ones now and then
            self._remembered = {k: v for k, v in self._remembered.items() if v[0] > now}
        self._remembered[key] = (now + ttl_s, value)
        return None

    async def audit(self, *, tenant: str | None, limit: int) -> list[AuditEntry]:
        found: list[AuditEntry] = []
        for entry in reversed(self._audit):
            if tenant is None or entry.tenant == tenant:
                found.append(entry)
                if len(found) >= limit:
                    break
        return found

    async def changes(self) -> AsyncGenerator[int, None]:
        # Nothing else writes to this process's memory: every change is applied by its writer.
        await anyio.sleep_forever()
        yield 0  # pragma: no cover

    async def aclose(self) -> None:
        return None
