"""The shared cache store: each tenant's entries in one hash, their expiries in a sorted set
and their byte count in a counter, all under the tenant's hash tag (one slot: the scripts
run unchanged on Redis Cluster). Eviction for a tenant's quota runs inside ``put.lua``, so it
can only ever reach that tenant's keys.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Final

from tenantware.backends.keys import tenant_key
from tenantware.backends.redis_support import RedisClient, redis_errors, register_script

__all__ = ["RedisCacheStore"]

_LUA: Final = resources.files("tenantware.cache").joinpath("lua")
_GET: Final = _LUA.joinpath("get.lua").read_text()
_PUT: Final = _LUA.joinpath("put.lua").read_text()


class RedisCacheStore:
    """``RedisCacheStore(redis, prefix="app1:")``."""

    def __init__(self, redis: RedisClient, *, prefix: str = "", owned: bool = False) -> None:
        self.redis = redis
        self.prefix = prefix
        self._owned = owned
        self._get: Any = register_script(redis, _GET)
        self._put: Any = register_script(redis, _PUT)

    def _keys(self, tenant: str) -> list[str]:
        return [
            tenant_key(self.prefix, tenant, "cache", "values"),
            tenant_key(self.prefix, tenant, "cache", "expiries"),
            tenant_key(self.prefix, tenant, "cache", "bytes"),
        ]

    async def get(self, tenant: str, key: str) -> bytes | None:
        keys = self._keys(tenant)
        found = await self._get(keys=keys[:2], args=[key])
        return bytes(found) if found else None

    async def put(
        self, tenant: str, key: str, value: bytes, *, ttl_s: float, quota_bytes: int
    ) -> bool:
        ttl_ms = max(1, int(ttl_s * 1000))
        stored = await self._put(keys=self._keys(tenant), args=[key, value, ttl_ms, quota_bytes])
        return bool(stored)

    async def used_bytes(self, tenant: str) -> int:
        with redis_errors():
            found = await self.redis.get(self._keys(tenant)[2])
        return int(found or 0)

    async def purge(self, tenant: str) -> None:
        with redis_errors():
            await self.redis.delete(*self._keys(tenant))

    async def aclose(self) -> None:
        if self._owned:
            await self.redis.aclose()
