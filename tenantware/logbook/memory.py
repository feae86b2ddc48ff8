"""Log rows and tenant salts in this process (tests, the ``memory://`` ledger)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from tenantware.crypto import MemoryTenantKeyStore
from tenantware.logbook.record import LogRow

__all__ = ["MemoryLogStore"]


class MemoryLogStore(MemoryTenantKeyStore):
    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, LogRow]] = {}

    async def open(self) -> None:
        return None

    async def append(self, row: LogRow, *, quota_bytes: int) -> bool:
        rows = self.rows.setdefault(row.tenant, {})
        if row.id in rows:
            return True
        if sum(r.size for r in rows.values()) + row.size > quota_bytes:
            return False
        rows[row.id] = row
        return True

    async def read(
        self, tenant: str, *, since: float = 0.0, until: float | None = None, limit: int = 100
    ) -> list[LogRow]:
        end = float("inf") if until is None else until
        found = [r for r in self.rows.get(tenant, {}).values() if since <= r.ts < end]
        found.sort(key=lambda r: (r.ts, r.id), reverse=True)
        return found[:limit]

    async def used_bytes(self, tenant: str) -> int:
        return sum(r.size for r in self.rows.get(tenant, {}).values())

    async def purge_expired(self, tenant: str, now: float) -> int:
        rows = self.rows.get(tenant, {})
        expired = [key for key, row in rows.items() if row.expires_at <= now]
        for key in expired:
            del rows[key]
        return len(expired)

    async def stale(self, tenant: str, current_version: int, limit: int) -> list[LogRow]:
        rows = self.rows.get(tenant, {}).values()
        return sorted((r for r in rows if r.key_version != current_version), key=lambda r: r.id)[
            :limit
        ]

    async def reseal(self, rows: Sequence[LogRow]) -> None:
        for row in rows:
            kept = self.rows.get(row.tenant, {})
            if row.id in kept:
                kept[row.id] = msgspec.structs.replace(
                    kept[row.id], sealed=row.sealed, key_version=row.key_version
                )

    async def restore(self, rows: Sequence[LogRow]) -> int:
        added = 0
        for row in rows:
            kept = self.rows.setdefault(row.tenant, {})
            if row.id not in kept:
                kept[row.id] = row
                added += 1
        return added

    async def delete_tenant(self, tenant: str) -> int:
        return len(self.rows.pop(tenant, {}))

    async def aclose(self) -> None:
        return None
