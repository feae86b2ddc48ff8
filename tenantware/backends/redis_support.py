"""Shared Redis plumbing for the Redis backends: one client per gateway, key naming.

Every key of one tenant carries the tenant in a hash tag (``tw:{acme}:rpm``) so that all keys
a Lua script touches live in one slot and the scripts run unchanged on Redis Cluster.
Scripts are registered with ``register_script``: EVALSHA, reloaded on NOSCRIPT (after a
restart or a SCRIPT FLUSH).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from tenantware.backends.multiplex import MultiplexedRedis, multiplexable

__all__ = ["RedisClient", "ScriptHost", "connect_redis", "connect_scripts", "tenant_key"]

#: Either client: both run scripts and commands the same way for single-slot work.
RedisClient = aioredis.Redis | RedisCluster
#: What runs the hot-path scripts: the pipelined connection, or a redis-py client.
ScriptHost = MultiplexedRedis | RedisClient


def connect_redis(
    url: str, *, timeout_s: float = 0.05, cluster: bool | None = None, **options: Any
) -> RedisClient:
    """A pooled asyncio client; ``redis+cluster://`` (or ``cluster=True``) for a cluster.

    ``timeout_s`` bounds every call so that a Redis outage costs each request at most that
    long before the caller's failure policy decides.
    """
    is_cluster = cluster if cluster is not None else url.startswith("redis+cluster://")
    if url.startswith("redis+cluster://"):
        url = "redis://" + url[len("redis+cluster://") :]
    common: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        **options,
    }
    if is_cluster:
        return RedisCluster.from_url(url, **common)
    return aioredis.Redis.from_url(url, **common)


def connect_scripts(url: str, client: RedisClient, *, timeout_s: float = 0.05) -> ScriptHost:
    """Where the stores run their per-request scripts: one pipelined connection
    (``MultiplexedRedis``, ten times cheaper per call) for a plain Redis server, ``client``
    itself for a cluster or TLS."""
    if isinstance(client, RedisCluster) or not multiplexable(url):
        return client
    return MultiplexedRedis(url, timeout_s=timeout_s)


def tenant_key(prefix: str, tenant_id: str, *parts: str) -> str:
    """``{prefix}tw:{tenant}:part:part``: all keys of a tenant share one hash slot."""
    tail = ":".join(parts)
    return f"{prefix}tw:{{{tenant_id}}}:{tail}" if tail else f"{prefix}tw:{{{tenant_id}}}"
