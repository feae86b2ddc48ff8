"""The stores of every layer from one URL, chosen in one place (as ``open_ledger(url)``).

- ``memory://``: state lives in this process (the embedded default; with ``replicas``
  processes each guards its share of every seat pool);
- ``redis://``, ``rediss://``, ``unix://``: one Redis server shared by every replica;
- ``redis+cluster://``: a Redis Cluster (every script touches one hash slot).

The Redis modules (and the ``redis`` package) are imported, and clients created, only when a
Redis URL is used and a store is first asked for; clients connect on their first call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from tenantware.admission.memory import MemorySeatStore
from tenantware.admission.store import PoolSpec, SeatStore
from tenantware.backends.failover import Failover, StoreHealth
from tenantware.breaker.memory import MemoryBreakerStore
from tenantware.breaker.store import BreakerStore
from tenantware.config import FailurePolicy
from tenantware.quota.memory import MemoryQuotaStore
from tenantware.quota.store import QuotaStore

if TYPE_CHECKING:
    from collections.abc import Sequence

    from tenantware.admission.redis import RedisSeatStore
    from tenantware.backends.redis_support import RedisClient, ScriptHost
    from tenantware.config import Tenant
    from tenantware.joint.redis import RedisReserveAcquire
    from tenantware.joint.store import ReserveAcquire
    from tenantware.ownership.store import OwnerStore
    from tenantware.quota.failover import FailoverQuotaStore
    from tenantware.quota.redis import RedisQuotaStore
    from tenantware.registry.store import RegistryStore

__all__ = ["SCHEMES", "Stores", "open_stores"]

#: URL schemes ``open_stores`` understands.
SCHEMES: Final = ("memory", "redis", "rediss", "unix", "redis+cluster")


class Stores:
    """The quota, admission and breaker stores of one gateway process, from one URL."""

    def __init__(
        self,
        url: str = "memory://",
        *,
        prefix: str = "",
        timeout_s: float = 0.05,
        replicas: int = 1,
        on_failure: FailurePolicy = "open",
        probe_interval_s: float = 0.25,
    ) -> None:
        scheme = url.partition("://")[0] if "://" in url else ""
        if scheme not in SCHEMES:
            raise ValueError(
                f"unsupported store URL scheme {scheme or url!r}: use one of "
                + ", ".join(f"{name}://" for name in SCHEMES)
            )
        self.url = url
        #: State is shared with other processes (every replica reaches the same store).
        self.remote = scheme != "memory"
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.replicas = replicas
        self.on_failure = on_failure
        self.probe_interval_s = probe_interval_s
        self._redis: RedisClient | None = None
        self._scripts: ScriptHost | None = None
        self._quota: QuotaStore | None = None
        #: The Redis quota store inside its failure policies (set with ``_quota``).
        self._quota_redis: tuple[FailoverQuotaStore, RedisQuotaStore]
        self._joint: RedisReserveAcquire | None = None
        #: Seat pools on the per-request connection, for the joint call (single server).
        self._pools: list[RedisSeatStore] = []
        #: The health of the connection the per-request scripts use (quota, admission), one
        #: for both layers of this process; the breaker's redis-py client shares it only when
        #: it is that connection (Redis Cluster, TLS), since each client has its own evidence,
        #: and otherwise follows it (an outage declared there holds for the breaker too, so a
        #: request waits for a stopped Redis in one layer, not in two).
        self.health = StoreHealth(probe_interval_s=probe_interval_s, bound_s=timeout_s)
        #: The admission layer's view of it, shared by every seat pool.
        self._admission_failover = Failover("admission", self.health)

    # -- Redis clients (created on first use) ----------------------------------------------

    @property
    def redis(self) -> RedisClient | None:
        """The pooled redis-py client (pub/sub, streams, breaker); ``None`` in memory."""
        if self._redis is None and self.remote:
            from tenantware.backends.redis_support import connect_redis

            self._redis = connect_redis(self.url, timeout_s=self.timeout_s)
        return self._redis

    @property
    def scripts(self) -> ScriptHost | None:
        """What runs the per-request scripts: one pipelined connection to a plain Redis
        server (``MultiplexedRedis``), else the pooled client."""
        redis = self.redis
        if self._scripts is None and redis is not None:
            from tenantware.backends.redis_support import connect_scripts

            # The layers' failover already limits reconnects to one probe per interval.
            self._scripts = connect_scripts(self.url, redis, timeout_s=self.timeout_s, retry_s=0.0)
        return self._scripts

    # -- the stores --------------------------------------------------------------------------

    def quota_store(self) -> QuotaStore:
        """The quota store (one per process): shared ones wear the failure policies."""
        if self._quota is None:
            scripts = self.scripts
            if scripts is None:
                self._quota = MemoryQuotaStore(prefix=self.prefix)
            else:
                from tenantware.quota.failover import FailoverQuotaStore
                from tenantware.quota.redis import RedisQuotaStore

                primary = RedisQuotaStore(scripts, prefix=self.prefix)
                shared = FailoverQuotaStore(primary, timeout_s=self.timeout_s, health=self.health)
                self._quota = shared
                self._quota_redis = (shared, primary)
        return self._quota

    def seat_store(self, spec: PoolSpec) -> SeatStore:
        """The store of one seat pool (``AdmissionPools`` asks for each of its pools)."""
        redis = self.redis
        if redis is None:
            return MemorySeatStore.from_spec(spec, replicas=self.replicas)
        from tenantware.admission.redis import RedisSeatStore

        store = RedisSeatStore.from_spec(
            spec,
            redis,
            prefix=self.prefix,
            scripts=self.scripts,
            on_failure=self.on_failure,
            replicas=self.replicas,
            failover=self._admission_failover,
        )
        self._pools.append(store)
        if self._joint is not None:
            self._joint.add(store)
        return store

    def joint(self) -> ReserveAcquire | None:
        """The quota reservation and the seat request in one script call, where one call
        reaches both (a single Redis server); ``None`` in memory and on a cluster."""
        scripts = self.scripts
        if scripts is None:
            return None
        if self._joint is None:
            from tenantware.backends.redis_support import single_node

            if not single_node(scripts):
                return None
            from tenantware.joint.redis import RedisReserveAcquire

            self.quota_store()
            self._joint = RedisReserveAcquire(*self._quota_redis)
            for pool in self._pools:
                self._joint.add(pool)
        return self._joint

    def breaker_store(self, *, sync_interval_s: float = 0.5) -> BreakerStore:
        """Circuits: this process's, or shared through Redis (local ones while it fails)."""
        redis = self.redis
        if redis is None:
            return MemoryBreakerStore()
        from tenantware.breaker.redis import RedisBreakerStore

        shared = self.scripts is redis
        return RedisBreakerStore(
            redis,
            prefix=self.prefix,
            sync_interval_s=sync_interval_s,
            health=self.health if shared else None,
            follows=None if shared else self.health,
        )

    def owner_store(self) -> OwnerStore:
        """Which tenant owns which stored response: this process's, or shared in Redis."""
        redis = self.redis
        if redis is None:
            from tenantware.ownership.memory import MemoryOwnerStore

            return MemoryOwnerStore()
        from tenantware.ownership.redis import RedisOwnerStore

        return RedisOwnerStore(redis, prefix=self.prefix)

    def registry_store(
        self, url: str | None = None, *, tenants: Sequence[Tenant] = ()
    ) -> RegistryStore:
        """The tenant registry: ``None``, the file's ``tenants`` in this process; a Redis URL
        (``gateway.registry_url``), shared by every replica under this prefix. It has its own
        client (the caller closes the store)."""
        from tenantware.registry import open_registry

        return open_registry(url, tenants=tenants, prefix=self.prefix)

    async def aclose(self) -> None:
        """Close the Redis clients (the stores need no closing of their own)."""
        scripts, self._scripts = self._scripts, None
        redis, self._redis = self._redis, None
        if scripts is not None and scripts is not redis:
            await scripts.aclose()
        if redis is not None:
            await redis.aclose()


def open_stores(
    url: str | None = None,
    *,
    prefix: str = "",
    timeout_s: float = 0.05,
    replicas: int = 1,
    on_failure: FailurePolicy = "open",
    probe_interval_s: float = 0.25,
) -> Stores:
    """``open_stores("redis://127.0.0.1:6379/0", prefix="app1:")``; ``None``: memory."""
    return Stores(
        url or "memory://",
        prefix=prefix,
        timeout_s=timeout_s,
        replicas=replicas,
        on_failure=on_failure,
        probe_interval_s=probe_interval_s,
    )
