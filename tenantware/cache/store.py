"""The cache store protocol: opaque sealed bytes per tenant and key, a TTL and a byte quota.

A store never sees plaintext (the cache layer seals entries with the tenant's key first) and
keeps each tenant's entries apart: eviction to make room for a tenant's new entry only ever
removes that tenant's own oldest entries. Stores raise ``StoreUnavailable`` (or an error of
``STORE_UNAVAILABLE``) when unreachable; the cache layer then serves without the cache.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["CacheStore", "open_cache"]


class CacheStore(Protocol):
    async def get(self, tenant: str, key: str) -> bytes | None:
        """The live entry under ``key`` for ``tenant``, else ``None``."""
        ...

    async def put(
        self, tenant: str, key: str, value: bytes, *, ttl_s: float, quota_bytes: int
    ) -> bool:
        """Keep ``value`` for ``ttl_s``, evicting the tenant's oldest entries to stay within
        ``quota_bytes``; ``False`` (nothing stored) when it alone exceeds the quota."""
        ...

    async def used_bytes(self, tenant: str) -> int:
        """Bytes the tenant's live entries take (what its quota counts)."""
        ...

    async def purge(self, tenant: str) -> None:
        """Remove every entry of the tenant."""
        ...

    async def aclose(self) -> None: ...


def open_cache(url: str | None, *, prefix: str = "", timeout_s: float = 0.25) -> CacheStore:
    """``memory://`` (or ``None``) or a Redis URL (``redis://``, ``rediss://``, ``unix://``,
    ``redis+cluster://``)."""
    if url is None or url.startswith("memory:"):
        from tenantware.cache.memory import MemoryCacheStore

        return MemoryCacheStore()
    if url.startswith(("redis://", "rediss://", "unix://", "redis+cluster://")):
        from tenantware.backends.redis_support import connect_redis
        from tenantware.cache.redis import RedisCacheStore

        return RedisCacheStore(connect_redis(url, timeout_s=timeout_s), prefix=prefix, owned=True)
    raise ValueError(f"unsupported cache url {url!r} (memory://, redis://...)")
