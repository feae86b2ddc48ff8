"""One tenant's kept data across the stores that hold it: its key material, its request
logs and its cached answers."""

from __future__ import annotations

import msgspec

from tenantware.cache import CacheStore
from tenantware.crypto import KeyRing, Undecryptable
from tenantware.logbook import LogStore, open_row

__all__ = ["LogView", "TenantData"]


class LogView(msgspec.Struct, frozen=True, kw_only=True):
    """One logged exchange as the API shows it (bodies as text)."""

    object: str = "request_log"
    id: str
    ts: float
    request_id: str
    path: str
    model: str
    status: int
    outcome: str
    request: str
    response: str
    truncated: bool


class TenantData:
    """``TenantData(keyring, logs, cache)``."""

    def __init__(self, keyring: KeyRing, logs: LogStore, cache: CacheStore) -> None:
        self.keyring = keyring
        self.logs = logs
        self.cache = cache

    async def read_logs(
        self, tenant: str, *, since: float = 0.0, until: float | None = None, limit: int = 100
    ) -> list[LogView]:
        """The tenant's logs, newest first, opened with its key. Rows sealed under an older
        master key are re-sealed under the current one as they are read (lazy rotation)."""
        keys = await self.keyring.keys(tenant, create=False)
        if keys is None:
            return []
        rows = await self.logs.read(tenant, since=since, until=until, limit=limit)
        views: list[LogView] = []
        stale = []
        for row in rows:
            try:
                exchange = open_row(keys, row)
            except Undecryptable:
                continue
            if row.key_version != keys.current:
                stale.append(
                    msgspec.structs.replace(
                        row, sealed=keys.seal(keys.open(row.sealed)), key_version=keys.current
                    )
                )
            views.append(
                LogView(
                    id=row.id,
                    ts=row.ts,
                    request_id=exchange.request_id,
                    path=exchange.path,
                    model=exchange.model,
                    status=exchange.status,
                    outcome=exchange.outcome,
                    request=exchange.request.decode("utf-8", "replace"),
                    response=exchange.response.decode("utf-8", "replace"),
                    truncated=exchange.truncated,
                )
            )
        if stale:
            await self.logs.reseal(stale)
        return views

    async def storage(self, tenant: str) -> dict[str, int]:
        """Bytes the tenant's cached answers and logs take (what its quotas count)."""
        return {
            "cache_bytes": await self.cache.used_bytes(tenant),
            "log_bytes": await self.logs.used_bytes(tenant),
        }

    async def forget(self, tenant: str) -> None:
        """A deleted tenant: its key material is destroyed first (whatever copies of its
        ciphertext remain, in backups or a store that missed the rest, are unreadable from
        then on), then its rows and cached answers are removed."""
        await self.keyring.shred(tenant)
        await self.logs.delete_tenant(tenant)
        await self.cache.purge(tenant)
