"""Every cache store (memory, real Redis): TTL, per-tenant quotas, isolation."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from tenantware.backends.redis_support import connect_redis
from tenantware.cache import CacheStore, MemoryCacheStore
from tenantware.cache.redis import RedisCacheStore

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[CacheStore]:
    if request.param == "memory":
        yield MemoryCacheStore()
        return
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    redis = RedisCacheStore(connect_redis(url, timeout_s=5.0), prefix=prefix, owned=True)
    try:
        yield redis
    finally:
        await redis.aclose()


async def test_an_entry_is_served_until_its_ttl_and_only_to_its_tenant(store: CacheStore) -> None:
    assert await store.put("a", "k1", b"answer", ttl_s=0.3, quota_bytes=1000)
    assert await store.get("a", "k1") == b"answer"
    assert await store.get("b", "k1") is None
    await anyio.sleep(0.5)
    assert await store.get("a", "k1") is None


async def test_filling_a_quota_evicts_the_tenants_own_oldest_entries_only(
    store: CacheStore,
) -> None:
    for n in range(5):
        assert await store.put("b", f"b{n}", b"x" * 98, ttl_s=60, quota_bytes=10_000)
    for n in range(20):
        assert await store.put("a", f"a{n:02}", b"y" * 97, ttl_s=60, quota_bytes=300)
    # a keeps its 3 newest entries within 300 bytes; every entry of b is still there.
    assert await store.used_bytes("a") == 300
    assert [await store.get("a", f"a{n:02}") is not None for n in range(17, 20)] == [True] * 3
    assert await store.get("a", "a16") is None
    assert all([await store.get("b", f"b{n}") == b"x" * 98 for n in range(5)])
    assert await store.used_bytes("b") == 500


async def test_an_entry_larger_than_the_quota_is_refused_and_nothing_is_evicted(
    store: CacheStore,
) -> None:
    assert await store.put("a", "small", b"s" * 10, ttl_s=60, quota_bytes=100)
    assert not await store.put("a", "big", b"b" * 200, ttl_s=60, quota_bytes=100)
    assert await store.get("a", "small") == b"s" * 10
    assert await store.get("a", "big") is None


async def test_replacing_an_entry_counts_its_bytes_once_and_purge_forgets_the_tenant(
    store: CacheStore,
) -> None:
    await store.put("a", "k", b"1" * 50, ttl_s=60, quota_bytes=1000)
    await store.put("a", "k", b"2" * 40, ttl_s=60, quota_bytes=1000)
    await store.put("b", "k", b"3" * 40, ttl_s=60, quota_bytes=1000)
    assert await store.used_bytes("a") == 41
    assert await store.get("a", "k") == b"2" * 40
    await store.purge("a")
    assert await store.get("a", "k") is None
    assert await store.used_bytes("a") == 0
    assert await store.get("b", "k") == b"3" * 40
