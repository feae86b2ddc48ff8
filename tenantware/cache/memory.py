"""The in-process cache store: one ordered table per tenant, oldest first."""

from __future__ import annotations

import time
from collections import OrderedDict

__all__ = ["MemoryCacheStore"]


class _TenantEntries:
    __slots__ = ("entries", "used")

    def __init__(self) -> None:
        #: key -> (expires at, monotonic; value); insertion order is eviction order.
        self.entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.used = 0

    def drop(self, key: str) -> None:
        found = self.entries.pop(key, None)
        if found is not None:
            self.used -= len(key) + len(found[1])


class MemoryCacheStore:
    """``MemoryCacheStore()``: entries of this process, bounded per tenant by its quota."""

    def __init__(self) -> None:
        self._tenants: dict[str, _TenantEntries] = {}
        self._now = time.monotonic

    async def get(self, tenant: str, key: str) -> bytes | None:
        table = self._tenants.get(tenant)
        if table is None:
            return None
        found = table.entries.get(key)
        if found is None:
            return None
        if found[0] <= self._now():
            table.drop(key)
            return None
        return found[1]

    async def put(
        self, tenant: str, key: str, value: bytes, *, ttl_s: float, quota_bytes: int
    ) -> bool:
        size = len(key) + len(value)
        if size > quota_bytes:
            return False
        table = self._tenants.get(tenant)
        if table is None:
            table = self._tenants[tenant] = _TenantEntries()
        table.drop(key)
        now = self._now()
        entries = table.entries
        # Oldest first: with one TTL per tenant, also the first to expire.
        while entries and table.used + size > quota_bytes:
            table.drop(next(iter(entries)))
        entries[key] = (now + ttl_s, value)
        table.used += size
        return True

    async def used_bytes(self, tenant: str) -> int:
        table = self._tenants.get(tenant)
        if table is None:
            return 0
        now = self._now()
        for stale in [key for key, (expires, _) in table.entries.items() if expires <= now]:
            table.drop(stale)
        return table.used

    async def purge(self, tenant: str) -> None:
        self._tenants.pop(tenant, None)

    async def aclose(self) -> None:
        self._tenants.clear()
